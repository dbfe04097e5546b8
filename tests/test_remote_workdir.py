"""A gs:// workdir: the training job writes, resumes and is read back through emjax.paths (a fake bucket)."""

import json
import os
import shutil

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
  """The rows of a log, through the one function that reads logs (a bucket's are segment objects)."""
  return [json.loads(line) for line in paths.read_log(path).splitlines()]


def _objects(directory) -> dict[str, tuple[int, int]]:
  """{name: (inode, mtime)} of the objects under a fake bucket's directory: a rewritten object changes both."""
  out = {}
  for d, _, files in os.walk(directory):
    for f in files:
      st = os.stat(os.path.join(d, f))
      out[os.path.relpath(os.path.join(d, f), directory)] = (st.st_ino, st.st_mtime_ns)
  return out


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
    after_first = {name: paths.read_log(f"{WORKDIR}/{name}") for name in ("metrics.jsonl", "eval.jsonl")}
    after_first["config.json"] = (run / "config.json").read_text()
    log_objects = {name: _objects(run / f"{name}.d") for name in ("metrics.jsonl", "eval.jsonl")}
    second = loop.train(_config(6), WORKDIR, show_progress=False)
    from emjax import weights
    source = weights.resolve(WORKDIR, key="config.init.checkpoint")
    source_steps = source.steps()
    loaded = weights.load_weights(WORKDIR)
  return dict(root=root, run=run, cwd=cwd, first=first, second=second, after_first=after_first, source=source,
              source_steps=source_steps, loaded=loaded, log_objects=log_objects)


