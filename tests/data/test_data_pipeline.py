"""make_batches: format, mixture token fractions, exact resume, sharding, errors."""

import json
import math

import ml_collections
import numpy as np
import pytest

from emjax import data
from emjax.data import pipeline

TOKENIZER = data.ByteTokenizer()


def _cfg(weights=None, seq_len=32, **overrides):
  """The default data config with small synthetic sources."""
  cfg = data.default_data_config()
  cfg.seq_len = seq_len
  for name, source in cfg.sources.items():
    source.num_docs = 2000
    if weights is not None:
      source.weight = weights.get(name, 0.0)
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _take(cfg, global_batch=8, n=5, *, seed=0, process_index=0,
          process_count=1):
  it = iter(data.make_batches(cfg, TOKENIZER, global_batch, seed=seed,
                              process_index=process_index,
                              process_count=process_count))
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _rows_by_source(batches):
  rows = {}
  for batch in batches:
    for i, sid in enumerate(batch["source_id"]):
      rows.setdefault(int(sid), []).append(
          {k: v[i] for k, v in batch.items() if k != "source_id"})
  return rows


# ----------------------------------------------------------------------------
# format
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["concat", "greedy"])
def test_batch_format(packing):
  cfg = _cfg(packing=packing)
  batches = _take(cfg, global_batch=8, n=10)
  for batch in batches:
    assert set(batch) == set(data.BATCH_KEYS)
    for key in ("inputs", "targets", "segment_ids", "positions"):
      assert batch[key].shape == (8, 32) and batch[key].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    assert batch["source_id"].shape == (8,)
    assert batch["source_id"].dtype == np.int32
    np.testing.assert_array_equal(batch["loss_mask"] > 0,
                                  batch["segment_ids"] > 0)
    for row in range(8):
      segs = batch["segment_ids"][row]
      for seg in range(1, segs.max() + 1):
        sel = segs == seg
        np.testing.assert_array_equal(batch["positions"][row][sel],
                                      np.arange(sel.sum()))
        inputs, targets = batch["inputs"][row][sel], batch["targets"][row][sel]
        np.testing.assert_array_equal(targets[:-1], inputs[1:])
        # bos only ever starts a document; eos only ever ends one.
        assert TOKENIZER.bos_id not in inputs[1:]
        assert TOKENIZER.eos_id not in targets[:-1]
  if packing == "concat":
    assert all((b["segment_ids"] > 0).all() for b in batches)
  # Every document in the batch decodes to text from its source.
  names = data.source_names(cfg)
  assert names == ["arithmetic", "grammar", "sorting"]
  row = batches[0]["inputs"][list(batches[0]["source_id"]).index(2)]
  assert "sort:" in TOKENIZER.decode(row) or "->" in TOKENIZER.decode(row)


def test_documents_start_with_bos_and_end_with_eos():
  cfg = _cfg(packing="greedy", seq_len=512)  # every document fits in a row
  batch = _take(cfg, n=1)[0]
  for row in range(8):
    segs = batch["segment_ids"][row]
    for seg in range(1, segs.max() + 1):
      sel = segs == seg
      assert batch["inputs"][row][sel][0] == TOKENIZER.bos_id
      assert batch["targets"][row][sel][-1] == TOKENIZER.eos_id


def test_deterministic_and_seed_dependent():
  cfg = _cfg()
  _assert_batches_equal(_take(cfg, seed=3), _take(cfg, seed=3))
  other = _take(cfg, seed=4)
  assert not np.array_equal(other[0]["inputs"], _take(cfg, seed=3)[0]["inputs"])


# ----------------------------------------------------------------------------
# mixture
# ----------------------------------------------------------------------------


def test_token_fraction_matches_weights():
  # Documents of very different lengths: token fractions must still follow
  # the weights because rows (not documents) are mixed.
  cfg = _cfg({"arithmetic": 0.8, "grammar": 0.2})
  batches = _take(cfg, global_batch=16, n=150)  # 2400 rows
  tokens = np.zeros(3)
  for batch in batches:
    for sid in range(3):
      tokens[sid] += batch["loss_mask"][batch["source_id"] == sid].sum()
  fractions = tokens / tokens.sum()
  assert abs(fractions[0] - 0.8) < 0.02 and abs(fractions[1] - 0.2) < 0.02
  assert tokens[2] == 0  # weight 0: disabled


def test_changing_weights_keeps_each_source_stream():
  a = _take(_cfg({"arithmetic": 0.8, "grammar": 0.2}), n=40)
  b = _take(_cfg({"arithmetic": 0.3, "grammar": 0.7}), n=40)
  assert not np.array_equal(a[0]["source_id"], b[0]["source_id"])
  rows_a, rows_b = _rows_by_source(a), _rows_by_source(b)
  for sid in (0, 1):
    n = min(len(rows_a[sid]), len(rows_b[sid]))
    assert n >= 40
    for ra, rb in zip(rows_a[sid][:n], rows_b[sid][:n]):
      for key in ra:
        np.testing.assert_array_equal(ra[key], rb[key])


