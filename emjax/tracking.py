"""Experiment tracking beyond the workdir's own records: Weights & Biases, when the config asks.

    config.tracking.wandb = dict(enabled=False, project="emjax", entity="", mode="online",
                                 name="", group="", tags="", dir="")

metrics.jsonl, eval.jsonl and TensorBoard stay the record of every run. With `enabled`, the same
scalars (x axis `step`), the resolved config and the report figures also go to a W&B run, from
process 0 only. `mode`: online | offline (the run is written under `dir` and needs no network;
`wandb sync DIR/wandb/offline-run-*` uploads it later) | disabled. Disabled (the default, or
mode='disabled') never imports wandb; enabled without the package installed is an error naming
the key (pip install 'emjax[wandb]').

A rerun in the same workdir (a resumed or preempted run) logs to the same W&B run id, kept in
WORKDIR/wandb_run.json: online it continues that run; offline it writes another offline-run
directory with that id. The steps a resumed run recomputes are logged again; the charts plot
them against `step`, not W&B's own counter.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import uuid
from typing import Any, Mapping

from emjax import paths

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
RUN_FILE = "wandb_run.json"
# Where each job that writes a report leaves its figures, relative to its workdir.
REPORT_FIGURES = {"report": "*.png", "eval": "*.png", "study": "figures/*.png"}


def tracking_block() -> dict:
  """`config.tracking` of base_config: everything off."""
  return dict(wandb=dict(
      enabled=False,
      project="emjax",
      entity="",  # '' = the account's default entity
      mode="online",  # online | offline | disabled
      name="",  # '' = the workdir
      group="",
      tags="",  # comma-separated
      dir="",  # where wandb writes its files ('' = the workdir; ./wandb for a bucket workdir)
  ))


def _wandb_block(config) -> Mapping[str, Any] | None:
  block = config.get("tracking")
  return None if block is None else block.get("wandb")


def check_config(config) -> None:
  """A bad mode, or wandb enabled but not installed, is an error naming the key (nothing imported)."""
  w = _wandb_block(config)
  if w is None:
    return
  if w.mode not in MODES:
    raise ValueError(f"config.tracking.wandb.mode={w.mode!r}: expected one of {', '.join(MODES)}")
  if w.enabled and w.mode != "disabled" and not _installed():
    raise ValueError("config.tracking.wandb.enabled=True, but the wandb package is not installed: "
                     "pip install 'emjax[wandb]' (or set config.tracking.wandb.enabled=False)")


def _installed() -> bool:
  try:
    return importlib.util.find_spec("wandb") is not None
  except ValueError:  # sys.modules["wandb"] is None: importing it is blocked
    return False


class Tracker:
  """One W&B run: scalars by step, images, finish."""

  def __init__(self, run):
    self._run = run

  def log(self, scalars: Mapping[str, float], step: int) -> None:
    self._run.log({"step": step, **scalars})

  def log_images(self, images: Mapping[str, bytes]) -> None:
    """PNG bytes by name, logged once as `figures/<name>`."""
    import wandb  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top

    if images:
      self._run.log({f"figures/{name}": wandb.Image(Image.open(io.BytesIO(data))) for name, data in images.items()})

  def finish(self, failed: bool = False) -> None:
    self._run.finish(exit_code=1 if failed else 0)


def start(config, workdir: str, *, job_type: str) -> Tracker | None:
  """The W&B run of this job in `workdir` (process 0, when enabled), else None."""
  w = _wandb_block(config)
  if w is None or not w.enabled or w.mode == "disabled":
    return None
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() != 0:
    return None
  check_config(config)
  import wandb  # pylint: disable=g-import-not-at-top

  root = paths.path(workdir)
  directory = w.dir or (None if paths.is_remote(root) else os.fspath(root))
  if directory:
    os.makedirs(directory, exist_ok=True)  # wandb's files are local even when the workdir is a bucket
  run = wandb.init(
      project=w.project or None, entity=w.entity or None, mode=w.mode, name=w.name or os.fspath(workdir),
      group=w.group or None, tags=[t.strip() for t in w.tags.split(",") if t.strip()] or None, dir=directory,
      job_type=job_type, id=_run_id(root), resume="allow",
      config=json.loads(config.to_json_best_effort()),
      # The job's console output is the launcher's log; wandb leaves stdout and stderr alone.
      settings=wandb.Settings(console="off", silent=True))
  run.define_metric("step")
  run.define_metric("*", step_metric="step")
  log.info("wandb: run %s (%s, %s)", run.id, w.mode, run.dir)
  return Tracker(run)


def _run_id(root) -> str:
  """The id this workdir's W&B run has (made and kept in WORKDIR/wandb_run.json the first time)."""
  record = root / RUN_FILE
  if record.exists():
    try:
      return str(json.loads(record.read_text())["id"])
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{record}: not a W&B run record ({e}); delete it to start a new W&B run") from None
  run_id = uuid.uuid4().hex[:12]
  root.mkdir(parents=True, exist_ok=True)
  record.write_text(json.dumps({"id": run_id}) + "\n")
  return run_id


def log_report_figures(config, workdir: str) -> None:
  """The figures a report-writing job (report, eval, study) left in `workdir`, as images of its run."""
  pattern = REPORT_FIGURES.get(config.job)
  if pattern is None:
    return
  tracker = start(config, workdir, job_type=config.job)
  if tracker is None:
    return
  figures = sorted(paths.path(workdir).glob(pattern))
  tracker.log_images({f.stem: f.read_bytes() for f in figures})
  tracker.finish()
  log.info("wandb: logged %d report figures from %s", len(figures), workdir)
