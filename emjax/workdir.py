"""A run directory's bookkeeping, one implementation for every job: status, settings, launches, writes.

    COMPLETED / FAILED   the run's status: cleared when a run starts, one of them written when it
                         ends (COMPLETED last, after everything it vouches for); never both
    settings.json        (or a job's own name) what the run's files depend on: a rerun with other
                         settings is refused with `SettingsMismatch` before anything changes, and a
                         refused rerun writes no FAILED (the run it refused is as it was)
    launches.jsonl       one row per launch: when, the command line, the code (git commit and
                         whether the tree had uncommitted changes), hosts and processes

Every path goes through `emjax.paths` (a local directory or a bucket alike); whole-file writes are
atomic (a kill leaves the old file or the new one, never half of one). On several processes one
writes (process 0) and `barrier` makes the others wait until it has; a job calls them at the same
points on every process.

A bucket workdir for a job that writes plain files (everything but the training loop, which writes
through epath itself): `staged(workdir)` gives the job a local copy (named scratch: $EMJAX_SCRATCH,
default ~/.cache/emjax/staging/<bucket path>), pulled from the bucket first, so a relaunch on a fresh
VM resumes from what was pushed (a copy left by an earlier session is moved aside, never pushed).
Everything the job writes is pushed to the bucket every `SYNC_SECONDS`, at every `barrier` and when
the job ends, whatever way it ends (SIGTERM outside training included); files the job deleted are
deleted there too. One process only: on several, each host's copy would hold its own part of a
training sub-run's checkpoint, which one push cannot gather. The status is the
bucket's: clearing it clears the bucket's, and COMPLETED (or FAILED) is written there only after the
push of everything it vouches for. A preemption loses at most the last `SYNC_SECONDS` of writes, which
a relaunch redoes (every job resumes from its files).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Iterator, Mapping

import jax

from emjax import paths

COMPLETE_FILE = "COMPLETED"
FAILED_FILE = "FAILED"
SETTINGS_FILE = "settings.json"
LAUNCHES_FILE = "launches.jsonl"
SYNC_SECONDS = 60.0
MARKERS = (COMPLETE_FILE, FAILED_FILE)

log = logging.getLogger(__name__)


class SettingsMismatch(ValueError):
  """A rerun in a workdir written with other settings; raised before anything in it changes."""


def process_index() -> int:
  return jax.process_index()


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op with one process). In a staged bucket
  workdir what was written before it is pushed."""
  if _STAGE is not None:  # (one process only) a barrier is a point where what was written is worth pushing
    _STAGE.push()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top -- multi-process only
    multihost_utils.sync_global_devices(name)


def exists(p) -> bool:
  return paths.path(p).exists()


def makedirs(p) -> None:
  """A local directory and its parents; nothing in a bucket (an object's prefix needs none)."""
  if not paths.is_remote(p):
    os.makedirs(os.fspath(p), exist_ok=True)


def write_text(p, text: str) -> None:
  """The whole file, atomically (its directory made first on a local disk)."""
  makedirs(os.path.dirname(os.fspath(p)) or ".")
  paths.write_text(p, text)


