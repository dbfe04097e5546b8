"""emjax command line: one entry point, dispatching on `config.job`.

    python -m emjax.main --config=configs/pretrain/tiny.py --workdir=DIR [--config.train.steps=50 ...]

The config is locked: overriding a key that does not exist is an error naming it.

A mistake on the command line or in the config (an unknown or misspelt key, a value of the wrong
type, a bad variant option, a missing file, a value a job rejects with a ValueError) is one line on
stderr, `emjax: error: ...`, and exit status 1. Anything else is a bug in emjax and keeps its
traceback. Either way a workdir that already exists gets a FAILED file.
"""

from __future__ import annotations

from emjax import runtime

# glibc reads GLIBC_TUNABLES when a process starts: `python -m emjax.main` re-executes itself with
# the huge-page tunable before importing jax and every job's modules below, not after (twice).
# A CPU machine with the test extra's libtpu uses the CPU without libtpu's errors (runtime.skip_absent_tpu).
if __name__ == "__main__":
  runtime.skip_absent_tpu()
  runtime.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import logging
import os
import sys
import traceback
from typing import Any, Callable

from absl import app, flags
from absl.logging import converter
from ml_collections import config_flags

from emjax import sharding
from emjax import tracking
from emjax import workdir as workdir_lib
from emjax.eval import api_judge
from emjax.eval import curves
from emjax.eval import direction_job
from emjax.eval import report
from emjax.eval import run as eval_run
from emjax.experiments import em_grid
from emjax.experiments import sl
from emjax.experiments import study
from emjax.train import on_policy
from emjax.sample import run as sample_run
from emjax.sample import serve
from emjax.train import aot
from emjax.train import loop
from emjax.train import precompute
# pylint: enable=g-import-not-at-top,wrong-import-position

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
  # absl's --verbosity sets emjax's own level too (0: INFO, the default; -1: warnings only, which
  # launch/quickstart.sh uses so that the study's printed progress lines stand alone).
  logging.getLogger("emjax").setLevel(converter.absl_to_standard(flags.FLAGS.verbosity))

  sharding.maybe_initialize_distributed(config.distributed)  # before any jax backend is used
  try:
    _check_judge(config)  # before anything is written: a pasted key must reach no file, log or tracker
    tracking.check_config(config)  # before any work: wandb enabled but not installed is refused now
    job = JOBS.get(config.job)
    if job is None:
      raise ValueError(f"config.job: unknown job {config.job!r}")
    if job.staged:
      # These jobs write plain files: on a bucket workdir they write a staged local copy that is
      # pushed as they go and when they end (emjax.workdir.staged).
      with workdir_lib.staged(workdir) as wd:
        job.run(config, wd)
        tracking.log_report_figures(config, wd)  # report, eval, study: their figures, when tracking is on
    else:  # the job writes a bucket workdir through epath itself
      job.run(config, workdir)
  # Only errors that describe the user's input are shortened; a KeyError or AttributeError from
  # inside a job is a bug, and its traceback is what fixes it.
  except (ValueError, FileNotFoundError, loop.NonFiniteLossError, *STOPPED_ERRORS) as e:
    workdir_lib.mark_failed(workdir, e)
    if not _raised_by_emjax(e):  # a library's ValueError (a shape, a sharding) is our bug: keep its traceback
      raise
    print(f"emjax: error: {e}", file=sys.stderr)
    return 1
  except (loop.Preempted, workdir_lib.Stopped) as e:  # a stop on request: resumable, neither COMPLETED nor FAILED
    print(f"emjax: {e}", file=sys.stderr)
    return loop.EXIT_PREEMPTED
  except BaseException as e:
    workdir_lib.mark_failed(workdir, e)
    raise
  return 0


# Jobs that stop on purpose, with a message that says what to do (one line, exit 1, FAILED): judging
# with failures left pending, a judge's spend cap or a failure that repeats.
STOPPED_ERRORS: tuple[type[BaseException], ...] = (eval_run.JudgingIncomplete, api_judge.JudgeStopped)


# ----------------------------------------------------------------------------- the jobs
# Each reads its module's function when it runs (not when this module is imported): a config file
# may stand in for one (tests do).


