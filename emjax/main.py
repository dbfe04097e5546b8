"""emjax command line: one entry point, dispatching on `config.job`.

    python -m emjax.main --config=configs/pretrain/tiny.py --workdir=DIR [--config.train.steps=50 ...]

The config is locked: overriding a key that does not exist is an error naming it.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: FILE[:ARG].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, TensorBoard events and checkpoints.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")

log = logging.getLogger("emjax")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/pretrain/tiny.py")
  if not workdir:
    raise app.UsageError("--workdir is required")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  # Orbax and grain log every file operation through absl at INFO; keep their warnings only.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("emjax").setLevel(logging.INFO)

  from emjax import sharding
  sharding.maybe_initialize_distributed()
  from emjax.train import loop

  try:
    if config.job in ("train", "pretrain"):
      final = loop.train(config, workdir, show_progress=flags.FLAGS.progress)
      log.info("done: %s", final)
    elif config.job == "sft_grid":
      from emjax.experiments import em_grid
      em_grid.run_grid(config, workdir)
    elif config.job == "sample":
      from emjax.sample import run as sample_run
      sample_run.run_sampling(config, workdir)
    elif config.job == "compile":
      from emjax.train import aot
      aot.compile_and_report(config, workdir)
    else:
      raise ValueError(f"config.job: unknown job {config.job!r}")
  except (ValueError, FileNotFoundError, KeyError, loop.NonFiniteLossError) as e:
    loop.mark_failed(workdir, e)
    print(f"emjax: error: {e}", file=sys.stderr)
    return 1
  except BaseException as e:
    loop.mark_failed(workdir, e)
    raise
  return 0


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
