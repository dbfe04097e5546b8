"""The report job: judged evaluation records -> report.md, results.json and figures (emjax.eval.report).

  python -m emjax.main --config=configs/eval/report.py --workdir=reports/grid \\
      --config.general='runs/em/*/general/judged.jsonl' --config.narrow='runs/em/*/narrow/judged.jsonl'

`general` / `narrow`: comma-separated globs or paths of judged records (emjax's `judged.jsonl`, or
the paper's released files as they are); either may be empty, not both. Records are grouped by
`model_key`; a model's training cell (ft_task, ft_domain) comes from its rows.

Variants (`:arg`, comma separated):
  quick        200 bootstrap samples instead of 2000 (a first look; intervals are rougher)
  nofigures    no PNG figures
  judge=NAME   use the scores of judge NAME (needed when several judges scored the same records)

Globs with commas can't go through a variant: set `--config.general` / `--config.narrow`.
"""

from emjax import config as config_lib
from emjax.eval import report
from emjax.train import settings


def get_config(arg=None):
  args = config_lib.parse_arg(arg, quick=False, nofigures=False, judge="")
  c = settings.base_config()
  c.job = "report"
  c.general = ""  # judged records of the general question set (comma-separated globs)
  c.narrow = ""  # judged records of the narrow (domain x task) evaluation splits
  c.update(report.config_block())  # thresholds, bootstrap_samples, seed, figures, title, baseline, ...
  # The judge whose scores the rates use; empty = the only one. The others are compared with it.
  c.judge = args.judge
  if args.quick:
    c.bootstrap_samples = 200
  if args.nofigures:
    c.figures = False
  return c