def test_adding_a_source_keeps_the_others_streams():
  two = _take(_cfg({"arithmetic": 0.5, "grammar": 0.5}), n=20)
  three = _take(_cfg({"arithmetic": 0.5, "grammar": 0.5, "sorting": 0.5}), n=20)
  rows_two, rows_three = _rows_by_source(two), _rows_by_source(three)
  assert len(rows_three[2]) > 0
  for sid in (0, 1):
    for ra, rb in zip(rows_two[sid], rows_three[sid]):
      np.testing.assert_array_equal(ra["inputs"], rb["inputs"])


# ----------------------------------------------------------------------------
# exact resume
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("packing,prefetch,read_threads", [
    ("concat", 0, 0), ("concat", 2, 0), ("greedy", 2, 0), ("concat", 2, 2)])
def test_exact_resume(packing, prefetch, read_threads):
  cfg = _cfg(packing=packing, prefetch=prefetch, read_threads=read_threads)
  make = lambda: iter(data.make_batches(cfg, TOKENIZER, 8, seed=7,
                                        process_index=0, process_count=1))
  it = make()
  for _ in range(7):
    next(it)
  state = data.iterator_state(it)
  state = json.loads(json.dumps(state))  # as if written to a checkpoint
  # Each source's position is in the state.
  for name in data.source_names(cfg):
    assert f'"{name}"' in json.dumps(state)
  expected = [next(it) for _ in range(6)]

  fresh = make()
  data.restore_iterator(fresh, state)
  _assert_batches_equal([next(fresh) for _ in range(6)], expected)

  # Restoring a used iterator rewinds it too.
  data.restore_iterator(it, state)
  _assert_batches_equal([next(it) for _ in range(6)], expected)


def test_resume_after_weight_change_continues_each_source():
  """A checkpoint restored under new weights continues each source's stream."""
  cfg = _cfg({"arithmetic": 0.5, "grammar": 0.5})
  it = iter(data.make_batches(cfg, TOKENIZER, 8, seed=0, process_index=0,
                              process_count=1))
  seen = [next(it) for _ in range(5)]
  state = data.iterator_state(it)
  reference = [next(it) for _ in range(10)]

  cfg2 = _cfg({"arithmetic": 0.9, "grammar": 0.1})
  it2 = iter(data.make_batches(cfg2, TOKENIZER, 8, seed=0, process_index=0,
                               process_count=1))
  data.restore_iterator(it2, state)
  after = _rows_by_source([next(it2) for _ in range(10)])
  ref = _rows_by_source(reference)
  assert seen
  for ra, rb in zip(after[0], ref[0]):
    np.testing.assert_array_equal(ra["inputs"], rb["inputs"])


# ----------------------------------------------------------------------------
# per-process sharding
# ----------------------------------------------------------------------------


def test_process_sharding_gives_disjoint_documents(tmp_path):
  docs = [f"document number {i:03d}" for i in range(40)]
  path = tmp_path / "docs.txt"
  path.write_text("\n".join(docs) + "\n")
  cfg = _cfg(packing="greedy", seq_len=32)
  cfg.sources = ml_collections.ConfigDict({
      "lines": data.default_source_config(kind="text", path=str(path),
                                          weight=1.0)})
  seen = []
  for process_index in range(2):
    batches = _take(cfg, global_batch=8, n=10, process_index=process_index,
                    process_count=2)
    assert batches[0]["inputs"].shape == (4, 32)
    texts = set()
    for batch in batches:
      for row in range(4):
        segs = batch["segment_ids"][row]
        for seg in range(1, segs.max() + 1):
          texts.add(TOKENIZER.decode(batch["inputs"][row][segs == seg]))
    seen.append(texts)
  assert seen[0].isdisjoint(seen[1])
  # 10 batches x 4 rows cover each 20-document shard: together, everything.
  assert seen[0] | seen[1] == set(docs)


def test_global_batch_must_divide_by_process_count():
  with pytest.raises(ValueError, match=r"train\.batch_size=9.*\(2\)"):
    data.make_batches(_cfg(), TOKENIZER, 9, seed=0, process_index=0,
                      process_count=2)


# ----------------------------------------------------------------------------
# config validation
# ----------------------------------------------------------------------------


def test_default_config_is_lockable_and_overridable():
  cfg = data.default_data_config()
  cfg.lock()
  keys = {name: set(src.keys()) for name, src in cfg.sources.items()}
  assert len({frozenset(k) for k in keys.values()}) == 1
  cfg.sources.grammar.weight = 0.2  # like --config.data.sources.grammar.weight
  cfg.sources.grammar.weight = 1    # ints are accepted for float fields
  with pytest.raises(AttributeError):
    cfg.sources.grammar.wieght = 0.2
  data.validate_data_config(cfg)
  json.dumps(cfg.to_dict())


