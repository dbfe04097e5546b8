"""One path type for what a job writes: a local directory or a bucket (gs://, s3://) alike.

`etils.epath.Path` is orbax's own path type; it reaches gs:// through TensorFlow's gfile when
TensorFlow is installed and through fsspec (gcsfs, in the `tpu` extra) otherwise. The training
job's outputs under its workdir (config.json, metrics.jsonl, eval.jsonl, TensorBoard events, the
checkpoints, FAILED / COMPLETED) all go through it, so `--workdir=gs://bucket/run` is a workdir
like any other; a multi-host TPU slice needs one, since every worker must see the same checkpoints.

A bucket is not a disk: it has no directories (gcsfs's `mkdir` of a prefix does nothing, and a prefix
exists only while an object is under it), an object cannot be appended to, and a "rename" of a prefix
is a copy and a delete of each object. What this module offers works on both:

* `write_text`: a whole file, atomically (a kill leaves the old file or the new one).
* `move_tree`: a directory (a prefix) moved to a new name, with no directory needed before it.
* Logs that grow row by row (metrics.jsonl, eval.jsonl): `AppendLog` writes them, `read_log` reads
  one back, rows in order, and `replace_log` rewrites one whole (atomically). On a local disk a log is
  one file, appended to and flushed per row. In a bucket each flush (at most every `sync_secs`, and on
  close) is a new *segment* object, never a rewrite of what is there:

      metrics.jsonl.d/00000001.jsonl, 00000002.jsonl, ...   rows, in the order of their numbers
      metrics.jsonl.d/00000007.whole.jsonl                   the whole log (`replace_log`): it and the
                                                             segments after it are the log; what came
                                                             before it (and metrics.jsonl) is not
      metrics.jsonl                                          a log's start written whole (by a disk,
                                                             or by an older emjax), read before the
                                                             segments when no whole segment exists

  A preempted run loses at most its last `sync_secs` of rows, and a resumed run recomputes them
  anyway (it restarts from its last checkpoint and sets later rows aside). Read a log through
  `read_log` only: in a bucket `metrics.jsonl` alone is not the log.

TensorBoard's event files in a bucket (`register_tensorboard_schemes`) grow the same way: each of
tensorboardX's flushes (every two minutes by default, and on close) writes what came since the last
one as a new object, `events.out.tfevents.<time>.<host>.00000001`, `.00000002`, ... . Each holds whole
records, and TensorBoard reads every events file of a directory, in the order of their names, as one run.
"""

from __future__ import annotations

import concurrent.futures
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
  tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"  # processes of one host may write the same file
  tmp.write_text(text)
  tmp.replace(target)


def move_tree(src: epath.PathLike, dst: epath.PathLike) -> None:
  """Moves the directory `src` to `dst`, which must not exist; `dst`'s parent need not exist either.

  On a local disk it is one rename. A bucket has no directories, so epath's rename (which wants the
  destination's parent to exist, and gcsfs's `mkdir` of a prefix makes nothing) cannot be used: every
  object under `src` is copied (server-side) to its name under `dst`, and only when all are copied are
  the originals deleted, so a kill leaves everything under `src` (with a partial copy under `dst`),
  never objects under neither.
  """
  src, dst = path(src), path(dst)
  if dst.exists():
    raise FileExistsError(f"{dst} already exists; {src} was not moved")
  fs = _bucket_filesystem(src) if is_remote(src) else None
  if fs is None:  # a local directory, or a bucket through TensorFlow's gfile (which renames prefixes itself)
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    return
  prefix = os.fspath(src).split("://", 1)[1].rstrip("/") + "/"
  target = os.fspath(dst).rstrip("/") + "/"
  names = [n for n in fs.find(os.fspath(src)) if n.startswith(prefix)]
  if not names:
    raise FileNotFoundError(f"{src}: no object under it to move")
  scheme = os.fspath(src).split("://", 1)[0] + "://"
  fs.copy([scheme + n for n in names], [target + n[len(prefix):] for n in names])
  fs.rm([scheme + n for n in names])


def _bucket_filesystem(p: epath.Path):
  """The fsspec filesystem epath reaches `p`'s bucket through (gcsfs for gs://), or None without one."""
  try:
    from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top
    return epath_backend.fsspec_backend.fs(os.fspath(p))
  except (ImportError, ValueError):  # no gcsfs / s3fs: epath goes through TensorFlow's gfile
    return None


# ----------------------------------------------------------------------------- logs

_SEGMENTS = ".d"  # metrics.jsonl -> metrics.jsonl.d/
_WHOLE = "whole"
_COMPACT_AT = 200  # segments: more, and a new AppendLog starts with one whole segment of them


def _segment_dir(p: epath.Path) -> epath.Path:
  return p.parent / f"{p.name}{_SEGMENTS}"


