"""PackedRowsIterDataset: segment ids, positions, targets, splitting, state."""

import grain
import numpy as np
import pytest

from emjax.data.packing import PackedRowsIterDataset, causal_lm_example

SEQ_LEN = 16


def _examples(lengths):
  """Causal-LM examples of documents with the given token counts.

  Token values encode (document, position) so every token is unique.
  """
  return [causal_lm_example([100 * d + 3 + j for j in range(n)], 1, 2)
          for d, n in enumerate(lengths)]


def _pack(examples, split_across_rows=True, seq_len=SEQ_LEN):
  ds = grain.MapDataset.source(examples).to_iter_dataset(
      grain.ReadOptions(num_threads=0))
  return list(PackedRowsIterDataset(ds, seq_len, pad_id=0,
                                    split_across_rows=split_across_rows))


def _pieces(rows):
  """(inputs, targets, loss_mask) of every segment, in order."""
  pieces = []
  for row in rows:
    for seg in range(1, row["segment_ids"].max() + 1):
      sel = row["segment_ids"] == seg
      idx = np.flatnonzero(sel)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "contiguous"
      assert np.array_equal(row["positions"][sel], np.arange(sel.sum()))
      pieces.append((row["inputs"][sel], row["targets"][sel],
                     row["loss_mask"][sel]))
  return pieces


LENGTHS = [3, 20, 0, 7, 40, 5, 14, 1, 15, 2]  # includes > L and == L - 1


@pytest.mark.parametrize("split_across_rows", [True, False])
def test_packing_invariants(split_across_rows):
  examples = _examples(LENGTHS)
  rows = _pack(examples, split_across_rows)
  for row in rows:
    assert set(row) == {"inputs", "targets", "segment_ids", "positions",
                        "loss_mask"}
    assert all(v.shape == (SEQ_LEN,) for v in row.values())
    assert row["inputs"].dtype == np.int32 and row["loss_mask"].dtype == np.float32
    padding = row["segment_ids"] == 0
    # loss_mask is zero exactly on padding (pretraining: all real tokens count)
    assert np.array_equal(row["loss_mask"] == 0, padding)
    assert not row["positions"][padding].any()
    assert not row["inputs"][padding].any() and not row["targets"][padding].any()
    # padding only at the end of a row
    if padding.any():
      assert padding[np.argmax(padding):].all()
    # segments are numbered 1, 2, ... in order
    segs = row["segment_ids"][~padding]
    assert segs[0] == 1 and np.all(np.diff(segs) >= 0) and np.all(np.diff(segs) <= 1)

  # No token dropped or duplicated: pieces concatenate back to the examples.
  pieces = _pieces(rows)
  for key_index, key in enumerate(("inputs", "targets", "loss_mask")):
    joined = np.concatenate([p[key_index] for p in pieces])
    expected = np.concatenate([e[key] for e in examples])
    np.testing.assert_array_equal(joined, expected)

  # Targets are the next input within a piece: no target crosses documents
  # (token values encode the document number: 100 * doc + ...).
  for inputs, targets, _ in pieces:
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    real = targets[targets > 2]
    if len(real):
      assert len(set(real // 100)) == 1

  if split_across_rows:
    # concat: every row but the last is full.
    assert all((r["segment_ids"] > 0).all() for r in rows[:-1])
  else:
    # greedy: an example no longer than L is never split.
    for n, example in zip(LENGTHS, examples):
      if n + 1 <= SEQ_LEN:
        assert any(np.array_equal(p[0], example["inputs"]) for p in pieces)
  # Long documents are split into pieces of at most L, not dropped.
  assert max(len(p[0]) for p in pieces) <= SEQ_LEN


def test_greedy_pads_and_concat_does_not():
  examples = _examples([9, 9, 9, 9])  # 10 tokens each after the shift
  greedy = _pack(examples, split_across_rows=False)
  concat = _pack(examples, split_across_rows=True)
  assert len(greedy) == 4 and len(concat) == 3
  assert all((r["segment_ids"] > 0).sum() == 10 for r in greedy)
  assert [int(r["segment_ids"].max()) for r in concat] == [2, 3, 1]


def test_custom_loss_mask_is_carried_through():
  example = causal_lm_example([5, 6, 7, 8], 1, 2)
  example["loss_mask"][:3] = 0.0  # e.g. SFT: only the answer counts
  (row,) = _pack([example])
  np.testing.assert_array_equal(row["loss_mask"][:5], [0, 0, 0, 1, 1])
  assert row["segment_ids"][:5].tolist() == [1] * 5


def test_malformed_example_is_reported():
  bad = {"inputs": np.arange(3), "targets": np.arange(4),
         "loss_mask": np.ones(3)}
  with pytest.raises(ValueError, match="equal length"):
    _pack([bad])
  with pytest.raises(ValueError, match="missing"):
    _pack([{"inputs": np.arange(3)}])


@pytest.mark.parametrize("split_across_rows", [True, False])
def test_packer_state_restores_exactly_at_every_row(split_across_rows):
  examples = _examples([30, 4, 17, 2, 9, 33, 1, 12, 5, 16, 8])
  ds = PackedRowsIterDataset(
      grain.MapDataset.source(examples).to_iter_dataset(
          grain.ReadOptions(num_threads=0)),
      SEQ_LEN, split_across_rows=split_across_rows)
  expected = list(ds)
  for k in range(len(expected)):
    it = iter(ds)
    for _ in range(k):
      next(it)
    state = it.get_state()
    fresh = iter(ds)
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(expected) - k
    for a, b in zip(rest, expected[k:]):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
