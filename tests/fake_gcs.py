"""A gs:// bucket on the local disk for tests, with gcsfs's semantics: epath (through fsspec) and orbax.

Objects are files under `root/BUCKET/...`, but the filesystem registered for `gs://` behaves like gcsfs
over a bucket, not like a disk:

* There are no directories. A prefix "exists" (`exists`, `is_dir`, a listing) only while an object is
  under it: an empty prefix, or one whose last object was deleted, does not exist.
* `mkdir` / `makedirs` of a prefix do nothing (gcsfs creates buckets only), so a directory made "for"
  a later rename is not there, and epath's `rename`, which requires the destination's parent to exist,
  fails into a prefix that holds no object yet.
* An object appears whole when its writer closes (never half-written) and cannot be appended to or
  updated in place (`a` and `+` modes raise, as gcsfs's do).
* A rename (`mv`) of a prefix is a copy and a delete of each object under it, one by one (gcsfs);
  `rmdir` of a prefix does nothing, `rm` deletes objects.

Three seams of orbax are replaced: its tensorstore path normalisation (the arrays go to tensorstore's
file driver under the same root, so they are objects of this bucket too), and its query of the
bucket's layout (which needs google-cloud-storage and the network).
"""

import contextlib
import datetime
import importlib
import io
import os
import uuid

import pytest

_TMP_PREFIX = ".fakegcs-upload-"  # an upload in flight: never listed (an object appears when complete)


