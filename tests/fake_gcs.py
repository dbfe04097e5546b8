"""A gs:// bucket on the local disk for tests: epath (through fsspec) and orbax (through tensorstore).

Like GCS it refuses to append to an object and needs no directories before a write; everything
else is the local filesystem under `root/BUCKET/...`. Three seams are replaced: fsspec's `gs`
protocol (fsspec's registry of protocols), orbax's tensorstore path normalisation (so the
arrays go to the file driver under the same root) and orbax's query of the bucket's layout (which
needs google-cloud-storage and the network).
"""

import contextlib
import importlib
import os

import pytest


@contextlib.contextmanager
def fake_gcs(root: str):
  from etils.epath import backend as epath_backend
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

  class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):
      del args, kwargs  # gcsfs options (finalize_on_close, ...)
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      for prefix in ("gs://", "gcs://"):
        path = path.removeprefix(prefix)
      return path.rstrip("/")

    def open(self, path, mode="rb", **kwargs):
      if "a" in mode or "+" in mode:
        raise NotImplementedError(f"fake GCS: objects cannot be appended to or updated (mode {mode!r}, {path})")
      return super().open(path, mode, **kwargs)

  normalize = ts_utils._normalize_path  # pylint: disable=protected-access

  def local_normalize(path):
    path = str(path)
    if path.startswith("gs://"):
      path = os.path.join(root, path.removeprefix("gs://"))
    return normalize(path)

  registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
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
