"""The `em_curve` job: EM over training, the eval job at every kept checkpoint of one or more runs.

  python -m emjax.main --config=configs/eval/curve.py:general=GENERAL.yaml,narrow='EVAL_SPLITS/*.jsonl' \\
      --workdir=curves/medical_advice --config.curve.runs=runs/em/medical_advice_s0,runs/em/medical_advice_s1

Train the runs with `--config.checkpoint.keep_every=K` (a multiple of checkpoint.every_steps) so that
their checkpoints over training are kept. `curve.every`: every k-th kept step (the last always);
`curve.threshold`: the EM rate whose first crossing is reported per run. Variant options are the
eval job's (configs/eval/eval.py); the judge's cache and cost ledger are the curve's, shared by steps.
"""

from emjax import config as config_lib
from emjax.eval import curves


def get_config(arg=None):
  args = config_lib.parse_arg(arg, general="", narrow="", betley=False, judge="local", judge_hf="", prompts="default",
                              narrow_prompts="", limit=0, smoke=False)
  return curves.curve_config(**args.to_dict())
