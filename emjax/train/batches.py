"""Batch sources: where the training loop's batches come from, resumably.

The loop asks a source for this process's rows of the next global batch and,
at every checkpoint, for its position; restoring that position makes the
source continue with exactly the batches it would have produced. Any object
with this protocol is a source:

    next(source)          -> dict of numpy arrays, this process's rows ([b, L, ...])
    source.get_state()    -> JSON-serialisable dict, this process's position
    source.set_state(s)   -> continue from a state `get_state` returned
    source.close()        -> stop background threads / worker processes

`GrainBatchSource` (the grain pipeline of `emjax.data.pipeline`) is one
implementation; an on-policy source (rollouts sampled from the student's
current weights each step) is another, with its own state. Such a source may
define `set_weights(params, frozen)`: the loop calls it with the current train
state's parameters right before `next(source)`. Those arrays are donated to the
step that follows, so the source must use them within `next` (or copy them);
a reference kept for later reads deleted buffers.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import jax
import numpy as np

from emjax.data import pipeline


@runtime_checkable
class BatchSource(Protocol):

  def __next__(self) -> dict[str, np.ndarray]:
    ...

  def get_state(self) -> dict[str, Any]:
    ...

  def set_state(self, state: Mapping[str, Any]) -> None:
    ...

  def close(self) -> None:
    ...


def epoch_rows(step: int, batch_size: int, num_rows: int, seed: tuple[int, ...]) -> np.ndarray:
  """Indices of global batch `step` when epoch e visits `num_rows` rows in the permutation seeded by (*seed, e).

  Batch s is positions s*B .. s*B+B-1 of the concatenated epochs, so a batch may span two epochs
  and the sequence depends only on (step, batch_size, num_rows, seed): a source that records its
  step resumes exactly.
  """
  flat = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, within = flat // num_rows, flat % num_rows
  out = np.empty_like(flat)
  for epoch in np.unique(epochs):
    order = np.random.default_rng([*seed, int(epoch)]).permutation(num_rows)
    out[epochs == epoch] = order[within[epochs == epoch]]
  return out


# What fixes the order of a grain pipeline's batches beyond the config's data
# block: a checkpoint restored under other values would silently continue with
# different data, so they are recorded with the position and compared.
_ORDER_KEYS = ("num_workers", "process_count", "process_index", "local_batch_size", "shards")


class GrainBatchSource:
  """This process's batches of the configured grain pipeline (`emjax.data.pipeline.make_batches`)."""

  def __init__(self, data_cfg, tokenizer, global_batch_size: int, *, seed: int,
               process_index: int | None = None, process_count: int | None = None):
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    self._iterator = iter(pipeline.make_batches(data_cfg, tokenizer, global_batch_size, seed=seed,
                                                process_index=process_index, process_count=process_count))
    self.order = {"num_workers": int(data_cfg.get("num_workers", 0) or 0),
                  "shards": int(data_cfg.get("shards", 0) or 0) or int(process_count),
                  "process_count": int(process_count),
                  "process_index": int(process_index), "local_batch_size": global_batch_size // process_count}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return {"order": dict(self.order), "iterator": pipeline.iterator_state(self._iterator)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "iterator" not in state:  # a checkpoint written before positions carried their pipeline settings
      pipeline.restore_iterator(self._iterator, state)
      return
    saved = dict(state.get("order", {}))
    for key in _ORDER_KEYS:
      if key in saved and saved[key] != self.order[key]:
        where = {"num_workers": "config.data.num_workers", "shards": "config.data.shards",
                 "local_batch_size": "config.train.batch_size / processes",
                 "process_count": "the number of processes", "process_index": "this process's index"}[key]
        raise ValueError(
            f"the checkpoint's data position was saved with {key}={saved[key]}, this run has {self.order[key]} "
            f"({where}); the batch order depends on it, so resuming would silently change the data. "
            f"Resume with the same setting, or start a new workdir.")
    pipeline.restore_iterator(self._iterator, state["iterator"])

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:  # stops grain's prefetch thread and worker processes
      close()
