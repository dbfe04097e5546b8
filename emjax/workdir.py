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
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from typing import Any, Mapping

import jax

from emjax import paths

COMPLETE_FILE = "COMPLETED"
FAILED_FILE = "FAILED"
SETTINGS_FILE = "settings.json"
LAUNCHES_FILE = "launches.jsonl"


class SettingsMismatch(ValueError):
  """A rerun in a workdir written with other settings; raised before anything in it changes."""


def process_index() -> int:
  return jax.process_index()


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op with one process)."""
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
  return exists(paths.path(workdir) / COMPLETE_FILE)


def clear_status(workdir) -> None:
  """A run starts: neither COMPLETED nor FAILED until it ends (process 0 removes them)."""
  if process_index() != 0:
    return
  for name in (COMPLETE_FILE, FAILED_FILE):
    (paths.path(workdir) / name).unlink(missing_ok=True)


def mark_complete(workdir, summary: Mapping) -> None:
  """The run ended well: COMPLETED holds its summary; a FAILED of an earlier attempt goes first."""
  if process_index() != 0:
    return
  (paths.path(workdir) / FAILED_FILE).unlink(missing_ok=True)
  write_text(paths.path(workdir) / COMPLETE_FILE, json.dumps(summary, default=str))


def mark_failed(workdir, error: BaseException) -> None:
  """The run ended with `error`: FAILED says why. Nothing is marked when COMPLETED is there: a run
  clears it when it starts, so the error came before this run changed anything (a refused rerun, a
  bad flag) or after it had ended (a tracker's upload), and the workdir is as complete as it was;
  nor in a workdir that does not exist yet (a bucket prefix always may)."""
  if process_index() != 0 or error_is_settings_mismatch(error):
    return
  write_failed(workdir, f"{type(error).__name__}: {error}")


def write_failed(workdir, text: str) -> None:
  """FAILED holding `text`, on whichever process calls it (`mark_failed` is process 0's; the command
  line's own errors come before jax.distributed starts, when every process writes the same file)."""
  if workdir and (paths.is_remote(workdir) or paths.path(workdir).is_dir()) and not is_complete(workdir):
    write_text(paths.path(workdir) / FAILED_FILE, f"{text}\n")


def error_is_settings_mismatch(error: BaseException) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, SettingsMismatch):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


# ----------------------------------------------------------------------------- settings


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """'key.path: old -> new' for every leaf that differs."""
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    out = []
    for k in sorted(set(old) | set(new), key=str):
      out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_settings(workdir, current: Mapping, *, name: str = SETTINGS_FILE, what: str = "this workdir's runs",
                   may_change: str = "") -> bool:
  """Refuses (`SettingsMismatch`, nothing changed) a workdir whose `name` holds other settings than
  `current`; writes `current` there when it holds none. Returns whether the file existed.
  `may_change` says in the error which settings a rerun may change."""
  p = paths.path(workdir) / name
  current = json.loads(json.dumps(current, sort_keys=True, default=str))
  if p.exists():
    diffs = differences(read_json(p), current)
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