def write_json(p, obj: Any) -> None:
  write_text(p, json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")


def read_json(p) -> Any:
  return json.loads(paths.path(p).read_text())


# ----------------------------------------------------------------------------- status


def is_complete(workdir) -> bool:
  """COMPLETED is there (in the bucket, for a staged copy: the copy's own markers are not the run's)."""
  return exists(paths.path(_status_dirs(workdir)[-1]) / COMPLETE_FILE)


_CLEARED: set[str] = set()  # the status directories this process cleared: their runs have started


def _status_dirs(workdir) -> list[str]:
  """The directories whose markers are `workdir`'s: itself, and its bucket when it is a staged copy."""
  out = [os.fspath(workdir)]
  if _STAGE is not None and os.path.abspath(os.fspath(workdir)) == _STAGE.local:
    out.append(_STAGE.remote)
  return out


def clear_status(workdir) -> None:
  """A run starts: neither COMPLETED nor FAILED until it ends (process 0 removes them)."""
  _CLEARED.update(_status_dirs(workdir))
  if process_index() != 0:
    return
  for d in _status_dirs(workdir):
    for name in MARKERS:
      (paths.path(d) / name).unlink(missing_ok=True)


def mark_complete(workdir, summary: Mapping) -> None:
  """The run ended well: COMPLETED holds its summary; a FAILED of an earlier attempt goes first. In a
  staged bucket workdir everything is pushed first, so COMPLETED never vouches for a file not there."""
  if process_index() != 0:
    return
  dirs = _status_dirs(workdir)
  _CLEARED.difference_update(dirs)  # ended: a later refusal in this process comes before a new start
  if len(dirs) > 1:
    _STAGE.push()
  for d in dirs:
    (paths.path(d) / FAILED_FILE).unlink(missing_ok=True)
    write_text(paths.path(d) / COMPLETE_FILE, json.dumps(summary, default=str))


def mark_failed(workdir, error: BaseException) -> None:
  """The run ended with `error`: FAILED says why. Nothing is marked when COMPLETED is there: a run
  clears it when it starts, so the error came before this run changed anything (a bad flag) or after
  it had ended (a tracker's upload), and the workdir is as complete as it was; nor for a rerun refused
  (`SettingsMismatch`) before it cleared its status; nor in a workdir that does not exist yet (a bucket
  prefix always may). A refusal raised after the run started (a nested job's) is a failure like any."""
  if process_index() != 0:
    return
  if error_is_settings_mismatch(error) and not _CLEARED.intersection(_status_dirs(workdir)):
    return  # refused before this run started: the workdir is as it was
  write_failed(workdir, f"{type(error).__name__}: {error}")


def write_failed(workdir, text: str) -> None:
  """FAILED holding `text`, on whichever process calls it (`mark_failed` is process 0's; the command
  line's own errors come before jax.distributed starts, when every process writes the same file)."""
  if not workdir:
    return
  dirs = _status_dirs(workdir)
  if len(dirs) > 1:
    _STAGE.push()
  for d in dirs:
    if (paths.is_remote(d) or paths.path(d).is_dir()) and not is_complete(d):
      write_text(paths.path(d) / FAILED_FILE, f"{text}\n")


def error_is_settings_mismatch(error: BaseException) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, SettingsMismatch):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


# ----------------------------------------------------------------------------- settings


def _neutral(value: Any) -> bool:
  """Off, empty or zero all through: what a setting added later is when left at its default."""
  if isinstance(value, Mapping):
    return all(_neutral(v) for v in value.values())
  return value is None or value is False or (not isinstance(value, bool) and value in (0, "", (), []))


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """'key.path: old -> new' for every leaf that differs. A key only one side has is no difference
  when its value is neutral (`_neutral`): a workdir written before a setting existed was written with
  it off, so a relaunch after an upgrade that adds one (at its default) is not refused."""
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    out = []
    for k in sorted(set(old) | set(new), key=str):
      if (k not in old and _neutral(new[k])) or (k not in new and _neutral(old[k])):
        continue
      out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_settings(workdir, current: Mapping, *, name: str = SETTINGS_FILE, what: str = "this workdir's runs",
                   may_change: str = "") -> bool:
  """Refuses (`SettingsMismatch`, nothing changed) a workdir whose `name` holds other settings than
  `current`; writes `current` there when it holds none. Returns whether the file existed.
  `may_change` says in the error which settings a rerun may change."""
  p = paths.path(workdir) / name
  current = portable(json.loads(json.dumps(current, sort_keys=True, default=str)))
  if p.exists():
    # A file written in this staged copy before its paths were recorded as the bucket's still matches.
    diffs = differences(portable(read_json(p)), current)
    if diffs:
      more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
      raise SettingsMismatch(f"{p} holds other settings ({'; '.join(diffs[:6])}{more}): {what} would not match "
                             f"them; use a new --workdir{f' ({may_change})' if may_change else ''}. Nothing was "
                             "changed")
    return True
  if process_index() == 0:
    write_json(p, current)
  return False


# ----------------------------------------------------------------------------- launches


def code_version(root: str | None = None) -> dict:
  """{commit, dirty} of the emjax source tree (git), or {commit: None} outside a git checkout."""
  root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                            check=True).stdout.strip()
    status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                            text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}
  return {"commit": commit, "dirty": bool(status.strip())}


