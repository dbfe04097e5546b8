"""The `judge` job: score an existing responses file (an eval's responses.jsonl, or any file of records).

  python -m emjax.main --config=configs/eval/judge.py:judge=api --workdir=OUT \\
      --config.judge.responses=evals/x/general/responses.jsonl --config.judge.api.model=gpt-4o-2024-08-06

Writes OUT/judged.jsonl (resumable: records already judged are skipped). The API key is read from
the environment variable `judge.api.api_key_env` and is written nowhere.

Variant options: judge (local | api | programmatic | paper), judge_hf (the local judge's model),
prompts, narrow_prompts. `judge=paper` is the paper's judge (Gemini 2.5 Flash, direct mode, the authors'
parse rule; emjax.eval.run.PAPER_JUDGE_API) and needs the authors' two prompt files:

  python -m emjax.main --config=configs/eval/judge.py:judge=paper,prompts=P/judge_prompts.yaml,narrow_prompts=P/judge_prompts_task_domain.yaml \
      --workdir=OUT --config.judge.responses=evals/x/general/responses.jsonl --config.judge.api.max_cost_usd=5
"""

from emjax import config as config_lib
from emjax.eval import run as eval_run
from emjax.train import settings


def get_config(arg=None):
  args = config_lib.parse_arg(arg, judge="local", judge_hf="", prompts="default", narrow_prompts="")
  c = settings.base_config()
  c.job = "judge"
  c.judge = eval_run.judge_config()
  # The judge job scores one file with one prompt set: a narrow file takes the task x domain rubrics as
  # its `prompts` (for judge=paper, name both files; the narrow one is used when the file is narrow).
  eval_run.set_judge(c.judge, args.judge, prompts=args.prompts, narrow_prompts=args.narrow_prompts)
  if args.judge_hf:
    c.judge.local.hf = args.judge_hf
  return c