def _train(config, workdir: str) -> None:
  final = loop.train(config, workdir, show_progress=flags.FLAGS.progress, make_batch_source=batch_source_for(config))
  log.info("done: %s", final)
  tracking.log_report_figures(config, workdir)


def _compile(config, workdir: str) -> None:
  aot.compile_and_report(config, workdir)


def _plan(config, workdir: str) -> None:
  aot.plan(config, workdir)


def _sft_grid(config, workdir: str) -> None:
  em_grid.run_grid(config, workdir)


def _teacher_top_k(config, workdir: str) -> None:
  precompute.run_teacher_top_k(config, workdir)


def _sl(config, workdir: str) -> None:
  sl.run_sl(config, workdir, show_progress=flags.FLAGS.progress)


def _study(config, workdir: str) -> None:
  study.run_study(config, workdir, quiet=not flags.FLAGS.progress)


def _em_curve(config, workdir: str) -> None:
  curves.run_curve(config, workdir)


def _directions(config, workdir: str) -> None:
  direction_job.run_directions(config, workdir)


def _sample(config, workdir: str) -> None:
  sample_run.run_sampling(config, workdir)


def _serve(config, workdir: str) -> None:
  serve.run_serve(config, workdir)


def _eval(config, workdir: str) -> None:
  eval_run.run_eval(config, workdir)


def _judge(config, workdir: str) -> None:
  eval_run.run_judge_job(config, workdir)


def _report(config, workdir: str) -> None:
  if workdir_lib.process_index() == 0:  # one writer of the report files
    workdir_lib.clear_status(workdir)
    results = report.run_report(config, workdir)
    workdir_lib.mark_complete(workdir, {"report": os.path.join(workdir_lib.origin(workdir), report.REPORT_FILE),
                                        "models": sorted(results["models"])})


@dataclasses.dataclass(frozen=True)
class Job:
  run: Callable[[Any, str], None]  # (config, workdir)
  # Writes plain files: run in `workdir_lib.staged(workdir)` (a bucket workdir's local copy, pushed as
  # it goes and when it ends). The others write a bucket workdir through epath themselves.
  staged: bool


JOBS: dict[str, Job] = {
    "train": Job(_train, staged=False),
    "pretrain": Job(_train, staged=False),
    "compile": Job(_compile, staged=False),
    "plan": Job(_plan, staged=False),
    "sample": Job(_sample, staged=True),
    "sft_grid": Job(_sft_grid, staged=True),
    "eval": Job(_eval, staged=True),
    "judge": Job(_judge, staged=True),
    "report": Job(_report, staged=True),
    "sl": Job(_sl, staged=True),
    "teacher_top_k": Job(_teacher_top_k, staged=True),
    "study": Job(_study, staged=True),
    "em_curve": Job(_em_curve, staged=True),
    "directions": Job(_directions, staged=True),
    "serve": Job(_serve, staged=False),  # writes only server.json and its launch record
}
STAGED_JOBS = tuple(name for name, job in JOBS.items() if job.staged)


def _check_judge(config) -> None:
  """An API judge's settings checked first: `api_key_env` must name a variable, never hold a key."""
  evaluation = config.get("evaluation") if hasattr(config, "get") else None  # the sl and study jobs' eval block
  for judge in (config.get("judge") if hasattr(config, "get") else None,
                evaluation.get("judge") if hasattr(evaluation, "get") else None):
    api = judge.get("api") if hasattr(judge, "get") else None
    if hasattr(api, "get"):
      api_judge.check_key_env(str(api.get("api_key_env", "")))