def record_launch(workdir, job: str, argv: list[str] | None = None) -> dict:
  """Appends this launch to launches.jsonl (process 0): the code it ran, so every result can be traced
  to a version. A bucket object cannot be appended to: the file is rewritten with the row added."""
  row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "job": job,
         "argv": list(sys.argv if argv is None else argv), **code_version(), "host": socket.gethostname(),
         "processes": jax.process_count()}
  if process_index() == 0:
    p = paths.path(workdir) / LAUNCHES_FILE
    old = p.read_text() if p.exists() else ""
    write_text(p, old + json.dumps(row, sort_keys=True) + "\n")
  return row


# ----------------------------------------------------------------------------- a bucket workdir, staged


def scratch_dir(remote: str) -> str:
  """The local copy of bucket workdir `remote` (named scratch: $EMJAX_SCRATCH or ~/.cache/emjax/staging):
  a readable name and a digest of the exact path, so two workdirs never share one."""
  root = os.environ.get("EMJAX_SCRATCH") or os.path.join(os.path.expanduser("~"), ".cache", "emjax", "staging")
  remote = remote.rstrip("/")
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", remote)[-80:] + "-" + hashlib.sha256(remote.encode()).hexdigest()[:12]
  return os.path.abspath(os.path.join(root, name))


def _staged_name(rel: str) -> bool:
  """Whether a file is the stage's to carry: not a top-level marker (the status functions' own) and not a
  writer's temporary file (`x.tmp`, `.x.tmp`, `x.tmp.<pid>.<n>`), which is renamed or gone in a moment."""
  base = os.path.basename(rel)
  return rel not in MARKERS and not base.endswith(".tmp") and ".tmp." not in base


class Stopped(BaseException):
  """A staged job stopped by SIGTERM outside training (the training loop saves and raises its own):
  what it wrote is pushed, and the run is resumable, neither COMPLETED nor FAILED."""


class Stage:
  """A bucket workdir and its local copy: `pull` brings the bucket's files down, `push` sends the
  copy's changes up (new and changed files, then deletions; markers are the status functions')."""

  def __init__(self, remote: str, local: str):
    self.remote, self.local = remote.rstrip("/"), os.path.abspath(local)
    self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) as last pushed
    self._lock = threading.Lock()

  def _local_files(self) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(self.local):
      for f in files:
        full = os.path.join(dirpath, f)
        rel = os.path.relpath(full, self.local)
        if not _staged_name(rel):
          continue
        try:
          st = os.stat(full)
        except FileNotFoundError:  # renamed or deleted while we looked
          continue
        out[rel] = (st.st_size, st.st_mtime_ns)
    return out

  def pull(self) -> int:
    """Copies every object of the bucket workdir into the local copy; returns how many."""
    root, n = paths.path(self.remote), 0
    if not root.exists():
      return 0
    with self._lock:
      for rel in self._remote_files(root):
        if not _staged_name(rel):
          continue
        try:
          data = (root / rel).read_bytes()
        except FileNotFoundError:  # deleted since it was listed
          continue
        dst = os.path.join(self.local, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst + ".pull.tmp", "wb") as f:
          f.write(data)
        os.replace(dst + ".pull.tmp", dst)
        n += 1
        st = os.stat(dst)
        self._pushed[rel] = (st.st_size, st.st_mtime_ns)
    return n

  @staticmethod
  def _remote_files(root) -> list[str]:
    """The objects under `root`, relative to it. gpath has no recursive glob, and its walk names
    directories without the scheme: paths are taken relative to the first (the root as it names it)."""
    walk = list(root.walk())
    top = os.fspath(walk[0][0]) if walk else ""
    return [os.path.normpath(os.path.join(os.path.relpath(os.fspath(d), top), f)) for d, _, files in walk for f in files]

  def push(self) -> int:
    """Sends new and changed files to the bucket, then deletes there what the job deleted here; a
    sub-run's markers after everything else, so they never vouch for a file not yet there."""
    with self._lock:
      now = self._local_files()
      changed = [rel for rel, sig in now.items() if self._pushed.get(rel) != sig]
      changed.sort(key=lambda rel: os.path.basename(rel) in MARKERS)
      root = paths.path(self.remote)
      sent = 0
      for rel in changed:
        try:
          with open(os.path.join(self.local, rel), "rb") as f:
            data = f.read()
        except FileNotFoundError:  # replaced or deleted since the walk: the next push sees what is there
          continue
        (root / rel).write_bytes(data)
        self._pushed[rel] = now[rel]
        sent += 1
      gone = [rel for rel in self._pushed if rel not in now and not os.path.exists(os.path.join(self.local, rel))]
      for rel in gone:
        (root / rel).unlink(missing_ok=True)
        del self._pushed[rel]
    return sent + len(gone)


