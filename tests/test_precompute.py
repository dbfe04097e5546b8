"""A teacher's top-k log-probs stored once (ArrayRecord) and read by a student with no teacher in memory."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from fake_gcs import fake_gcs
from emjax import paths
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
  c.eval.update(every_steps=3, batches=2)  # the store keeps the held-out rows too
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


def test_meta_records_the_data_and_a_student_of_other_data_is_refused(stored):
  teacher_dir, store, meta = stored
  config = _student_config(teacher_dir, precomputed=store)
  assert meta["data"] == precompute.data_fingerprint(config)
  assert set(meta["data"]["sources"]) == {"arithmetic"} and meta["data"]["sources"]["arithmetic"]["rows"] == 20
  assert json.load(open(os.path.join(store, "meta.json")))["data"]["fingerprint"] == meta["data"]["fingerprint"]
  other = _student_config(teacher_dir, precomputed=store)
  other.data.sources.arithmetic.seed = 7  # other documents, the same row count
  with pytest.raises(ValueError, match=r"built from other data than this run's config.data: the store's sources "
                                       r"arithmetic \(synthetic -, 20 rows.*; this run's sources arithmetic .*"
                                       r"data.sources.arithmetic.seed: 0 vs 7"):
    precompute.PrecomputedTeacherSource(other, store)
  with pytest.raises(ValueError, match=r"built from other data"):  # the same config, the trainer's path
    loop.train(other, os.path.join(os.path.dirname(store), "refused"), mesh=_mesh(2), show_progress=False,
               make_batch_source=precompute.make_source)
  # The loop does not import the store's reader: without it, a stored teacher is refused with what to pass.
  with pytest.raises(ValueError, match=r"pass make_batch_source=emjax.train.precompute.make_source"):
    loop.train(other, os.path.join(os.path.dirname(store), "no_source"), mesh=_mesh(2), show_progress=False)


def test_a_changed_file_changes_the_fingerprint(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "one"}\n{"text": "two"}\n')
  config = _student_config("")
  config.data.sources.arithmetic.update(kind="jsonl", path=str(path), holdout=0)
  meta = {"data": precompute.data_fingerprint(config)}
  precompute.check_store_data(meta, config, "S")
  path.write_text('{"text": "one"}\n{"text": "TWO"}\n')
  with pytest.raises(ValueError, match=r"the store's sources arithmetic \(jsonl .*docs.jsonl, 2 rows.*this run's "
                                       r"sources arithmetic.*the same config, other documents"):
    precompute.check_store_data(meta, config, "S")


def test_several_sources_are_each_stored_once(stored, tmp_path):
  teacher_dir, _, _ = stored
  config = _student_config(teacher_dir)
  config.data.sources.sorting.update(weight=1.0, num_docs=12)
  config.data.sources.arithmetic.update(weight=1.0, num_docs=8)
  config.eval.every_steps = 0
  store = str(tmp_path / "two")
  meta = precompute.run_teacher_top_k(config, store, mesh=_mesh(2))
  assert meta["rows"] == 20 and {k: v["rows"] for k, v in meta["data"]["sources"].items()} == {
      "arithmetic": 8, "sorting": 12}
  source = precompute.PrecomputedTeacherSource(config, store, process_index=0, process_count=1)
  stored_rows = sorted(tuple(precompute.decode_row(source._records[i])["inputs"])  # pylint: disable=protected-access
                       for i in range(source.rows))
  # Each source alone, every document once, as the rows the pipeline makes of it.
  from emjax.data import pipeline, tokenizers
  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  expected = []
  for name, n in (("arithmetic", 8), ("sorting", 12)):
    alone = config.data.copy_and_resolve_references()
    alone.shuffle = False
    for other, src in alone.sources.items():
      src.weight = 1.0 if other == name else 0.0
    it = iter(pipeline.make_batches(alone, tokenizer, 4, seed=0, process_index=0, process_count=1))
    rows = [tuple(r) for _ in range(n // 4) for r in next(it)["inputs"]]
    assert len(set(rows)) == n
    expected += rows
  assert stored_rows == sorted(expected)
  config.data.sources.sorting.weight = 0.5
  with pytest.raises(ValueError, match=r"config.data.sources: weights \{'arithmetic': 1.0, 'sorting': 0.5\}: a "
                                       r"teacher top-k store holds one epoch"):
    precompute.run_teacher_top_k(config, str(tmp_path / "unequal"), mesh=_mesh(2))
  assert not (tmp_path / "unequal").exists()


def test_a_student_of_a_stored_teacher_measures_its_held_out_loss(stored, tmp_path):
  teacher_dir, store, meta = stored
  assert meta["eval"] == {"split": "eval", "rows": 16} and os.path.exists(os.path.join(store, "eval.array_record"))
  config = _student_config(teacher_dir, precomputed=store)
  config.teacher.path = ""
  workdir = str(tmp_path / "student")
  loop.train(config, workdir, mesh=_mesh(2), show_progress=False, make_batch_source=precompute.make_source)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "eval.jsonl"))]
  assert [r["step"] for r in rows] == [0, 3, 6] and all(r["eval_tokens"] > 0 for r in rows)
  # The same held-out loss as with the teacher in the step, on the same rows, at step 0.
  live = _student_config(teacher_dir)
  live.train.steps = 1
  live_dir = str(tmp_path / "live")
  loop.train(live, live_dir, mesh=_mesh(2), show_progress=False)
  live_rows = [json.loads(line) for line in open(os.path.join(live_dir, "eval.jsonl"))]
  assert live_rows[0]["eval_tokens"] == rows[0]["eval_tokens"]
  np.testing.assert_allclose(live_rows[0]["eval_loss"], rows[0]["eval_loss"], rtol=1e-5)
  # Other eval settings than the store's: refused when the store is opened, before the step compiles.
  config.eval.batches = 3
  with pytest.raises(ValueError, match=r"config.eval.every_steps=3: the held-out loss with a stored teacher reads"):
    precompute.PrecomputedTeacherSource(config, store)


def test_a_store_in_a_bucket_is_written_and_trained_from_there(stored, tmp_path, monkeypatch):
  """train.distill.precomputed=gs://...: the job's store and the student's run in a bucket; on this machine
  only the named scratch (ArrayRecord reads and writes local files)."""
  teacher_dir, local_store, _ = stored
  root, scratch, cwd = tmp_path / "gcs", tmp_path / "scratch", tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.setenv("EMJAX_SCRATCH", str(scratch))
  monkeypatch.chdir(cwd)  # a local write of "gs://..." would land here as gs:/...
  store, student = "gs://bucket/topk", "gs://bucket/student"
  with fake_gcs(str(root)):
    meta = precompute.run_teacher_top_k(_student_config(teacher_dir), store, mesh=_mesh(2))
    assert sorted(os.listdir(root / "bucket" / "topk")) == sorted(
        ["COMPLETED", "eval.array_record", "launches.jsonl", "meta.json", "rows.array_record"])
    for name in ("rows.array_record", "eval.array_record"):  # the same bytes as the local store's
      assert (root / "bucket" / "topk" / name).read_bytes() == open(os.path.join(local_store, name), "rb").read()
    assert [f for _, _, files in os.walk(scratch) for f in files] == []  # uploaded, then removed
    config = _student_config(teacher_dir, precomputed=store)
    config.teacher.path = ""
    final = loop.train(config, student, mesh=_mesh(2), show_progress=False, make_batch_source=precompute.make_source)
    rows = [json.loads(line) for line in paths.read_log(f"{student}/metrics.jsonl").splitlines()]
    eval_rows = [json.loads(line) for line in paths.read_log(f"{student}/eval.jsonl").splitlines()]
    # A second reader on this machine reuses the scratch copy of the finished store.
    copies = {f: os.stat(os.path.join(d, f)).st_mtime_ns for d, _, files in os.walk(scratch) for f in files}
    precompute.PrecomputedTeacherSource(config, store, process_index=0, process_count=1).eval_batches(1)
    again = {f: os.stat(os.path.join(d, f)).st_mtime_ns for d, _, files in os.walk(scratch) for f in files}
  assert meta["rows"] == 20 and final["step"] == 6
  assert [r["step"] for r in rows] == list(range(1, 7)) and [r["step"] for r in eval_rows] == [0, 3, 6]
  assert sorted(copies) == sorted(["rows.array_record", "rows.array_record.source.json", "eval.array_record",
                                   "eval.array_record.source.json"]) and again == copies
  assert os.listdir(cwd) == []
  assert set(os.listdir(tmp_path)) == {"gcs", "scratch", "cwd"}
  # The student's TensorBoard events are in the bucket too.
  assert any("tfevents" in f for f in os.listdir(root / "bucket" / "student" / "tensorboard"))
