"""A gs:// workdir: the training job writes, resumes and is read back through emjax.paths (a fake bucket)."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from fake_gcs import fake_gcs
from emjax import paths

WORKDIR = "gs://bucket/run"


def _config(steps):
  c = tiny_config(steps=steps)
  c.eval.update(every_steps=2, batches=1)
  return c


def _rows(path):
  return [json.loads(line) for line in open(path)]


def _tensorboard_scalars(path) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of one event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2

  data, pos, out = open(path, "rb").read(), 0, {}
  while pos < len(data):
    n = int.from_bytes(data[pos:pos + 8], "little")
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in event.summary.value:
      out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


@pytest.fixture(scope="module")
def bucket_run(tmp_path_factory):
  """Four steps into gs://bucket/run, then the same run continued to six (a resume from step 4)."""
  from emjax.train import loop

  root, cwd = tmp_path_factory.mktemp("gcs"), tmp_path_factory.mktemp("cwd")
  run = root / "bucket" / "run"
  with fake_gcs(str(root)), pytest.MonkeyPatch.context() as mp:
    # A local os.* call on "gs://bucket/run/..." would land under the working directory as gs:/bucket/...
    mp.chdir(cwd)
    first = loop.train(_config(4), WORKDIR, show_progress=False)
    after_first = {name: (run / name).read_text() for name in ("metrics.jsonl", "eval.jsonl", "config.json")}
    second = loop.train(_config(6), WORKDIR, show_progress=False)
    from emjax import weights
    source = weights.resolve(WORKDIR, key="config.init.checkpoint")
    source_steps = source.steps()
    loaded = weights.load_weights(WORKDIR)
  return dict(root=root, run=run, cwd=cwd, first=first, second=second, after_first=after_first, source=source,
              source_steps=source_steps, loaded=loaded)


def test_every_output_lands_in_the_bucket_and_none_beside_it(bucket_run):
  run = bucket_run["run"]
  assert os.listdir(bucket_run["cwd"]) == []
  assert os.listdir(bucket_run["root"]) == ["bucket"]
  names = set(os.listdir(run))
  assert {"config.json", "config.json.1", "metrics.jsonl", "eval.jsonl", "COMPLETED", "tensorboard",
          "checkpoints"} <= names, names
  assert "FAILED" not in names
  assert json.loads((run / "COMPLETED").read_text())["step"] == 6
  assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()) == [2, 4, 6]
  # Each run's resolved config: the first one kept beside the second's.
  assert json.loads((run / "config.json.1").read_text())["train"]["steps"] == 4
  assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
  assert bucket_run["after_first"]["config.json"] == (run / "config.json.1").read_text()


def test_the_resumed_run_continues_the_logs_from_its_checkpoint(bucket_run):
  run, before = bucket_run["run"], bucket_run["after_first"]
  rows = _rows(run / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  # Steps 1-4 are the first run's rows, untouched: the second run resumed at step 4 instead of starting over.
  assert (run / "metrics.jsonl").read_text().startswith(before["metrics.jsonl"])
  assert rows[-1]["loss"] == pytest.approx(bucket_run["second"]["loss"])
  assert [r["step"] for r in _rows(run / "eval.jsonl")] == [0, 2, 4, 6]
  assert (run / "eval.jsonl").read_text().startswith(before["eval.jsonl"])


def test_tensorboard_events_are_written_into_the_bucket(bucket_run):
  tb = bucket_run["run"] / "tensorboard"
  files = sorted(tb.iterdir())
  assert len(files) == 2  # one per run
  scalars = {}
  for f in files:
    for tag, by_step in _tensorboard_scalars(f).items():
      scalars.setdefault(tag, {}).update(by_step)
  losses = {r["step"]: r["loss"] for r in _rows(bucket_run["run"] / "metrics.jsonl")}
  assert scalars["loss"] == pytest.approx(losses)
  assert sorted(scalars["eval_loss"]) == [0, 2, 4, 6]


def test_a_bucket_run_is_a_weights_source(bucket_run):
  """An SFT or sampling job can start from a run in a bucket (config.init.checkpoint=gs://...)."""
  src, loaded = bucket_run["source"], bucket_run["loaded"]
  assert (src.kind, src.directory, bucket_run["source_steps"]) == ("emjax", WORKDIR, [2, 4, 6])
  assert src.model_cfg.d_model == 32
  assert loaded.step == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(loaded.params))


def test_append_log_rewrites_a_bucket_object_only_on_sync_and_close(tmp_path):
  with fake_gcs(str(tmp_path)):
    log = paths.AppendLog("gs://bucket/log.jsonl", sync_secs=3600)
    log.write("a\n")
    log.write("b\n")
    assert not (tmp_path / "bucket" / "log.jsonl").exists()
    log.sync()
    assert (tmp_path / "bucket" / "log.jsonl").read_text() == "a\nb\n"
    log.write("c\n")
    log.close()
    assert (tmp_path / "bucket" / "log.jsonl").read_text() == "a\nb\nc\n"
    # Reopened (a resumed run), it continues the object.
    log = paths.AppendLog("gs://bucket/log.jsonl", sync_secs=0)
    log.write("d\n")  # sync_secs=0: every write rewrites the object
    assert (tmp_path / "bucket" / "log.jsonl").read_text() == "a\nb\nc\nd\n"
    log.close()


def test_append_log_on_a_disk_keeps_every_row_as_it_is_written(tmp_path):
  log = paths.AppendLog(tmp_path / "log.jsonl")
  log.write("a\n")
  assert (tmp_path / "log.jsonl").read_text() == "a\n"  # flushed, before close: a kill keeps it
  log.close()
  log = paths.AppendLog(tmp_path / "log.jsonl")
  log.write("b\n")
  log.close()
  assert (tmp_path / "log.jsonl").read_text() == "a\nb\n"


def test_paths_keep_a_bucket_path_and_make_a_local_one_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.absolute("gs://b/x/y")) == "gs://b/x/y"
  assert os.fspath(paths.path("gs://b/x") / "c") == "gs://b/x/c"
  assert os.fspath(paths.absolute("rel")) == os.path.join(str(tmp_path), "rel")
  assert os.fspath(paths.path("rel")) == "rel"
  assert paths.is_remote("gs://b") and paths.is_remote("s3://b") and not paths.is_remote("/gs/b")
