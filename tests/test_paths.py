"""emjax.paths in a bucket: TensorBoard's events grow by a new object per flush, never by rewriting one."""

import os

from fake_gcs import fake_gcs
from emjax import paths


def _records(data: bytes) -> list[bytes]:
  """The payloads of TFRecord framing (length, crc, data, crc); fails on a cut record."""
  out, pos = [], 0
  while pos < len(data):
    n = int.from_bytes(data[pos:pos + 8], "little")
    assert pos + 12 + n + 4 <= len(data), "a record cut across objects"
    out.append(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
  return out


def test_tensorboard_events_in_a_bucket_are_one_new_object_per_flush(tmp_path, monkeypatch):
  from tensorboardX import SummaryWriter
  from tensorboardX.proto import event_pb2

  tb = tmp_path / "bucket" / "run" / "tensorboard"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # a local write of "gs://..." would land here as gs:/...
  with fake_gcs(str(tmp_path)):
    paths.register_tensorboard_schemes()
    writer = SummaryWriter("gs://bucket/run/tensorboard", flush_secs=3600)
    seen, sizes = {}, []
    for step in range(1, 31):
      writer.add_scalar("loss", 1.0 / step, step)
      if step % 10 == 0:
        writer.flush()
        now = {f: (os.stat(tb / f).st_ino, os.stat(tb / f).st_mtime_ns) for f in os.listdir(tb)}
        assert {f: now[f] for f in seen} == seen  # the objects of earlier flushes are untouched
        assert len(now) > len(seen)
        seen = now
    writer.close()
  assert os.listdir(cwd) == []
  files = sorted(os.listdir(tb))
  assert len({f.rsplit(".", 1)[0] for f in files}) == 1 and all(f.rsplit(".", 1)[1].isdigit() for f in files)
  sizes = [os.path.getsize(tb / f) for f in files]
  # Each object holds what came since the last flush: the bytes written are the events', once.
  events = [event_pb2.Event.FromString(r) for f in files for r in _records((tb / f).read_bytes())]
  assert sum(sizes) == sum(len(e.SerializeToString()) + 16 for e in events)
  assert events[0].file_version.startswith("brain.Event")
  losses = {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == "loss"}
  assert sorted(losses) == list(range(1, 31)) and losses[4] == 0.25
