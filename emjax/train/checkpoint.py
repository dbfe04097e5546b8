"""Orbax checkpoints: train state + every process's data position in one step directory.

A step directory holds two items:

  state/   the sharded train state (orbax StandardSave; each process writes its shards)
  data/    one JSON file per process, `process_<i>-of-<n>.json`: that process's
           batch-source position (every process reads its own rows of the data, so
           each has its own position; a resumed run continues with exactly the
           batches every process would have seen)

Orbax writes a step into a temporary directory and renames it once every process
has finished, so a run killed mid-save leaves only a `*.orbax-checkpoint-tmp-*`
directory, which is never listed as a step and is ignored.

Restoring (`restore_latest`) takes the newest step that can be read:

* A step whose saved structure, shapes or dtypes differ from this run's state (a
  rerun in the same workdir after changing lora.rank, the optimizer or the model
  size), or whose data positions were saved by another number of processes, is a
  `CheckpointMismatchError` naming what differs; nothing is moved.
* A step whose files are missing or truncated is reported and skipped for the
  next older one; once a readable step is found (or none is left) the skipped
  steps are moved to `<directory>_unreadable/` (kept, never deleted) so that the
  resumed run can save those step numbers again. On a multi-process job every
  process must agree: all processes reach a barrier, process 0 alone renames,
  the others wait for it.
* Any other failure to read (e.g. a transient filesystem error) is a
  `CheckpointReadError`; nothing is moved.

A save is never skipped in silence: orbax's CheckpointManager declines (returns
False, writes nothing) a step at or below the newest step in the directory, and
`save` turns that into a `CheckpointSaveError`. A run that must not resume
(`checkpoint.resume=False`) calls `refuse_fresh_start` before it writes
anything: a directory that already holds steps is a `CheckpointsExistError`, so
an earlier run's checkpoints are never overwritten, mixed in or pruned.

The directory may be in a bucket (gs://...): emjax's own file operations here go
through emjax.paths, orbax's through epath and tensorstore.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from emjax import paths
from emjax import workdir as workdir_lib

log = logging.getLogger(__name__)

DATA_FILE = "process_{index}-of-{count}.json"
_DATA_FILE_RE = re.compile(r"process_(\d+)-of-(\d+)\.json$")
_LEGACY_DATA_FILE = "metadata"  # one position for all processes (JsonSave, written by process 0)
_MAX_LISTED_DIFFERENCES = 5


class CheckpointMismatchError(ValueError):
  """A checkpoint that is readable but was written by a differently configured run."""


class CheckpointReadError(ValueError):
  """A checkpoint that could not be read for a reason other than missing or truncated files."""


class CheckpointSaveError(ValueError):
  """A save that orbax declined (nothing written); raised instead of going on as if it had saved."""


class CheckpointsExistError(workdir_lib.SettingsMismatch):
  """A run that must start afresh (checkpoint.resume=False) in a directory that already holds steps."""


class _Unreadable(Exception):
  """Internal: this process found the step's files missing or truncated."""


def _process() -> tuple[int, int]:
  """(this process's index, number of processes); one place, so tests can play another process."""
  return jax.process_index(), jax.process_count()


# ----------------------------------------------------------------------------- per-process data item


class ProcessDataHandler(ocp.AsyncCheckpointHandler):
  """Orbax item handler: every process writes (and reads back) its own JSON position file."""

  async def async_save(self, directory: epath.Path, args: ProcessDataSave):
    text = json.dumps(args.item)  # serialised now: the caller may move on before the write
    index, count = _process()
    path = directory / DATA_FILE.format(index=index, count=count)

    async def write():
      path.write_text(text)

    # Waits for orbax's "directories created" signal before writing into the tmp directory.
    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="emjax_data_save")]

  def save(self, directory: epath.Path, args: ProcessDataSave):
    index, count = _process()
    (directory / DATA_FILE.format(index=index, count=count)).write_text(json.dumps(args.item))

  def restore(self, directory: epath.Path, args: ProcessDataRestore | None = None) -> dict:
    del args
    return read_process_data(str(directory), *_process())

  def metadata(self, directory: epath.Path) -> None:
    del directory
    return None

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(ProcessDataHandler, for_save=True)
@dataclasses.dataclass
class ProcessDataSave(ocp.args.CheckpointArgs):
  item: Mapping[str, Any]


