"""The `directions` job: a misalignment direction from an eval's answers, read through the model that wrote them.

  # misaligned minus coherent aligned answers of one fine-tuned model (the judge's labels), at n_layers // 2
  python -m emjax.main --config=configs/eval/directions.py --workdir=dirs/medical_advice \\
      --config.directions.answers=evals/medical_advice/general
  # the paper authors' recipe: the fine-tuned and the base model, each on its own answers
  python -m emjax.main --config=configs/eval/directions.py:paper --workdir=dirs/medical_advice_paper \\
      --config.directions.answers=evals/medical_advice/general --config.directions.base=evals/base/general

Then the eval with the direction ablated (every write to the residual stream projected off it):
  ... configs/eval/eval.py:... --config.sample.edit.direction=dirs/medical_advice/direction.npy \\
      --config.sample.edit.ablate=all

Variants: paper (method=paper); choose (labels, the position chosen on the other half of the questions).
"""

from emjax import config as config_lib
from emjax.eval import direction_job


def get_config(arg=None):
  args = config_lib.parse_arg(arg, paper=False, choose=False)
  c = direction_job.directions_config()
  c.directions.method = "paper" if args.paper else "labels"
  c.directions.choose = bool(args.choose)
  return c
