"""A teacher's top-k log-probs stored once (ArrayRecord) and read by a student with no teacher in memory."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from emjax import sharding as shd
from emjax.train import loop, precompute

K = 8


def _mesh(n):
  return shd.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:n])


def _student_config(teacher_dir, **distill):
  c = tiny_config(steps=6, lr=3e-2, warmup_steps=0)
  c.data.packing = "none"
  for name in ("grammar", "sorting"):
    c.data.sources[name].weight = 0.0
  c.data.sources.arithmetic.num_docs = 20
  c.teacher.update(path=teacher_dir, dtype="float32")
  c.train.update(objective="jsd", loss_chunk_len=16)
  c.train.distill.update(beta=0.5, top_k=K, tail=True, **distill)
  return c


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
  root = tmp_path_factory.mktemp("precompute")
  teacher_dir = str(root / "teacher")
  loop.train(tiny_config(steps=4, lr=3e-2), teacher_dir, mesh=_mesh(2), show_progress=False)
  store = str(root / "topk")
  config = _student_config(teacher_dir)
  meta = precompute.run_teacher_top_k(config, store, mesh=_mesh(2))
  return teacher_dir, store, meta


def test_the_store_holds_one_epoch_with_the_teachers_top_k(stored):
  teacher_dir, store, meta = stored
  assert meta["rows"] == 20 and meta["top_k"] == K and meta["teacher"]["step"] == 4
  assert os.path.exists(os.path.join(store, "COMPLETED"))
  config = _student_config(teacher_dir, precomputed=store)
  source = precompute.PrecomputedTeacherSource(config, store, process_index=0, process_count=1)
  row = precompute.decode_row(source._records[0])  # pylint: disable=protected-access
  assert row["teacher_top_ids"].shape == (32, K) and row["teacher_tail_logprob"].shape == (32,)
  # Log-probs under the full vocabulary: the k tokens plus the tail hold all the mass.
  total = np.exp(row["teacher_top_logprobs"]).sum(-1) + np.exp(row["teacher_tail_logprob"])
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)
  # Every epoch visits every row once, in a new order.
  visits = np.concatenate([source.global_rows(s) for s in range(5)])  # 5 batches of 8 = 2 epochs of 20 rows
  first, second = visits[:20], visits[20:]
  assert sorted(first) == list(range(20)) == sorted(second) and list(first) != list(second)


def test_a_stored_teacher_gives_the_loss_of_the_teacher_in_the_step(stored):
  teacher_dir, store, _ = stored
  mesh = _mesh(2)
  with_store = loop.Trainer(_student_config(teacher_dir, precomputed=store), mesh)
  assert with_store.teacher is None  # no teacher model is built or loaded
  in_step = loop.Trainer(_student_config(teacher_dir), mesh)
  state, frozen = with_store.init_state()
  source = precompute.make_source(with_store, None)
  local = next(source)
  batch = shd.put_local_batch({k: local[k] for k in with_store.eval_batch_keys}, mesh)
  stored_sum, weight = with_store.eval_fn(state["params"], frozen, batch, None)
  plain = shd.put_local_batch({k: local[k] for k in in_step.eval_batch_keys}, mesh)
  live_sum, live_weight = in_step.eval_fn(state["params"], frozen, plain, in_step.load_teacher())
  assert float(weight) == float(live_weight) > 0
  np.testing.assert_allclose(float(stored_sum), float(live_sum), rtol=1e-5)


def test_a_student_trains_on_the_store_and_resumes_exactly(stored, tmp_path):
  teacher_dir, store, _ = stored
  config = _student_config(teacher_dir, precomputed=store)
  config.teacher.path = ""
  config.train.schedule = "constant"  # so a 3-step run and the first half of a 6-step run are the same steps
  config.checkpoint.every_steps = 3
  workdir = str(tmp_path / "student")
  loop.train(config, workdir, mesh=_mesh(2), show_progress=False, make_batch_source=precompute.make_source)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
  again = str(tmp_path / "again")
  config.train.steps = 3
  loop.train(config, again, mesh=_mesh(2), show_progress=False, make_batch_source=precompute.make_source)
  config.train.steps = 6
  loop.train(config, again, mesh=_mesh(2), show_progress=False, make_batch_source=precompute.make_source)
  resumed = [json.loads(line) for line in open(os.path.join(again, "metrics.jsonl"))]
  np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in rows], rtol=1e-6)


def test_a_store_of_other_settings_is_refused(stored):
  teacher_dir, store, _ = stored
  config = _student_config(teacher_dir, precomputed=store)
  config.train.distill.top_k = 4
  with pytest.raises(ValueError, match=r"stored with other settings than this run's \(top_k: 8 vs 4\)"):
    precompute.PrecomputedTeacherSource(config, store)
  with pytest.raises(FileNotFoundError, match=r"not a finished teacher top-k store"):
    precompute.PrecomputedTeacherSource(config, teacher_dir)
  config = _student_config(teacher_dir)
  config.train.distill.temperature = 2.0
  with pytest.raises(ValueError, match=r"holds a teacher top-k store made with other settings \(temperature"):
    precompute.run_teacher_top_k(config, store, mesh=_mesh(2))