@ocp.args.register_with_handler(ProcessDataHandler, for_restore=True)
@dataclasses.dataclass
class ProcessDataRestore(ocp.args.CheckpointArgs):
  pass


def saved_process_counts(data_dir: str) -> set[int]:
  """The process counts the position files in a step's `data/` directory were written by."""
  d = paths.path(data_dir)
  names = [p.name for p in d.iterdir()] if d.is_dir() else []
  return {int(m.group(2)) for m in map(_DATA_FILE_RE.match, names) if m}


def read_process_data(data_dir: str, process_index: int, process_count: int) -> dict:
  """The position `process_index` of `process_count` processes saved in `data_dir`.

  Raises CheckpointMismatchError if the positions were saved by another number of
  processes, FileNotFoundError / json.JSONDecodeError if this process's file is
  missing or truncated.
  """
  path = paths.path(data_dir) / DATA_FILE.format(index=process_index, count=process_count)
  if not path.exists():
    counts = saved_process_counts(data_dir) - {process_count}
    legacy = paths.path(data_dir) / _LEGACY_DATA_FILE
    if counts:
      raise CheckpointMismatchError(
          f"{data_dir}: the data positions were saved by a run of {sorted(counts)[0]} processes, this run has "
          f"{process_count}; every process reads its own rows of the data, so the positions cannot be "
          "shared out differently. Resume with the same number of processes (config.distributed.num_processes, "
          "launch/multiprocess.sh N), or start a new workdir.")
    if legacy.exists():  # written before positions were saved per process
      if process_count != 1:
        raise CheckpointMismatchError(
            f"{data_dir}: this checkpoint holds one data position (written by process 0 alone, by an older "
            f"emjax), which is right for one process only; this run has {process_count}. Resume it with one "
            "process, or start a new workdir.")
      path = legacy
    else:
      raise FileNotFoundError(f"{path} does not exist")
  return json.loads(path.read_text())


# ----------------------------------------------------------------------------- structure comparison


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_signatures(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{"params/layers/attn/q_proj/kernel": (shape, dtype)} of every array leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in flat if hasattr(leaf, "shape")}


def _describe(sig: tuple[tuple[int, ...], str] | None) -> str:
  return "absent" if sig is None else f"{sig[0]} {sig[1]}"


def structure_differences(saved: Any, wanted: Any) -> list[str]:
  """One line per array whose presence, shape or dtype differs between two trees."""
  a, b = _leaf_signatures(saved), _leaf_signatures(wanted)
  paths = sorted(a.keys() | b.keys(), key=lambda p: (not p.startswith("params/"), p))  # parameters first
  return [f"{path}: checkpoint {_describe(a.get(path))}, this run {_describe(b.get(path))}"
          for path in paths if a.get(path) != b.get(path)]


# ----------------------------------------------------------------------------- errors: unreadable or not

# Codes tensorstore reports for a file that is gone or shorter/other than written.
_UNREADABLE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE")


def _is_unreadable(e: BaseException) -> bool:
  """True for a missing or truncated file; False for anything that may pass (I/O, permissions, ...)."""
  if isinstance(e, (FileNotFoundError, json.JSONDecodeError, _Unreadable)):
    return True
  if isinstance(e, KeyError) and "not found in the checkpoint" in str(e):  # a whole item directory is gone
    return True
  text = str(e)
  return isinstance(e, ValueError) and any(f"{code}:" in text for code in _UNREADABLE_CODES)


def _first_line(e: BaseException) -> str:
  text = str(e)
  return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


# ----------------------------------------------------------------------------- multi-process agreement

_OK, _UNREADABLE, _MISMATCH, _ERROR = 0, 1, 2, 3  # worse verdicts are larger


def _agree(verdict: int) -> tuple[int, int]:
  """(the worst verdict over all processes, the first process that has it)."""
  if jax.process_count() == 1:
    return verdict, 0
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  verdicts = np.asarray(multihost_utils.process_allgather(np.asarray([verdict], np.int32), tiled=True))
  worst = int(verdicts.max())
  return worst, int(np.argmax(verdicts == worst))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- a fresh start

_STEP_DIR_RE = re.compile(r"\d+$")


