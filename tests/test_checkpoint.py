"""Checkpoints: every process's data position, config mismatches as errors, damaged steps set aside.

The multi-process path itself (two real processes) is tests/test_multihost.py; here the process
identity is played by patching `checkpoint._process`.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from conftest import tiny_config
from emjax.train import checkpoint as ckpt_lib
from emjax.train import loop


def _state(width=8):
  return {"params": {"w": jnp.arange(4 * width, dtype=jnp.float32).reshape(4, width), "b": jnp.zeros((3,))},
          "step": jnp.int32(0)}


def _abstract(width=8):
  return jax.eval_shape(lambda: _state(width))


def _play(monkeypatch, index, count):
  monkeypatch.setattr(ckpt_lib, "_process", lambda: (index, count))


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ----------------------------------------------------------------------------- item 1: one position per process


def test_each_process_writes_and_reads_back_its_own_data_position(tmp_path, monkeypatch):
  handler = ckpt_lib.ProcessDataHandler()
  directory = epath.Path(tmp_path)
  for index in (0, 1):  # what the two processes of one save write into the step's data/ directory
    _play(monkeypatch, index, 2)
    handler.save(directory, ckpt_lib.ProcessDataSave({"position": index * 10}))
  assert sorted(os.listdir(tmp_path)) == ["process_0-of-2.json", "process_1-of-2.json"]
  for index in (0, 1):
    _play(monkeypatch, index, 2)
    assert handler.restore(directory) == {"position": index * 10}
  _play(monkeypatch, 0, 4)  # another process count cannot share these positions out
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"run of 2 processes, this run has 4"):
    handler.restore(directory)


def test_a_process_other_than_0_gets_its_own_position_back_through_the_checkpointer(tmp_path, monkeypatch):
  _play(monkeypatch, 1, 2)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=True)
  ck.save(2, _state(), {"position": "process 1"})
  ck.close()
  written = [n for n in os.listdir(tmp_path / "ck" / "2" / "data") if n.endswith(".json")]
  assert written == ["process_1-of-2.json"]  # not process 0's file, not one file for everyone
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3)
  step, state, data = ck.restore_latest(_abstract())
  assert (step, data) == (2, {"position": "process 1"})
  np.testing.assert_array_equal(state["params"]["w"], _state()["params"]["w"])


def test_restoring_with_another_process_count_is_an_error_and_moves_nothing(tmp_path, monkeypatch):
  _play(monkeypatch, 0, 2)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
  ck.save(2, _state(), {"position": 0})
  ck.close()
  before = _listing(tmp_path)
  _play(monkeypatch, 0, 1)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"2 processes, this run has 1"):
    ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3).restore_latest(_abstract())
  assert _listing(tmp_path) == before


def test_a_checkpoint_from_before_per_process_positions_still_restores(tmp_path):
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(create=True),
                                  item_names=("state", "data"))
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(_state()),
                                          data=ocp.args.JsonSave({"position": "old"})))
  manager.wait_until_finished()
  manager.close()
  step, _, data = ckpt_lib.Checkpointer(str(tmp_path), keep=3).restore_latest(_abstract())
  assert (step, data) == (3, {"position": "old"})


# ----------------------------------------------------------------------------- item 2: mismatch vs unreadable


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A LoRA run's workdir (rank 4, adamw) with a state of the trainer's tree saved at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("lora_run")
  config = tiny_config(steps=4)
  config.lora.update(enabled=True, rank=4)
  abstract = loop.Trainer(config, _one_device_mesh()).layout.abstract
  state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)  # the values do not matter here
  ck = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), keep=3, async_save=False)
  for step in (2, 4):
    ck.save(step, state, {"position": step})
  ck.close()
  return workdir, config


def _one_device_mesh():
  from emjax import sharding
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


@pytest.mark.parametrize("change, names", [
    (dict(lora=dict(rank=8)), ["lora_a", "(2, 32, 4) float32", "(2, 32, 8) float32"]),
    (dict(train=dict(optimizer="sgd")), ["opt_state/", "checkpoint", "this run absent"]),
    (dict(model=dict(d_ff=128)), ["lora", "64", "128"]),
])
def test_rerun_with_another_config_is_a_clear_error_and_moves_nothing(lora_run, change, names):
  workdir, config = lora_run
  before = _listing(workdir / "checkpoints")
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [2, 4]
  changed = config.copy_and_resolve_references()
  for section, values in change.items():
    changed[section].update(values)
  changed.train.steps = 6
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as err:
    loop.train(changed, str(workdir), mesh=_one_device_mesh(), show_progress=False)
  message = str(err.value)
  assert "step 4" in message and "does not match" in message and "Nothing was moved" in message
  for name in names:
    assert name in message, message
  assert _listing(workdir / "checkpoints") == before  # every step where it was
  assert not (workdir / "checkpoints_unreadable").exists()


def _save_steps(directory, steps, async_save=False):
  ck = ckpt_lib.Checkpointer(str(directory), keep=10, async_save=async_save)
  for s in steps:
    ck.save(s, _state(), {"position": s})
  ck.close()


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_damaged_steps_are_skipped_and_set_aside_incomplete_saves_are_ignored(tmp_path, caplog):
  ckdir = tmp_path / "checkpoints"
  _save_steps(ckdir, [2, 4, 6, 8, 10])
  for root, _, files in os.walk(ckdir / "4" / "state" / "d"):  # array data cut short
    for name in files:
      _truncate(os.path.join(root, name))
  _truncate(ckdir / "6" / "data" / "process_0-of-1.json")  # position cut short
  os.remove(ckdir / "8" / "data" / "process_0-of-1.json")  # position lost
  os.remove(ckdir / "10" / "state" / "_METADATA")  # state metadata lost
  partial = ckdir / "12.orbax-checkpoint-tmp-17"  # what a kill during a save leaves behind
  (partial / "state").mkdir(parents=True)
  with caplog.at_level(logging.WARNING):
    ck = ckpt_lib.Checkpointer(str(ckdir), keep=10)
    step, _, data = ck.restore_latest(_abstract())
  assert (step, data) == (2, {"position": 2})
  for s in (4, 6, 8, 10):
    assert f"step {s} in {ckdir} is unreadable" in caplog.text
    assert not (ckdir / str(s)).exists() and (tmp_path / "checkpoints_unreadable" / str(s)).is_dir()  # kept
  assert "incomplete save" in caplog.text and partial.name in caplog.text
  assert partial.is_dir() and ck.steps() == [2]  # left alone, never listed
  ck.save(4, _state(), {"position": "again"})  # the set-aside numbers are free again
  ck.close()


def test_a_read_error_that_is_not_damage_is_an_error_and_moves_nothing(tmp_path, monkeypatch):
  ckdir = tmp_path / "checkpoints"
  _save_steps(ckdir, [2, 4])
  before = _listing(tmp_path)
  ck = ckpt_lib.Checkpointer(str(ckdir), keep=10)

  def flaky_restore(*args, **kwargs):
    raise OSError(5, "Input/output error")
  monkeypatch.setattr(ck._manager, "restore", flaky_restore)
  with pytest.raises(ckpt_lib.CheckpointReadError, match=r"step 4 .* could not be read .*Input/output error"):
    ck.restore_latest(_abstract())
  assert _listing(tmp_path) == before


def test_only_process_0_moves_a_damaged_step_between_two_barriers(tmp_path, monkeypatch):
  ckdir = tmp_path / "checkpoints"
  _save_steps(ckdir, [2, 4])
  events = []

  def barrier(name):
    events.append((name, sorted(os.listdir(ckdir))))
  monkeypatch.setattr(ckpt_lib, "_barrier", barrier)

  _play(monkeypatch, 1, 2)
  ckpt_lib.Checkpointer(str(ckdir), keep=10)._set_aside([4])
  assert (ckdir / "4").is_dir() and not (tmp_path / "checkpoints_unreadable").exists()
  assert [e[0] for e in events] == ["emjax_checkpoint_before_set_aside", "emjax_checkpoint_after_set_aside"]

  events.clear()
  _play(monkeypatch, 0, 2)
  ck = ckpt_lib.Checkpointer(str(ckdir), keep=10)
  ck._set_aside([4])
  assert "4" in events[0][1] and "4" not in events[1][1]  # renamed after the first barrier, before the second
  assert (tmp_path / "checkpoints_unreadable" / "4").is_dir()
  assert ck.steps() == [2]


def test_a_damaged_step_in_a_bucket_is_set_aside_too(tmp_path, caplog):
  """A bucket has no directories: `<directory>_unreadable/` cannot be made before the move (gcsfs's mkdir of a
  prefix does nothing, and epath's rename wants the destination's parent to exist). Every object of the step
  is moved, and the step number is free again."""
  from fake_gcs import fake_gcs
  ckdir, local = "gs://bucket/run/checkpoints", tmp_path / "bucket" / "run" / "checkpoints"
  aside = tmp_path / "bucket" / "run" / "checkpoints_unreadable"
  with fake_gcs(str(tmp_path)):
    _save_steps(ckdir, [2, 4])
    assert (local / "4" / "commit_success.txt").is_file()  # orbax's mark of a finalised step in a bucket
    os.remove(local / "4" / "data" / "process_0-of-1.json")  # position lost
    objects = _listing(local / "4")
    with caplog.at_level(logging.ERROR):
      ck = ckpt_lib.Checkpointer(ckdir, keep=10)
      step, _, data = ck.restore_latest(_abstract())
    assert (step, data) == (2, {"position": 2})
    assert "moved unreadable step 4 to gs://bucket/run/checkpoints_unreadable/4" in caplog.text
    assert not (local / "4").exists() and _listing(aside / "4") == objects  # every object kept, none left
    assert ck.steps() == [2]
    ck.save(4, _state(), {"position": "again"})  # the number is free again
    ck.close()
    # Damaged again: set aside beside the first one, which is kept.
    os.remove(local / "4" / "data" / "process_0-of-1.json")
    ck = ckpt_lib.Checkpointer(ckdir, keep=10)
    assert ck.restore_latest(_abstract())[0] == 2
    ck.close()
    assert sorted(os.listdir(aside)) == ["4", "4.1"] and _listing(aside / "4") == objects


def test_mismatch_message_lists_the_first_differences_and_counts_the_rest():
  saved = {"a": {f"w{i}": jax.ShapeDtypeStruct((2, i + 1), jnp.float32) for i in range(8)}}
  wanted = {"a": {f"w{i}": jax.ShapeDtypeStruct((2, i + 2), jnp.float32) for i in range(8)}}
  lines = ckpt_lib.structure_differences(saved, wanted)
  assert len(lines) == 8 and lines[0] == "a/w0: checkpoint (2, 1) float32, this run (2, 2) float32"
  assert ckpt_lib.structure_differences(saved, saved) == []
  with_dtype = {"a": dict(wanted["a"], w0=jax.ShapeDtypeStruct((2, 1), jnp.bfloat16))}
  assert "a/w0: checkpoint (2, 1) float32, this run (2, 1) bfloat16" in ckpt_lib.structure_differences(saved,
                                                                                                        with_dtype)


# ----------------------------------------------------------------------------- a save is never silently skipped


def test_a_save_that_orbax_declines_is_an_error_and_the_later_step_is_kept(tmp_path):
  ckdir = tmp_path / "checkpoints"
  _save_steps(ckdir, [4])  # an earlier run's step
  before = _listing(tmp_path)
  ck = ckpt_lib.Checkpointer(str(ckdir), keep=10, async_save=False)
  # orbax's CheckpointManager.save returns False (writes nothing) for a step at or below its latest one.
  with pytest.raises(ckpt_lib.CheckpointSaveError, match=rf"step 2 was not saved in {ckdir}.*step 4"):
    ck.save(2, _state(), {"position": 2})
  ck.close()
  assert _listing(tmp_path) == before  # step 4 untouched, no step 2


def test_existing_steps_lists_step_directories_finalised_or_not(tmp_path):
  ckdir = tmp_path / "checkpoints"
  assert ckpt_lib.existing_steps(str(ckdir)) == []  # no directory yet
  _save_steps(ckdir, [2, 4])
  (ckdir / "6.orbax-checkpoint-tmp-17").mkdir()  # an interrupted save: not a step
  (ckdir / "8").mkdir()  # a step directory orbax has not finalised (a bucket writes in place)
  assert ckpt_lib.existing_steps(str(ckdir)) == [2, 4, 8]


def test_a_fresh_start_is_refused_where_steps_exist_in_a_bucket_too(tmp_path):
  from fake_gcs import fake_gcs
  # A step a save left unfinished (no commit_success.txt): still a step of the earlier run. A bucket has no
  # empty directories, so the step holds an object.
  (tmp_path / "bucket" / "run" / "checkpoints" / "4" / "state").mkdir(parents=True)
  (tmp_path / "bucket" / "run" / "checkpoints" / "4" / "state" / "_METADATA").write_text("{}")
  before = _listing(tmp_path)
  with fake_gcs(str(tmp_path)):
    ckpt_lib.refuse_fresh_start("gs://bucket/new/checkpoints")  # nothing there: a fresh start is fine
    with pytest.raises(ckpt_lib.CheckpointsExistError,
                       match=r"workdir gs://bucket/run already holds checkpoints of steps \[4\]"):
      ckpt_lib.refuse_fresh_start("gs://bucket/run/checkpoints")
  assert _listing(tmp_path) == before
