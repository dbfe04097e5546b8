"""Per-example arrays and a deterministic, exactly checkpointable row packer.

An *example* is a dict of equal-length 1-D arrays

  inputs     int32   token ids fed to the model
  targets    int32   the token to predict at each position
  loss_mask  float32 1.0 where the target counts

Pretraining builds one per document with `causal_lm_example` (targets are the
inputs shifted by one within the document); an SFT pipeline can build its own,
e.g. with a loss mask that is 1 only on assistant tokens. `PackedRowsIterDataset`
packs a stream of examples into rows of exactly `seq_len` tokens and adds

  segment_ids int32  1, 2, 3, ... per example piece in the row; 0 = padding
  positions   int32  position within the piece (restarts at 0); 0 on padding

Because targets are computed per example before packing, no target ever
crosses an example boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

EXAMPLE_KEYS = ("inputs", "targets", "loss_mask")
ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PACKING_MODES = ("concat", "greedy", "none")


def causal_lm_example(
    token_ids: Sequence[int], bos_id: int, eos_id: int
) -> dict[str, np.ndarray]:
  """The pretraining example of one document.

  tokens = [bos] + token_ids + [eos]; inputs = tokens[:-1],
  targets = tokens[1:], and every target counts (loss_mask = 1).
  """
  tokens = np.empty(len(token_ids) + 2, dtype=np.int32)
  tokens[0] = bos_id
  tokens[1:-1] = token_ids
  tokens[-1] = eos_id
  return {
      "inputs": tokens[:-1],
      "targets": tokens[1:],
      "loss_mask": np.ones(len(tokens) - 1, dtype=np.float32),
  }


def _check_example(example: Mapping[str, Any]) -> int:
  """Returns the example's length; raises on a malformed example."""
  missing = [k for k in EXAMPLE_KEYS if k not in example]
  if missing:
    raise ValueError(
        f"Packing needs examples with keys {list(EXAMPLE_KEYS)}; missing"
        f" {missing} (got keys {sorted(example)}).")
  lengths = {k: np.shape(example[k]) for k in EXAMPLE_KEYS}
  if any(len(s) != 1 for s in lengths.values()) or len(
      {s[0] for s in lengths.values()}) != 1:
    raise ValueError(
        f"Example arrays must be 1-D and of equal length; got shapes {lengths}.")
  return lengths["inputs"][0]


class PackedRowsIterDataset(grain.IterDataset):
  """Packs examples into rows of `seq_len` tokens, in stream order.

  Two modes:

  * ``split_across_rows=True`` ('concat' packing, the pretraining default):
    every row is filled completely. An example that does not fit in what is
    left of the row fills it, and its remainder becomes a new segment at the
    start of the next row. Rows of an infinite stream contain no padding, so a
    mixture of packed rows has exactly the token fractions of its row
    fractions.
  * ``split_across_rows=False`` ('greedy' next-fit packing, e.g. for SFT): an
    example that does not fit in the rest of the row starts a new row and the
    rest is padding. Only examples longer than `seq_len` are split (into
    pieces of `seq_len`; the last piece may share a row).
  * ``one_example_per_row=True`` ('none' packing): each row holds one example
    (or one piece of a longer one), padded; a batch of B rows is B examples,
    as fine-tuning recipes that count examples per batch expect.

  Each piece of an example is its own segment, with positions restarting at 0
  (so positions never exceed `seq_len - 1`). No token is ever dropped.

  Checkpointing is exact and cheap: rows are produced one at a time and the
  state is (parent state before the partially consumed example, number of its
  tokens already emitted). Restoring re-reads that one example.
  """

  def __init__(
      self,
      parent: grain.IterDataset,
      seq_len: int,
      *,
      pad_id: int = 0,
      split_across_rows: bool = True,
      one_example_per_row: bool = False,
  ):
    super().__init__(parent)
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    self._seq_len = int(seq_len)
    self._pad_id = int(pad_id)
    self._split_across_rows = bool(split_across_rows)
    self._one_example_per_row = bool(one_example_per_row)

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedRowsIterator(
        self._parent.__iter__(), self._seq_len, self._pad_id,
        self._split_across_rows, self._one_example_per_row)

  def __str__(self) -> str:
    return (f"PackedRowsIterDataset(seq_len={self._seq_len},"
            f" split_across_rows={self._split_across_rows})")


class _PackedRowsIterator(grain.DatasetIterator):
  """Iterator of `PackedRowsIterDataset`; see there for the semantics."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int,
               split_across_rows: bool, one_example_per_row: bool = False):
    super().__init__(parent)
    self._one_example_per_row = one_example_per_row
    self._seq_len = seq_len
    self._pad_id = pad_id
    self._split_across_rows = split_across_rows
    # The example being emitted (None when the next row starts with a fresh
    # example), how many of its tokens were emitted already, and the parent
    # state from just before it was read.
    self._pending: Mapping[str, np.ndarray] | None = None
    self._pending_length = 0
    self._offset = 0
    self._pending_parent_state: dict[str, Any] | None = None
    # Set by `set_state`: tokens of the first example read to skip.
    self._restored_offset = 0

  def _read_example(self) -> bool:
    """Reads the next example into `_pending`; False if the parent is done."""
    parent_state = self._parent.get_state()
    try:
      example = next(self._parent)
    except StopIteration:
      return False
    self._pending_length = _check_example(example)
    self._pending = {k: np.asarray(example[k]) for k in EXAMPLE_KEYS}
    self._pending_parent_state = parent_state
    self._offset, self._restored_offset = self._restored_offset, 0
    if self._offset > self._pending_length:
      raise ValueError(
          f"Packing state offset {self._offset} is beyond the restored"
          f" example's length {self._pending_length}: the checkpoint does not"
          " match this data pipeline.")
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    seq_len = self._seq_len
    row = {
        "inputs": np.full(seq_len, self._pad_id, dtype=np.int32),
        "targets": np.full(seq_len, self._pad_id, dtype=np.int32),
        "segment_ids": np.zeros(seq_len, dtype=np.int32),
        "positions": np.zeros(seq_len, dtype=np.int32),
        "loss_mask": np.zeros(seq_len, dtype=np.float32),
    }
    filled = 0
    segment = 0
    while filled < seq_len:
      if self._pending is None and not self._read_example():
        break  # parent exhausted: emit the partial row (if any)
      remaining = self._pending_length - self._offset
      if remaining == 0:  # empty example: nothing to place
        self._pending = None
        continue
      space = seq_len - filled
      if remaining > space and filled > 0 and not self._split_across_rows:
        break  # greedy: start this example on a fresh row
      take = min(remaining, space)
      segment += 1
      source = slice(self._offset, self._offset + take)
      target = slice(filled, filled + take)
      for key in EXAMPLE_KEYS:
        row[key][target] = self._pending[key][source]
      row["segment_ids"][target] = segment
      row["positions"][target] = np.arange(take, dtype=np.int32)
      filled += take
      self._offset += take
      if self._offset == self._pending_length:
        self._pending = None
        if self._one_example_per_row:
          break  # 'none' packing: the rest of the row is padding
    if filled == 0:
      raise StopIteration
    return row

  def get_state(self) -> dict[str, Any]:
    if self._pending is None:
      return {"parent": self._parent.get_state(),
              "offset": int(self._restored_offset)}
    return {"parent": self._pending_parent_state, "offset": int(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = None
    self._pending_parent_state = None
    self._offset = 0
    self._restored_offset = int(state["offset"])

  def __str__(self) -> str:
    return f"PackedRowsIterator(seq_len={self._seq_len})"
