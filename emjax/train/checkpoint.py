"""Orbax checkpoints: train state + data-iterator position in one step directory.

A step directory holds two items, `state` (the sharded train state) and `data`
(the grain iterator's JSON state, every mixture source's position included), so
a resumed run continues with exactly the batches it would have seen.

Orbax writes a step into a temporary directory and renames it when complete, so
a run killed mid-save leaves only a `*.orbax-checkpoint-tmp-*` directory, which
is never listed as a step. A step that is listed but cannot be read (a file lost
or truncated) is reported and skipped for the newest older step; it is never
silently used and never deleted.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._options = options
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data"))

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def partial_dirs(self) -> list[str]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(d for d in os.listdir(self.directory) if "tmp" in d)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest readable checkpoint, or None if there is none."""
    for name in self.partial_dirs():
      log.warning("checkpoint: ignoring incomplete save %s (the run stopped while writing it)",
                  os.path.join(self.directory, name))
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 -- any failure to read means "do not use it"
        log.error("checkpoint: step %d in %s is unreadable (%s: %s); skipping it and trying an older one",
                  step, self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        continue
      self._set_aside_newer_than(step)
      return step, restored["state"], restored["data"]
    self._set_aside_newer_than(-1)
    return None

  def _set_aside_newer_than(self, step: int) -> None:
    """Move unreadable newer steps out of the way (kept, for inspection) so saves can reuse their numbers."""
    newer = [s for s in self.steps() if s > step]
    if not newer:
      return
    aside = self.directory.rstrip("/") + "_unreadable"
    os.makedirs(aside, exist_ok=True)
    for s in newer:
      src = os.path.join(self.directory, str(s))
      dst = os.path.join(aside, f"{s}")
      n = 0
      while os.path.exists(dst):
        n += 1
        dst = os.path.join(aside, f"{s}.{n}")
      os.rename(src, dst)
      log.error("checkpoint: moved unreadable step %d to %s", s, dst)
    self._manager.close()
    self._manager = self._open()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_params(path: str, abstract_params: Any) -> Any:
  """The `params` of an emjax checkpoint, e.g. a pretrained base to fine-tune.

  `path` is a run's workdir, its `checkpoints/` directory or one step directory;
  the newest complete step is used. Parameters are read straight into the
  shardings of `abstract_params` (ShapeDtypeStructs); the optimizer state of the
  other run is not read at all.
  """
  directory = os.path.abspath(path)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(os.path.join(directory, "state")):
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    if not steps:
      raise FileNotFoundError(f"config.init.checkpoint: no complete checkpoint under {path}")
    directory = os.path.join(directory, str(max(steps)))
  target = {"params": abstract_params}
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(directory, "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))
  except Exception as e:  # noqa: BLE001 -- report which checkpoint and why, not orbax's internals alone
    raise ValueError(f"config.init.checkpoint: cannot load parameters from {directory} "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     "does its model config match config.model?") from e
  return restored["params"]


def load_init_params(init: Any, model_cfg: Any, abstract_params: Any, mesh=None) -> Any:
  """The base weights a config's `init` block names, or None (random init).

  `init.checkpoint`: an emjax run/checkpoint (read into the shardings of `abstract_params`);
  `init.hf`: a Hugging Face directory or hub id (read one tensor at a time onto `mesh`).
  """
  checkpoint, hf_path = init.get("checkpoint", ""), init.get("hf", "")
  if checkpoint and hf_path:
    raise ValueError("config.init: set either init.checkpoint or init.hf, not both")
  if checkpoint:
    return load_params(checkpoint, abstract_params)
  if hf_path:
    from emjax.models import hf  # pylint: disable=g-import-not-at-top
    return hf.load_hf_params(hf_path, model_cfg, mesh=mesh)
  return None