def _segments(p: epath.Path) -> list[tuple[int, bool, epath.Path]]:
  """(number, whether it is a whole log, path) of the log's segments, in order; [] if it has none."""
  try:
    entries = list(_segment_dir(p).iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return []
  out = []
  for e in entries:
    number, _, rest = e.name.partition(".")
    if number.isdigit():  # anything else (a local write's temporary .NAME.tmp) is not a segment
      out.append((int(number), rest.split(".")[0] == _WHOLE, e))
  return sorted(out, key=lambda x: (x[0], x[1]))


def _write_segment(p: epath.Path, number: int, text: str, *, whole: bool = False) -> None:
  ext = os.path.splitext(p.name)[1]
  seg = _segment_dir(p) / f"{number:08d}{'.' + _WHOLE if whole else ''}{ext}"
  if not is_remote(seg):
    seg.parent.mkdir(parents=True, exist_ok=True)
  write_text(seg, text)


def _live(p: epath.Path, segments: list) -> tuple[bool, list]:
  """(whether the log's start object `p` is part of the log, the segments that are) of a listing."""
  wholes = [i for i, s in enumerate(segments) if s[1]]
  return (False, segments[wholes[-1]:]) if wholes else (True, segments)


def log_exists(p: epath.PathLike) -> bool:
  """Whether the log `p` (see `read_log`) has been written at all."""
  p = path(p)
  return p.exists() or bool(_segments(p))


def read_log(p: epath.PathLike) -> str:
  """The text of the log `p` (metrics.jsonl, eval.jsonl), every row in the order written; "" if none.

  The one way to read a log `AppendLog` wrote: on a local disk it is the file; in a bucket its
  segments (see the module docstring), which `p` alone does not hold.
  """
  p = path(p)
  for attempt in range(3):  # a segment listed but gone: a `replace_log` ran meanwhile; list again
    with_start, segments = _live(p, _segments(p))
    try:
      start = ""
      if with_start:
        try:
          start = p.read_text()
        except (FileNotFoundError, IsADirectoryError):
          pass
      if len(segments) > 1 and is_remote(p):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
          texts = list(pool.map(lambda s: s[2].read_text(), segments))
      else:
        texts = [s[2].read_text() for s in segments]
      return start + "".join(texts)
    except FileNotFoundError:
      if attempt == 2:
        raise
  raise AssertionError("unreachable")


def replace_log(p: epath.PathLike, text: str) -> None:
  """Rewrites the log `p` whole, atomically: a reader sees the old log or the new one, never a mix.

  A log without segments (any local one) is rewritten like any file (`write_text`); a log with
  segments gets a whole segment, which supersedes everything before it, and then the superseded
  objects are deleted (a kill before that leaves them unread, not misread).
  """
  p = path(p)
  segments = _segments(p)
  if not segments:
    write_text(p, text)
    return
  _write_segment(p, segments[-1][0] + 1, text, whole=True)
  for _, _, seg in segments:
    seg.unlink(missing_ok=True)
  p.unlink(missing_ok=True)


class AppendLog:
  """A text log that grows line by line (metrics.jsonl, eval.jsonl); read it back with `read_log`.

  On a local disk each `write` is appended and flushed, so a killed run keeps every row written. In a
  bucket, where an object cannot be appended to, the rows are kept here and written as a new segment
  object at most every `sync_secs`, and on `sync` and `close`: one object per flush, never a rewrite
  of what is there (a log that has gathered many segments is rewritten whole once, when it is opened).
  """

  def __init__(self, p: epath.PathLike, sync_secs: float = 30.0):
    self.path = path(p)
    segments = _segments(self.path)
    # Segments also where a local log has them (a bucket's workdir copied to a disk): rows stay in order.
    self.segmented = is_remote(self.path) or bool(segments)
    self._sync_secs = sync_secs
    if self.segmented:
      if len(segments) > _COMPACT_AT:
        replace_log(self.path, read_log(self.path))
        segments = _segments(self.path)
      self._next = segments[-1][0] + 1 if segments else 1
      self._pending: list[str] = []
      self._synced = time.monotonic()
    else:
      self._file = self.path.open("a")

  def write(self, text: str) -> None:
    if not self.segmented:
      self._file.write(text)
      self._file.flush()
      return
    self._pending.append(text)
    if time.monotonic() - self._synced >= self._sync_secs:
      self.sync()

  def sync(self) -> None:
    if self.segmented and self._pending:
      _write_segment(self.path, self._next, "".join(self._pending))
      self._next += 1
      self._pending = []
      self._synced = time.monotonic()

  def close(self) -> None:
    if self.segmented:
      self.sync()
    else:
      self._file.close()


class _SegmentedEvents:
  """tensorboardX's record-file interface over a bucket: each flush writes the records since the last
  one as a new object (`<path>.<n>`), so a run's flushes cost the bytes written, not the file's size
  each time (an object cannot be appended to)."""

  def __init__(self, p: str):
    self._path = path(p)
    self._buffer = io.BytesIO()
    self._next = 1

  def write(self, data: bytes) -> None:
    # A record's writes and a flush hold one lock of tensorboardX's EventsWriter: a flush never splits a record.
    self._buffer.write(data)

  def flush(self) -> None:
    data = self._buffer.getvalue()
    if not data:
      return
    self._path.with_name(f"{self._path.name}.{self._next:08d}").write_bytes(data)
    self._next += 1
    self._buffer = io.BytesIO()

  def close(self) -> None:
    self.flush()


class _EventFileFactory:

  def open(self, p: str) -> _SegmentedEvents:
    return _SegmentedEvents(p)

  def directory_check(self, p: str) -> None:
    del p  # a bucket has no directories to create


def register_tensorboard_schemes() -> None:
  """TensorBoard event files in buckets go through epath too.

  tensorboardX's own gs:// writer needs google-cloud-storage and its s3:// one boto3, and both upload
  the whole file again on every flush (objects cannot be appended to): a run's uploads grow with the
  square of its length. This one writes each flush's records as a new object (`_SegmentedEvents`) over
  the same path type as everything else the job writes.
  """
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  for scheme in REMOTE_SCHEMES:
    record_writer.register_writer_factory(scheme.removesuffix("://"), _EventFileFactory())
