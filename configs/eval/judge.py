"""The `judge` job: score an existing responses file (an eval's responses.jsonl, or any file of records).

  python -m emjax.main --config=configs/eval/judge.py:judge=api --workdir=OUT \\
      --config.judge.responses=evals/x/general/responses.jsonl --config.judge.api.model=gpt-4o-2024-08-06

Writes OUT/judged.jsonl (resumable: records already judged are skipped). The API key is read from
the environment variable `judge.api.api_key_env` and is written nowhere.

Variant options: judge (local | api | programmatic), judge_hf (the local judge's model), prompts.
"""

from emjax import config as config_lib
from emjax.eval import run as eval_run


def get_config(arg=None):
  args = config_lib.parse_arg(arg, judge="local", judge_hf="", prompts="default")
  c = config_lib.base_config()
  c.job = "judge"
  c.judge = eval_run.judge_config()
  c.judge.kind = args.judge
  c.judge.prompts = args.prompts
  if args.judge_hf:
    c.judge.local.hf = args.judge_hf
  return c
