"""One path type for what a job writes: a local directory or a bucket (gs://, s3://) alike.

`etils.epath.Path` is orbax's own path type; it reaches gs:// through TensorFlow's gfile when
TensorFlow is installed and through fsspec (gcsfs, in the `tpu` extra) otherwise. The training
job's outputs under its workdir (config.json, metrics.jsonl, eval.jsonl, TensorBoard events, the
checkpoints, FAILED / COMPLETED) all go through it, so `--workdir=gs://bucket/run` is a workdir
like any other; a multi-host TPU slice needs one, since every worker must see the same checkpoints.

An object in a bucket cannot be appended to, which a disk file can: `AppendLog` (the .jsonl logs)
and the TensorBoard writer registered here rewrite the whole object instead, every so often and on
close. A preempted run loses at most those last seconds of rows, and a resumed run recomputes them
anyway (it restarts from its last checkpoint and sets later rows aside).
"""

from __future__ import annotations

import io
import os
import time

from etils import epath

# The schemes epath reaches through a remote filesystem; anything else is a local path.
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def is_remote(path: epath.PathLike) -> bool:
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def path(p: epath.PathLike) -> epath.Path:
  """`p` as an epath.Path: a bucket path as it is, a local one with `~` expanded (kept relative)."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.expanduser(p))


def absolute(p: epath.PathLike) -> epath.Path:
  """`path(p)`, made absolute when local (orbax needs absolute local paths)."""
  q = path(p)
  return q if is_remote(q) else epath.Path(os.path.abspath(os.fspath(q)))


def write_text(p: epath.PathLike, text: str) -> None:
  """Writes a whole file; on a local disk through a temporary name, so a kill leaves the old one whole.

  (An object store's write is atomic already: the object appears when it is complete.)
  """
  target = path(p)
  if is_remote(target):
    target.write_text(text)
    return
  tmp = target.parent / f".{target.name}.tmp"
  tmp.write_text(text)
  tmp.replace(target)


class AppendLog:
  """A text file that grows line by line (metrics.jsonl, eval.jsonl).

  On a local disk each `write` is appended and flushed, so a killed run keeps every row written.
  In a bucket the text is kept here and the whole object rewritten at most every `sync_secs`, and
  on `close`.
  """

  def __init__(self, p: epath.PathLike, sync_secs: float = 30.0):
    self.path = path(p)
    self.remote = is_remote(self.path)
    self._sync_secs = sync_secs
    if self.remote:
      self._text = io.StringIO()
      if self.path.exists():
        self._text.write(self.path.read_text())
      self._dirty = False
      self._synced = time.monotonic()
    else:
      self._file = self.path.open("a")

  def write(self, text: str) -> None:
    if not self.remote:
      self._file.write(text)
      self._file.flush()
      return
    self._text.write(text)
    self._dirty = True
    if time.monotonic() - self._synced >= self._sync_secs:
      self.sync()

  def sync(self) -> None:
    if self.remote and self._dirty:
      self.path.write_text(self._text.getvalue())
      self._dirty = False
      self._synced = time.monotonic()

  def close(self) -> None:
    if self.remote:
      self.sync()
    else:
      self._file.close()


class _RewrittenObject:
  """tensorboardX's record-file interface over one bucket object, rewritten whole on every flush."""

  def __init__(self, p: str):
    self._path = path(p)
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EventFileFactory:

  def open(self, p: str) -> _RewrittenObject:
    return _RewrittenObject(p)

  def directory_check(self, p: str) -> None:
    del p  # a bucket has no directories to create


def register_tensorboard_schemes() -> None:
  """TensorBoard event files in buckets go through epath too.

  tensorboardX's own gs:// writer needs google-cloud-storage and its s3:// one boto3; this one has
  their semantics (the file is rewritten whole on every flush: objects cannot be appended to) over
  the same path type as everything else the job writes.
  """
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  for scheme in REMOTE_SCHEMES:
    record_writer.register_writer_factory(scheme.removesuffix("://"), _EventFileFactory())