@pytest.mark.parametrize("mutate,message", [
    (lambda c: setattr(c, "sources", ml_collections.ConfigDict()),
     r"data\.sources is empty"),
    (lambda c: setattr(c.sources.grammar, "weight", -0.5),
     r"data\.sources\.grammar\.weight must be finite and >= 0"),
    (lambda c: setattr(c.sources.grammar, "weight", float("nan")),
     r"data\.sources\.grammar\.weight must be finite"),
    (lambda c: [setattr(s, "weight", 0.0) for s in c.sources.values()],
     r"sum to 0.0 \(data\.sources\.arithmetic\.weight, "
     r"data\.sources\.grammar\.weight, data\.sources\.sorting\.weight\)"),
    (lambda c: setattr(c, "seq_len", 1), r"data\.seq_len must be .* >= 2"),
    (lambda c: setattr(c.sources.grammar, "kind", "parquet"),
     r"data\.sources\.grammar\.kind 'parquet'"),
    (lambda c: setattr(c.tokenizer, "kind", "wordpiece"),
     r"data\.tokenizer\.kind 'wordpiece'.*'byte', 'sentencepiece', 'hf'"),
    (lambda c: setattr(c, "packing", "best_fit"), r"data\.packing 'best_fit'"),
])
def test_validate_data_config_errors(mutate, message):
  cfg = data.default_data_config()
  mutate(cfg)
  with pytest.raises(ValueError, match=message):
    data.validate_data_config(cfg)
  with pytest.raises(ValueError, match=message):
    data.make_batches(cfg, TOKENIZER, 8, seed=0, process_index=0,
                      process_count=1)


def test_plain_dict_config_and_missing_weight(tmp_path):
  cfg = {"seq_len": 16, "tokenizer": {"kind": "byte", "path": ""},
         "sources": {"g": {"kind": "synthetic", "name": "grammar",
                           "weight": 1.0, "num_docs": 50}}}
  batch = _take(cfg, global_batch=2, n=1)[0]
  assert batch["inputs"].shape == (2, 16)
  del cfg["sources"]["g"]["weight"]
  with pytest.raises(ValueError, match=r"data\.sources\.g\.weight is missing"):
    data.validate_data_config(cfg)
  cfg["sources"]["g"]["wieght"] = 1.0
  with pytest.raises(ValueError, match=r"data\.sources\.g has unknown keys"):
    data.validate_data_config(cfg)


def test_errors_from_sources_surface_in_make_batches(tmp_path):
  cfg = _cfg()
  cfg.sources.grammar.name = "poetry"
  with pytest.raises(ValueError, match=r"'poetry'.*\['arithmetic'"):
    _take(cfg, n=1)
  cfg = _cfg()
  cfg.sources.grammar.kind = "text"
  cfg.sources.grammar.path = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
    _take(cfg, n=1)
  cfg.sources.grammar.weight = 0.0  # disabled sources are not even opened
  assert _take(cfg, n=1)


# ----------------------------------------------------------------------------
# unigram entropy
# ----------------------------------------------------------------------------


def test_unigram_entropy_of_known_distribution():
  # Targets where loss_mask = 1: tokens 5, 6, 7, 8 with counts 4, 2, 1, 1.
  targets = np.array([[5, 5, 5, 5, 6, 6, 7, 8, 9, 9]], dtype=np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=np.float32)
  batch = {"targets": targets, "loss_mask": mask}
  p = np.array([4, 2, 1, 1]) / 8
  expected = float(-(p * np.log(p)).sum())
  assert math.isclose(data.unigram_entropy([batch, batch], 2), expected,
                      rel_tol=1e-9)
  uniform = {"targets": np.arange(1000).reshape(10, 100) % 4,
             "loss_mask": np.ones((10, 100), np.float32)}
  assert math.isclose(data.unigram_entropy(iter([uniform]), 5), math.log(4))
  with pytest.raises(ValueError, match="no target tokens"):
    data.unigram_entropy([{"targets": targets, "loss_mask": 0 * mask}], 1)


def test_unigram_entropy_of_pipeline_is_plausible():
  h = data.unigram_entropy(iter(data.make_batches(
      _cfg(), TOKENIZER, 8, seed=0, process_index=0, process_count=1)), 20)
  assert 2.0 < h < math.log(TOKENIZER.vocab_size)


def test_source_weights_are_normalised():
  weights = pipeline.source_weights(_cfg({"arithmetic": 3.0, "grammar": 1.0}))
  assert weights == {"arithmetic": 0.75, "grammar": 0.25, "sorting": 0.0}


# ----------------------------------------------------------------------------
# worker processes
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_processes_are_deterministic_and_resumable():
  cfg = _cfg(num_workers=2)
  make = lambda: iter(data.make_batches(cfg, TOKENIZER, 4, seed=1,
                                        process_index=0, process_count=1))
  it = make()
  try:
    for _ in range(3):
      next(it)
    state = json.loads(json.dumps(data.iterator_state(it)))
    expected = [next(it) for _ in range(4)]
  finally:
    it.close()
  fresh = make()
  try:
    data.restore_iterator(fresh, state)
    _assert_batches_equal([next(fresh) for _ in range(4)], expected)
  finally:
    fresh.close()