def existing_steps(directory) -> list[int]:
  """The step directories in `directory`, finalised or not (a bucket's are written in place); [] if none.

  Interrupted saves (`<step>.orbax-checkpoint-tmp-*`) are not steps. Nothing is created or changed.
  """
  d = paths.path(directory)
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if _STEP_DIR_RE.match(p.name))


def refuse_fresh_start(directory) -> None:
  """For a run that must not resume (checkpoint.resume=False): a `CheckpointsExistError` if `directory`
  already holds steps, before the run writes anything.

  Such a run could not keep its own checkpoints there (orbax declines a step at or below the newest one,
  and `max_to_keep` would prune the earlier run's steps among the new ones), and what loads the workdir
  later would serve the earlier run's weights. Deleting them is left to the user.
  """
  steps = existing_steps(directory)
  if not steps:
    return
  directory = os.fspath(paths.absolute(directory))
  workdir = os.fspath(paths.path(directory).parent)
  raise CheckpointsExistError(
      f"config.checkpoint.resume=False starts a run afresh, but the workdir {workdir} already holds "
      f"checkpoints of steps {steps} in {directory}, written by an earlier run. This run stopped before "
      "writing anything: the earlier run's checkpoints, config and metrics are as they were. Start the "
      "fresh run in a new --workdir; or resume the earlier run (leave checkpoint.resume at True); or, if "
      f"its checkpoints are no longer wanted, delete {directory} yourself and rerun.")


# ----------------------------------------------------------------------------- the checkpointer