@contextlib.contextmanager
def fake_gcs(root: str):
  from etils.epath import backend as epath_backend
  from fsspec.implementations.local import trailing_sep
  from fsspec.spec import AbstractFileSystem
  from fsspec.utils import other_paths
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

  root = os.path.abspath(root)

  def local(path: str) -> str:
    return os.path.join(root, path)

  def has_objects(directory: str) -> bool:
    for _, _, files in os.walk(directory):
      if any(not f.startswith(_TMP_PREFIX) for f in files):
        return True
    return False

  def prune(directory: str) -> None:
    """Local directories left empty by a delete go too: the bucket has no such prefix any more."""
    while os.path.dirname(directory) != root and os.path.isdir(directory):  # never the bucket itself
      try:
        os.rmdir(directory)
      except OSError:  # not empty
        return
      directory = os.path.dirname(directory)

  def put(path: str, data: bytes) -> None:
    """One object, whole: written aside and renamed into place (no directory needs to exist)."""
    target = local(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = os.path.join(os.path.dirname(target), f"{_TMP_PREFIX}{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, target)

  class Upload(io.BytesIO):
    """A write: the object appears, complete, on close (gcsfs uploads on close)."""

    def __init__(self, path: str):
      super().__init__()
      self._path = path

    def close(self):
      if not self.closed:
        put(self._path, self.getvalue())
      super().close()

  class FakeGCS(AbstractFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""

    def __init__(self, *args, **kwargs):
      del args, kwargs  # gcsfs options (finalize_on_close, ...)
      super().__init__()

    @classmethod
    def _strip_protocol(cls, path):
      if isinstance(path, list):
        return [cls._strip_protocol(p) for p in path]
      path = os.fspath(path)
      for prefix in ("gs://", "gcs://"):
        path = path.removeprefix(prefix)
      return path.rstrip("/")

    # ------------------------------------------------------------------------- reading the bucket

    def _file_info(self, path: str) -> dict:
      st = os.stat(local(path))
      return {"name": path, "size": st.st_size, "type": "file",
              "mtime": datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)}

    @staticmethod
    def _dir_info(path: str) -> dict:
      return {"name": path, "size": 0, "type": "directory", "storageClass": "DIRECTORY"}

    def info(self, path, **kwargs):
      path = self._strip_protocol(path)
      p = local(path)
      if os.path.isfile(p) and not os.path.basename(p).startswith(_TMP_PREFIX):
        return self._file_info(path)
      if "/" not in path or (os.path.isdir(p) and has_objects(p)):  # every bucket exists; a prefix only with objects
        return self._dir_info(path)
      raise FileNotFoundError(path)

    def ls(self, path, detail=True, **kwargs):
      path = self._strip_protocol(path)
      entry = self.info(path)  # FileNotFoundError for an empty prefix, as gcsfs
      if entry["type"] == "file":
        out = [entry]
      else:
        out = []
        names = os.listdir(local(path)) if os.path.isdir(local(path)) else []  # an empty bucket
        for name in sorted(names):
          child, p = f"{path}/{name}", local(f"{path}/{name}")
          if name.startswith(_TMP_PREFIX):
            continue
          if os.path.isfile(p):
            out.append(self._file_info(child))
          elif has_objects(p):
            out.append(self._dir_info(child))
      return out if detail else [e["name"] for e in out]

    def modified(self, path):
      return self.info(path)["mtime"]

    def created(self, path):
      return self.info(path)["mtime"]

    # ------------------------------------------------------------------------- objects

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
      path = self._strip_protocol(path)
      if mode == "rb":
        if self.info(path)["type"] != "file":
          raise FileNotFoundError(path)
        return open(local(path), "rb")
      if mode == "wb":
        return Upload(path)
      raise NotImplementedError(f"fake GCS: objects cannot be appended to or updated (mode {mode!r}, {path})")

    def cp_file(self, path1, path2, **kwargs):
      path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
      if not os.path.isfile(local(path1)):
        raise FileNotFoundError(path1)  # a prefix is not an object: nothing to copy
      with open(local(path1), "rb") as f:
        put(path2, f.read())

    def rm_file(self, path):
      path = self._strip_protocol(path)
      if not os.path.isfile(local(path)):
        raise FileNotFoundError(path)
      os.remove(local(path))
      prune(os.path.dirname(local(path)))

    _rm = rm_file

    def rm(self, path, recursive=False, maxdepth=None):
      """Deletes the objects `path` names (all under it with `recursive`); FileNotFoundError if none."""
      deleted = 0
      for p in self.expand_path(path, recursive=recursive, maxdepth=maxdepth):
        try:
          self.rm_file(p)
          deleted += 1
        except FileNotFoundError:  # a prefix in the expansion
          pass
      if not deleted:
        raise FileNotFoundError(path)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
      """gcsfs's move: each object under `path1` copied to its name under `path2`, then deleted."""
      if path1 == path2:
        return
      paths1 = self.expand_path(path1, recursive=recursive, maxdepth=maxdepth)
      if not recursive:
        paths1 = [p for p in paths1 if not self.isdir(p)]
        if not paths1:
          return
      path2 = self._strip_protocol(path2) + ("/" if trailing_sep(os.fspath(path2)) else "")
      exists = (trailing_sep(path2) or self.isdir(path2)) and not trailing_sep(os.fspath(path1))
      for p1, p2 in zip(paths1, other_paths(paths1, path2, exists=exists, flatten=False)):
        if os.path.isfile(local(p1)):
          self.cp_file(p1, p2)
          self.rm_file(p1)

    rename = mv

    # ------------------------------------------------------------------------- "directories"

    def mkdir(self, path, create_parents=True, **kwargs):
      path = self._strip_protocol(path)
      if "/" not in path:
        raise FileExistsError(path)  # every bucket of the fake exists
      # a prefix: nothing to make (gcsfs: "GCS doesn't have real directories")

    def makedirs(self, path, exist_ok=False):
      pass  # gcsfs (fsspec's async default): nothing

    def rmdir(self, path):
      pass  # gcsfs deletes buckets only; a prefix has nothing to remove

  registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
  normalize = ts_utils._normalize_path  # pylint: disable=protected-access

  def local_normalize(path):
    path = str(path)
    if path.startswith("gs://"):
      path = os.path.join(root, path.removeprefix("gs://"))
    return normalize(path)

  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("EPATH_USE_TF", "false")  # epath would take TensorFlow's gfile when it is installed
    for p in FakeGCS.protocol:
      mp.setitem(registry, p, FakeGCS)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    mp.setattr(ts_utils, "_normalize_path", local_normalize)
    mp.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    try:
      yield
    finally:
      epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
      FakeGCS.clear_instance_cache()