_STAGE: Stage | None = None


def _fresh(local: str) -> None:
  """An empty local copy: one left by an earlier session on this machine may hold files the bucket no
  longer has (or never got: a session killed before its push), which would come back as the job's. It
  is moved aside (kept, and said so), never pushed and never read."""
  if os.path.isdir(local) and os.listdir(local):
    aside = f"{local}.earlier-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.replace(local, aside)
    log.warning("%s held an earlier session's copy; it is kept in %s and the bucket's files are pulled afresh",
                local, aside)
  os.makedirs(local, exist_ok=True)


def portable(obj: Any) -> Any:
  """`obj` with every path inside the staged copy written as its bucket path (in any string that holds
  one): what a run records of its sub-runs' places (settings, a judge's identity) must not name this
  machine's scratch, or a relaunch with another $HOME or $EMJAX_SCRATCH (a fresh VM, a SLURM job's own
  temporary disk) would be refused."""
  stage = _STAGE
  if stage is None:
    return obj
  if isinstance(obj, str):  # a path, or a text that holds one (a judge's JSON options)
    if obj == stage.local:
      return stage.remote
    return obj.replace(stage.local + os.sep, stage.remote + "/")
  if isinstance(obj, Mapping):
    return {k: portable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [portable(v) for v in obj]
  return obj


def origin(workdir: str) -> str:
  """The workdir as the user named it: the bucket path when `workdir` is the staged local copy of a
  bucket workdir (inside `staged`), else `workdir` itself."""
  stage = _STAGE
  if stage is not None and os.path.abspath(workdir) == os.path.abspath(stage.local):
    return stage.remote
  return workdir


@contextlib.contextmanager
def staged(workdir: str, sync_seconds: float = SYNC_SECONDS) -> Iterator[str]:
  """The directory a job writes into: `workdir` itself when local, else its staged local copy (see
  the module docstring), pushed every `sync_seconds` and when the job ends, however it ends (a
  SIGTERM outside training raises `Stopped` so that the push happens).

  One process only: on several, each host's copy would hold its own part of what the job writes (a
  training sub-run's checkpoint shards), which one push cannot gather; such a job is refused with a
  bucket workdir (use a shared filesystem, or one process)."""
  global _STAGE
  if not paths.is_remote(workdir):
    yield workdir
    return
  if _STAGE is not None:
    if _STAGE.remote != workdir.rstrip("/"):
      raise ValueError(f"{workdir}: a staged job cannot stage another bucket workdir ({_STAGE.remote} is staged)")
    yield _STAGE.local
    return
  if jax.process_count() > 1:
    raise ValueError(f"--workdir={workdir}: this job writes plain files, which a bucket workdir stages on the local "
                     f"disk of one process; it runs on {jax.process_count()} processes. Run it on one process, or "
                     "give it a workdir on a filesystem every host shares")
  stage = Stage(workdir, scratch_dir(workdir))
  _fresh(stage.local)
  stage.pull()
  stop = threading.Event()

  def sync():
    while not stop.wait(sync_seconds):
      try:
        stage.push()
      except Exception as e:  # pylint: disable=broad-except -- the next push tries again
        log.warning("pushing %s to %s failed (tried again in %.0f s): %s", stage.local, stage.remote, sync_seconds, e)

  def on_sigterm(signum, frame):
    del signum, frame
    raise Stopped("SIGTERM: the job stopped; what it wrote is pushed to the bucket, rerun to resume")

  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, on_sigterm)
  _STAGE = stage
  thread = threading.Thread(target=sync, daemon=True, name="emjax-stage-sync")
  thread.start()
  log.info("workdir %s is staged in %s", stage.remote, stage.local)
  failed = True
  try:
    yield stage.local
    failed = False
  finally:
    stop.set()
    thread.join()
    _STAGE = None
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    try:
      stage.push()
    except Exception as e:  # pylint: disable=broad-except
      if not failed:
        raise
      # The job's own error (a preemption, a failure) is what the caller must see, not the push's.
      log.error("the last push of %s to %s failed: %s", stage.local, stage.remote, e)