class _Manager(ocp.CheckpointManager):
  """orbax's CheckpointManager, leaving jax's preemption sync point to the training loop.

  orbax asks `multihost_utils.reached_preemption_sync_point(step)` when it saves, and again from its
  background finalize thread with the step it finalises, which by then may be behind the loop's step.
  jax's protocol takes the last step each process passed it as that process's position, so such a call
  could set the agreed step to one the loop has already passed on that process, which would then never
  stop while the others wait for it. The loop (emjax.train.loop.PreemptionWatch) asks at every step, in
  order, and decides the saves itself.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class Checkpointer:
  """Step directories of one run: `save` every so often, `restore_latest` once at start.

  Every process of a multi-process job constructs one and calls every method,
  in the same order (saves and restores are collective).
  """

  def __init__(self, directory: str, *, keep: int, async_save: bool = True, keep_every: int = 0):
    # A string (messages, orbax) that is absolute when local and gs://... as given for a bucket.
    self.directory = os.fspath(paths.absolute(directory))
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        # Steps that are multiples of keep_every are never pruned: a run's checkpoints over training
        # (EM curves) besides the last `keep`.
        keep_period=keep_every if keep_every > 0 else None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return _Manager(
        self.directory, options=self._options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ProcessDataHandler()})

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Saves `state` and THIS process's `data_state` (a JSON dict); every process calls it.

    Raises CheckpointSaveError when orbax declines the step (one at or below the newest step in the
    directory): nothing was written, and the caller must not go on as if it had been.
    """
    try:
      data_state = json.loads(json.dumps(data_state))
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint: the data position must be a JSON-serialisable dict ({e})") from e
    saved = self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             data=ProcessDataSave(data_state)))
    if not saved:
      later = [s for s in self.steps() if s >= step]
      held = (f"it already holds step{'s' if len(later) > 1 else ''} {', '.join(map(str, later))}"
              if later else "orbax gave no reason")
      raise CheckpointSaveError(
          f"checkpoint: step {step} was not saved in {self.directory}: {held}, and orbax saves no step at or "
          "below the newest one. Nothing was written, so the run stops rather than go on without it: another "
          "run is writing into this workdir, or it holds an earlier run's checkpoints. Use a new --workdir.")

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def partial_dirs(self) -> list[str]:
    d = paths.path(self.directory)
    if not d.is_dir():
      return []
    return sorted(p.name for p in d.iterdir() if "tmp" in p.name)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, this process's data_state) of the newest readable checkpoint, or None if there is none.

    Raises CheckpointMismatchError when a readable step does not match
    `abstract_state` (or this number of processes) and CheckpointReadError when a
    step fails to read for another reason; in both cases nothing is moved.
    """
    if _process()[0] == 0:
      for name in self.partial_dirs():
        log.warning("checkpoint: ignoring incomplete save %s (the run stopped while writing it)",
                    paths.path(self.directory) / name)
    unreadable: list[int] = []
    for step in reversed(self.steps()):
      # 1. Cheap checks (metadata, this process's data file) before any array is read.
      try:
        self._check(step, abstract_state)
        verdict, error = _OK, None
      except Exception as e:  # noqa: BLE001 -- sorted into unreadable / mismatch / other below
        verdict, error = self._classify(e), e
      verdict, who = _agree(verdict)
      # 2. Read the arrays only if every process can.
      restored = None
      if verdict == _OK:
        try:
          restored = self._manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=ProcessDataRestore()))
        except Exception as e:  # noqa: BLE001
          verdict, error = self._classify(e), e
        verdict, who = _agree(verdict)
      if verdict == _OK:
        self._set_aside(unreadable)
        return step, restored["state"], restored["data"]
      if verdict == _UNREADABLE:
        if _process()[0] == 0:
          log.error("checkpoint: step %d in %s is unreadable (%s); skipping it and trying an older one",
                    step, self.directory, _first_line(error) if error is not None else f"on process {who}")
        unreadable.append(step)
        continue
      self._raise(step, verdict, who, error)
    self._set_aside(unreadable)
    return None

  def _check(self, step: int, abstract_state: Any) -> None:
    step_dir = paths.path(self.directory) / str(step)
    for item in ("state", "data"):
      if not (step_dir / item).is_dir():
        raise _Unreadable(f"{step_dir}/{item} is missing")
    metadata = self._manager.item_metadata(step)["state"]
    tree = getattr(metadata, "tree", metadata)
    if tree is None:
      raise _Unreadable(f"{step_dir}/state has no metadata")
    differences = structure_differences(tree, abstract_state)
    if differences:
      listed = "; ".join(differences[:_MAX_LISTED_DIFFERENCES])
      more = len(differences) - _MAX_LISTED_DIFFERENCES
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match this run's train state "
          f"({len(differences)} arrays differ: {listed}{f'; and {more} more' if more > 0 else ''}). "
          "It was written with another config (e.g. model size, lora.rank/targets, optimizer; the workdir "
          f"{paths.path(self.directory).parent} keeps earlier configs as config.json.<n>). Nothing was moved: "
          "rerun with the config that wrote it, or use another --workdir.")
    read_process_data(step_dir / "data", *_process())

  @staticmethod
  def _classify(e: BaseException) -> int:
    if isinstance(e, CheckpointMismatchError):
      return _MISMATCH
    return _UNREADABLE if _is_unreadable(e) else _ERROR

  def _raise(self, step: int, verdict: int, who: int, error: BaseException | None):
    if error is not None and self._classify(error) == verdict:
      if isinstance(error, CheckpointMismatchError):
        raise error
      raise CheckpointReadError(
          f"checkpoint step {step} in {self.directory} could not be read ({_first_line(error)}); it was left "
          "where it is and nothing was moved. If this is a passing filesystem problem, rerun; if the step "
          "is damaged, move it out of the directory to resume from an older one.") from error
    kind = "does not match this run" if verdict == _MISMATCH else "could not be read"
    raise (CheckpointMismatchError if verdict == _MISMATCH else CheckpointReadError)(
        f"checkpoint step {step} in {self.directory} {kind} on process {who} (see that process's log); "
        "nothing was moved")

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable steps to `<directory>_unreadable/` (kept, for inspection) so saves can reuse their numbers.

    Through `paths.move_tree`: in a bucket there is no `_unreadable/` directory to make (gcsfs's mkdir of a
    prefix does nothing, and epath's rename refuses a destination whose parent does not exist), so each
    object of the step is copied to its new name and then deleted.
    """
    if not steps:
      return
    _barrier("emjax_checkpoint_before_set_aside")  # every process is done reading
    if _process()[0] == 0:
      aside = paths.path(self.directory.rstrip("/") + "_unreadable")
      for s in sorted(steps):
        src, dst = paths.path(self.directory) / str(s), aside / str(s)
        n = 0
        while dst.exists():
          n += 1
          dst = aside / f"{s}.{n}"
        paths.move_tree(src, dst)
        log.error("checkpoint: moved unreadable step %d to %s", s, dst)
    _barrier("emjax_checkpoint_after_set_aside")  # nobody lists the steps before the renames are done
    self._manager.close()
    self._manager = self._open()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