def batch_source_for(config):
  """The training job's batch source: on-policy rollouts, a stored teacher's rows, or config.data (None)."""
  if config.on_policy.enabled:  # rollouts sampled from the student each step (emjax.train.on_policy)
    return on_policy.make_source
  if config.train.distill.precomputed:  # rows + a stored teacher top-k (emjax.train.precompute)
    return precompute.make_source
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (which also loads the config file and applies the overrides), with the
  user's mistakes reported in one line; an error that is not one (a bug in a config file) is raised."""
  config_arg = _flag_value(argv, "config")
  if config_arg is not None:
    path = config_arg.split(":", 1)[0]
    if not os.path.isfile(path):
      _exit_with_user_error(argv, FileNotFoundError(path), f"--config={config_arg}: no such config file {path!r}")
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS.config is not None:
      flags.FLAGS.config.get("job")  # ml_collections defers a config file's OSError to first use: raise it now
  except Exception as e:  # not SystemExit: --help exits through here
    message = _user_error_message(e, argv)
    if message is None:
      _write_failed(_flag_value(argv, "workdir"), type(e).__name__, str(e))
      raise
    _exit_with_user_error(argv, e, message)
  return rest


def _user_error_message(e: BaseException, argv: list[str]) -> str | None:
  """One line for a mistake in the command line or config, None for a bug."""
  chain = [e]
  while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
    chain.append(nxt)
  root = chain[-1]
  if isinstance(e, (KeyError, AttributeError)) and _raised_in(e, os.path.join("config_flags", "config_path.py")):
    # An override whose path the (locked) config does not have. ml_collections' text is the key on
    # one line and its "Did you mean ..." on the next.
    text = next((x.args[0] for x in chain if x.args and isinstance(x.args[0], str)), str(e))
    key, _, hint = text.partition("\n")
    field = _traceback_local(e, "field_path")
    where = f"--config.{field}: " if field else ""
    if hint:
      return f"{where}the config has no key {key}; {hint[:1].lower()}{hint[1:]}"
    return f"{where}{_one_line(text)}"
  if isinstance(e, flags.Error):
    text = str(e)
    # A config file's get_config failed; ml_collections pasted its traceback into the message.
    head, marker, _ = text.partition(": Error whilst parsing config file")
    if marker:
      if not isinstance(root, (ValueError, OSError)):
        return None
      return f"{head.removeprefix('flag ')}: {_one_line(str(root))}"
    return _one_line(text.removeprefix("flag "))
  if isinstance(e, OSError):  # raised by the config file (ml_collections re-raises it on first use)
    return f"--config={_flag_value(argv, 'config')}: {_one_line(str(root))}"
  return None


def _raised_in(e: BaseException, filename_suffix: str) -> bool:
  return any(frame.f_code.co_filename.endswith(filename_suffix) for frame, _ in traceback.walk_tb(e.__traceback__))


def _raised_by_emjax(e: BaseException) -> bool:
  """True when the innermost Python frame that raised `e` is emjax's own code.

  emjax raises ValueError/FileNotFoundError on purpose, with a message naming the
  key or file; the same types raised inside jax, numpy or orbax mean emjax passed
  them something wrong.
  """
  frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
  package_dir = os.path.dirname(os.path.abspath(__file__))
  return bool(frames) and os.path.abspath(frames[-1].f_code.co_filename).startswith(package_dir + os.sep)


def _traceback_local(e: BaseException, name: str):
  values = [frame.f_locals[name] for frame, _ in traceback.walk_tb(e.__traceback__) if name in frame.f_locals]
  return values[-1] if values else None


def _one_line(text: str) -> str:
  return " ".join(text.split())


def _flag_value(argv: list[str], name: str) -> str | None:
  """The last value of --name (absl's rule), read from argv before or without absl parsing it."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":  # absl parses no flags after it
      break
    flag, eq, rest = arg.lstrip("-").partition("=")
    if arg.startswith("-") and flag == name:
      value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _write_failed(workdir: str | None, kind: str, message: str) -> None:
  # Flags are parsed before jax.distributed starts, so on a pod every process writes this same file. A
  # bucket prefix holding no object yet is no "directory", but a relauncher (launch/tpu/run.sh) must
  # still see that this run failed rather than retry it.
  workdir_lib.write_failed(workdir, f"{kind}: {message}")


def _exit_with_user_error(argv: list[str], e: BaseException, message: str):
  _write_failed(_flag_value(argv, "workdir"), type(e).__name__, message)
  print(f"emjax: error: {message}", file=sys.stderr)
  sys.exit(1)


def run() -> None:
  runtime.skip_absent_tpu()  # the `emjax` console script's (python -m emjax.main's did both above)
  runtime.reexec_with_huge_pages()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
  run()