def test_every_output_lands_in_the_bucket_and_none_beside_it(bucket_run):
  run = bucket_run["run"]
  assert os.listdir(bucket_run["cwd"]) == []
  assert os.listdir(bucket_run["root"]) == ["bucket"]
  names = set(os.listdir(run))
  # The logs are segment objects (metrics.jsonl.d/00000001.jsonl, ...): a bucket object cannot be appended to.
  assert {"config.json", "config.json.1", "metrics.jsonl.d", "eval.jsonl.d", "COMPLETED", "tensorboard",
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
  assert paths.read_log(run / "metrics.jsonl").startswith(before["metrics.jsonl"])
  assert rows[-1]["loss"] == pytest.approx(bucket_run["second"]["loss"])
  assert [r["step"] for r in _rows(run / "eval.jsonl")] == [0, 2, 4, 6]
  assert paths.read_log(run / "eval.jsonl").startswith(before["eval.jsonl"])


def test_the_logs_in_a_bucket_grow_by_new_objects_never_by_rewriting_one(bucket_run):
  run = bucket_run["run"]
  for name, first in bucket_run["log_objects"].items():
    assert first, name  # the first run's rows are in segment objects
    now = _objects(run / f"{name}.d")
    assert {k: now[k] for k in first} == first, name  # the resumed run wrote beside them, not over them
    assert len(now) > len(first), name
  assert not (run / "metrics.jsonl").exists() and not (run / "eval.jsonl").exists()


def test_tensorboard_events_are_written_into_the_bucket(bucket_run):
  tb = bucket_run["run"] / "tensorboard"
  files = sorted(tb.iterdir())
  assert len({f.name.rsplit(".", 1)[0] for f in files}) == 2  # one events file per run, one object per flush
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


def test_append_log_in_a_bucket_adds_one_object_per_flush_and_reads_back_in_order(tmp_path):
  log_dir = tmp_path / "bucket" / "log.jsonl.d"
  with fake_gcs(str(tmp_path)):
    log = paths.AppendLog("gs://bucket/log.jsonl", sync_secs=3600)
    log.write("a\n")
    log.write("b\n")
    assert paths.read_log("gs://bucket/log.jsonl") == "" and not paths.log_exists("gs://bucket/log.jsonl")
    log.sync()
    assert paths.read_log("gs://bucket/log.jsonl") == "a\nb\n"
    first = _objects(log_dir)
    assert len(first) == 1
    log.write("c\n")
    log.close()
    assert paths.read_log("gs://bucket/log.jsonl") == "a\nb\nc\n"
    # Reopened (a resumed run), it continues the log; every flush is one new object, the old ones untouched.
    log = paths.AppendLog("gs://bucket/log.jsonl", sync_secs=0)
    for row in "defghijkl":  # more than 9 segments: their numbers order them
      log.write(f"{row}\n")  # sync_secs=0: every write is flushed
    log.close()
    assert paths.read_log("gs://bucket/log.jsonl") == "".join(f"{row}\n" for row in "abcdefghijkl")
    now = _objects(log_dir)
    assert len(now) == 11 and {k: now[k] for k in first} == first
    assert not (tmp_path / "bucket" / "log.jsonl").exists()
    assert paths.log_exists("gs://bucket/log.jsonl")


def test_a_log_replaced_whole_reads_back_as_the_new_text_even_if_cut_short(tmp_path, monkeypatch):
  """`replace_log` (a resumed run setting later rows aside) is atomic in a bucket: a whole-log segment first,
  then the objects it supersedes deleted; a kill between the two leaves them unread."""
  from etils import epath
  with fake_gcs(str(tmp_path)):
    log = paths.AppendLog("gs://bucket/m.jsonl", sync_secs=0)
    for row in ("1\n", "2\n", "3\n"):
      log.write(row)
    log.close()
    with monkeypatch.context() as mp:
      def killed(self, missing_ok=False):
        raise KeyboardInterrupt("killed")
      mp.setattr(type(epath.Path("gs://bucket/m.jsonl")), "unlink", killed)
      with pytest.raises(KeyboardInterrupt):
        paths.replace_log("gs://bucket/m.jsonl", "1\n")
    assert paths.read_log("gs://bucket/m.jsonl") == "1\n"
    paths.replace_log("gs://bucket/m.jsonl", "1\n2\n")
    assert sorted(os.listdir(tmp_path / "bucket" / "m.jsonl.d")) == ["00000005.whole.jsonl"]
    log = paths.AppendLog("gs://bucket/m.jsonl", sync_secs=0)
    log.write("3\n")
    log.close()
    assert paths.read_log("gs://bucket/m.jsonl") == "1\n2\n3\n"
    # A log written whole as one object (an older emjax; a disk's file copied to a bucket) is read first.
    (tmp_path / "bucket" / "old.jsonl").write_text("1\n")
    log = paths.AppendLog("gs://bucket/old.jsonl", sync_secs=0)
    log.write("2\n")
    log.close()
    assert paths.read_log("gs://bucket/old.jsonl") == "1\n2\n"


def test_a_bucket_log_copied_to_a_disk_reads_and_grows_in_order(tmp_path):
  with fake_gcs(str(tmp_path / "gcs")):
    log = paths.AppendLog("gs://bucket/m.jsonl", sync_secs=0)
    log.write("1\n")
    log.write("2\n")
    log.close()
  copy = tmp_path / "copy"
  shutil.copytree(tmp_path / "gcs" / "bucket", copy)
  assert paths.read_log(copy / "m.jsonl") == "1\n2\n"
  log = paths.AppendLog(copy / "m.jsonl")
  log.write("3\n")
  log.close()
  assert paths.read_log(copy / "m.jsonl") == "1\n2\n3\n"
  paths.replace_log(copy / "m.jsonl", "1\n")
  assert paths.read_log(copy / "m.jsonl") == "1\n"


def test_rows_after_the_resumed_step_are_set_aside_in_a_bucket_too(tmp_path):
  from emjax.train import loop
  with fake_gcs(str(tmp_path)), pytest.MonkeyPatch.context() as mp:
    mp.chdir(tmp_path)
    log = paths.AppendLog(f"{WORKDIR}/metrics.jsonl", sync_secs=0)
    for step in range(1, 7):
      log.write(json.dumps({"step": step}) + "\n")
    log.close()
    loop.MetricsWriter(WORKDIR, resume_step=4).close()  # a run resumed from step 4's checkpoint
    assert [r["step"] for r in _rows(f"{WORKDIR}/metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in _rows(f"{WORKDIR}/metrics.jsonl.after_step_4")] == [5, 6]


def test_move_tree_moves_every_object_of_a_prefix_in_a_bucket(tmp_path):
  src = tmp_path / "bucket" / "a" / "4"
  for name in ("x", "sub/y"):
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_text(name)
  with fake_gcs(str(tmp_path)):
    paths.move_tree("gs://bucket/a/4", "gs://bucket/a_aside/4")  # no a_aside/ before: a bucket has none
    with pytest.raises(FileExistsError):
      paths.move_tree("gs://bucket/a_aside/4", "gs://bucket/a_aside/4")
  assert not (tmp_path / "bucket" / "a").exists()
  assert (tmp_path / "bucket" / "a_aside" / "4" / "sub" / "y").read_text() == "sub/y"
  paths.move_tree(tmp_path / "bucket" / "a_aside" / "4", tmp_path / "disk" / "new" / "4")  # a disk: one rename
  assert (tmp_path / "disk" / "new" / "4" / "x").read_text() == "x"


def test_config_json_is_replaced_whole_and_the_old_one_kept_beside_it(tmp_path, monkeypatch):
  from etils import epath
  from emjax import config as config_lib
  from conftest import tiny_config
  workdir = str(tmp_path)
  first, second = tiny_config(steps=4), tiny_config(steps=6)
  config_lib.write_config(first, workdir)
  first_text = (tmp_path / "config.json").read_text()
  real = type(epath.Path(workdir)).write_text

  def killed_halfway(self, data, *args, **kwargs):
    real(self, data[:len(data) // 2], *args, **kwargs)
    raise KeyboardInterrupt("killed")
  with monkeypatch.context() as mp:
    mp.setattr(type(epath.Path(workdir)), "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
      config_lib.write_config(second, workdir)
  assert (tmp_path / "config.json").read_text() == first_text  # a kill leaves a whole config.json
  config_lib.write_config(second, workdir)
  assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6
  assert (tmp_path / "config.json.1").read_text() == first_text and not (tmp_path / "config.json.2").exists()


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
