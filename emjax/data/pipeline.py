"""Training batches: tokenize -> pack (per source) -> mix rows -> batch.

Per shard (`data.shards`, default one per process) and per source `s` (in
sorted-name order; `source_id` = that index):

  grain.MapDataset.source(documents)
    [shard::shards]                       disjoint documents per shard
    .shuffle(seed_s).repeat()             new order every epoch, forever
    .map(document -> example)             {inputs, targets, loss_mask}
    .to_iter_dataset()
    -> PackedRowsIterDataset(seq_len)     rows + segment_ids/positions
    .map(add source_id)

then `grain.IterDataset.mix(rows_by_source, weights)` -> `.batch(batch/shards)`,
this process's shards side by side -> optional `mp_prefetch` (worker
processes) -> optional thread prefetch.

Sources are packed *separately* and mixed at the level of packed rows: with
the default 'concat' packing rows carry no padding, so the fraction of tokens
from each source equals its normalised weight, whatever its document lengths
(mixing documents would tie the token fraction to document lengths). Each
source's row stream depends only on (its config, seed, source name, shard
index/count, tokenizer, seq_len, packing): changing weights changes which rows
are taken, never what a source's k-th row is.

Batch format (numpy; this process's share of the global batch):

  inputs      int32   [b, L]
  targets     int32   [b, L]  next token within the same document
  segment_ids int32   [b, L]  1, 2, ... per packed piece; 0 = padding
  positions   int32   [b, L]  restarts at 0 in every segment; 0 on padding
  loss_mask   float32 [b, L]  1.0 where the target counts; 0 on padding
  source_id   int32   [b]     index into `source_names(data_cfg)`

Worker processes (`data.num_workers > 0`): grain re-imports the main module in
each worker, so the launching script needs an `if __name__ == "__main__":`
guard; grain reads absl flags, which `make_batches` marks as parsed (with
defaults) when the program has not parsed them itself (`absl.app.run` does).
Worker count is part of the data order: each worker packs its own slice of
every source, so changing `num_workers` changes (deterministically) the batch
sequence, and a checkpoint must be restored with the same `num_workers`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np

from emjax.data import sft
from emjax.data import sources as sources_lib
from emjax.data.packing import (
    PACKING_MODES,
    PackedRowsIterDataset,
    causal_lm_example,
)
from emjax.data.tokenizers import TOKENIZER_KINDS, Tokenizer

ExampleFn = Callable[[str], Mapping[str, np.ndarray]]

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask",
              "source_id")


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` config block with every field present (ready to lock).

  Fields:
    seq_len      L, tokens per row.
    tokenizer    kind ('byte' | 'sentencepiece' | 'hf') and path.
    sources      name -> source config (see `sources.default_source_config`:
                 kind, weight, path, text_field, split, name, num_docs, seed,
                 data_dir). `weight` is the mixture weight (normalised; 0
                 disables the source).
    shuffle      shuffle each source's documents (a new order every epoch).
    format       'text' (language modelling on documents) or 'chat'
                 (conversations; loss on assistant tokens; use packing='greedy').
    truncate     chat: cut conversations longer than seq_len + 1 tokens (and
                 count them) instead of raising an error.
    packing      'none' (one example per row, padded: a batch of B rows is B
                 examples, as SFT recipes count them), 'concat' (rows always full, documents may continue in the
                 next row) or 'greedy' (documents no longer than L stay
                 whole; pads).
    num_workers  grain worker processes (0 = pipeline runs in this process).
    shards       how many disjoint parts the data is cut into for the processes
                 (0 = one per process). Each shard takes documents s::shards of
                 every source and packs and mixes them on its own; a global batch
                 is `shards` blocks of batch_size/shards rows, block s from shard
                 s, and process i of n builds the blocks of shards
                 i*shards/n ... (i+1)*shards/n - 1. The batch sequence is a
                 function of the shard count, not of the process count: runs on
                 1 and on 2 processes with the same `shards` see the same global
                 batches. Must be a multiple of the number of processes and
                 divide train.batch_size.
    worker_buffer_size  batches buffered per worker process.
    read_threads threads reading + tokenizing documents per source (0 =
                 inline; best for in-memory and synthetic sources).
    prefetch     batches prepared ahead by a background thread (0 = none).
  """
  cfg = ml_collections.ConfigDict()
  cfg.seq_len = 128
  cfg.tokenizer = ml_collections.ConfigDict(dict(kind="byte", path=""))
  cfg.sources = ml_collections.ConfigDict({
      "arithmetic": sources_lib.default_source_config(
          kind="synthetic", name="arithmetic", weight=0.4),
      "grammar": sources_lib.default_source_config(
          kind="synthetic", name="grammar", weight=0.4),
      "sorting": sources_lib.default_source_config(
          kind="synthetic", name="sorting", weight=0.2),
  })
  cfg.shuffle = True
  cfg.packing = "concat"
  # 'text': documents for language modelling (loss on every token); 'chat':
  # conversations (emjax.data.sft) with the loss on assistant tokens only.
  cfg.format = "text"
  cfg.truncate = True  # chat: cut conversations longer than seq_len + 1 (counted), else an error
  cfg.num_workers = 0
  cfg.shards = 0
  cfg.worker_buffer_size = 2
  cfg.read_threads = 0
  cfg.prefetch = 2
  return cfg


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """`cfg[key]` for dicts and ConfigDicts alike, with a default."""
  try:
    value = cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def _items(mapping: Any) -> list[tuple[str, Any]]:
  """(name, value) pairs of a dict or ConfigDict, sorted by name."""
  if mapping is None:
    return []
  return sorted((str(k), v) for k, v in mapping.items())


def source_names(data_cfg: Any) -> list[str]:
  """Source names in `source_id` order (sorted, as ConfigDict orders keys)."""
  return [name for name, _ in _items(_get(data_cfg, "sources"))]


def source_weights(data_cfg: Any) -> dict[str, float]:
  """Normalised mixture weights by source name (sum to 1)."""
  weights = {name: float(_get(cfg, "weight"))
             for name, cfg in _items(_get(data_cfg, "sources"))}
  total = sum(weights.values())
  return {name: w / total for name, w in weights.items()}


def _check_nonnegative_int(value: Any, key: str, minimum: int = 0) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < minimum):
    raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}.")


def validate_data_config(data_cfg: Any) -> None:
  """Raises ValueError naming the offending key if `data_cfg` is unusable."""
  seq_len = _get(data_cfg, "seq_len")
  _check_nonnegative_int(seq_len, "data.seq_len", minimum=2)

  tokenizer_kind = _get(_get(data_cfg, "tokenizer", {}), "kind", "byte")
  if tokenizer_kind not in TOKENIZER_KINDS:
    raise ValueError(
        f"Unknown data.tokenizer.kind {tokenizer_kind!r}; expected one of"
        f" {list(TOKENIZER_KINDS)}.")

  data_format = _get(data_cfg, "format", "text")
  if data_format not in ("text", "chat"):
    raise ValueError(f"Unknown data.format {data_format!r}; expected 'text' or 'chat'.")
  packing = _get(data_cfg, "packing", "concat")
  if packing not in PACKING_MODES:
    raise ValueError(
        f"Unknown data.packing {packing!r}; expected one of"
        f" {list(PACKING_MODES)}.")
  for key in ("num_workers", "worker_buffer_size", "read_threads", "prefetch", "shards"):
    value = _get(data_cfg, key)
    if value is not None:
      _check_nonnegative_int(value, f"data.{key}")

  sources = _items(_get(data_cfg, "sources"))
  if not sources:
    raise ValueError("data.sources is empty: configure at least one source.")
  allowed_keys = set(sources_lib.default_source_config())
  total_weight = 0.0
  for name, source_cfg in sources:
    unknown = set(source_cfg.keys()) - allowed_keys
    if unknown:
      raise ValueError(
          f"data.sources.{name} has unknown keys {sorted(unknown)}; known keys:"
          f" {sorted(allowed_keys)}.")
    kind = _get(source_cfg, "kind")
    if kind not in sources_lib.SOURCE_KINDS:
      raise ValueError(
          f"Unknown data.sources.{name}.kind {kind!r}; expected one of"
          f" {list(sources_lib.SOURCE_KINDS)}.")
    weight = _get(source_cfg, "weight")
    if weight is None:
      raise ValueError(f"data.sources.{name}.weight is missing.")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
      raise ValueError(
          f"data.sources.{name}.weight must be a number, got {weight!r}.")
    if not math.isfinite(weight) or weight < 0:
      raise ValueError(
          f"data.sources.{name}.weight must be finite and >= 0, got {weight!r}.")
    total_weight += float(weight)
  if total_weight <= 0:
    keys = ", ".join(f"data.sources.{name}.weight" for name, _ in sources)
    raise ValueError(
        f"The mixture weights sum to {total_weight} ({keys}); at least one"
        " must be > 0.")


def _source_seed(seed: int, source_name: str) -> int:
  """Shuffle seed of one source: depends on its name, not on its position.

  So adding, removing or reweighting other sources leaves its stream alone.
  """
  name_hash = zlib.crc32(source_name.encode("utf-8"))
  return int(np.random.SeedSequence([int(seed), name_hash]).generate_state(1)[0])


class PretrainingExample:
  """document -> causal LM example ([bos] + encode(doc) + [eos], shifted).

  A class rather than a closure so that grain worker processes can pickle it.
  """

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, document: str) -> dict[str, np.ndarray]:
    return causal_lm_example(self.tokenizer.encode(document),
                             self.tokenizer.bos_id, self.tokenizer.eos_id)


class _AddSourceId:
  def __init__(self, source_id: int):
    self.source_id = np.int32(source_id)

  def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**row, "source_id": self.source_id}


def default_example_fn(data_cfg: Any, tokenizer: Tokenizer) -> ExampleFn:
  """Documents -> causal LM examples; conversations -> assistant-masked examples."""
  if _get(data_cfg, "format", "text") == "chat":
    return sft.ChatExample(tokenizer, int(_get(data_cfg, "seq_len")), bool(_get(data_cfg, "truncate", True)))
  return PretrainingExample(tokenizer)


def _resolve_process(process_index: int | None,
                     process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"Invalid process_index={process_index} / process_count={process_count}.")
  return int(process_index), int(process_count)


def make_source_rows(
    name: str,
    documents: Any,
    example_fn: ExampleFn,
    *,
    seq_len: int,
    seed: int,
    source_id: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    split_across_rows: bool = True,
    pad_id: int = 0,
    read_threads: int = 0,
    one_example_per_row: bool = False,
) -> grain.IterDataset:
  """The infinite stream of packed rows of one source (see module docstring).

  `documents` is any random-access source (e.g. from `sources.make_source`);
  `example_fn` turns one document into {inputs, targets, loss_mask}.
  """
  ds = grain.MapDataset.source(documents)
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(
        f"Source {name!r} has {len(documents)} documents: too few to give each"
        f" of {process_count} processes (data.shards) at least one.")
  if shuffle:
    ds = ds.shuffle(seed=_source_seed(seed, name))
  ds = ds.repeat()  # infinite; each epoch reshuffled (seed folded with epoch)
  ds = ds.map(example_fn)
  # prefetch_buffer_size only matters with threads; 0 threads reads inline.
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads,
      prefetch_buffer_size=max(16, 4 * read_threads) if read_threads else 0))
  rows = PackedRowsIterDataset(ds, seq_len, pad_id=pad_id,
                               split_across_rows=split_across_rows,
                               one_example_per_row=one_example_per_row)
  return rows.map(_AddSourceId(source_id))


def make_batches(
    data_cfg: Any,
    tokenizer: Tokenizer,
    global_batch_size: int,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    example_fn: ExampleFn | None = None,
) -> grain.IterDataset:
  """The infinite dataset of this process's batches (see module docstring).

  `iter(make_batches(...))` gives a grain `DatasetIterator`; checkpoint it with
  `iterator_state` / `restore_iterator`, and `close()` it when done (stops
  the prefetch thread and worker processes). Known grain quirk: with
  `data.prefetch > 0`, an iterator still alive at interpreter exit (e.g. a
  module-level variable in a script) makes grain print a harmless "Exception
  ignored in __del__" traceback; iterators held in function scope do not. The batch sequence is a pure function
  of (data_cfg, tokenizer, global_batch_size, seed, process_index,
  process_count).

  Args:
    data_cfg: the `data` config block (see `default_data_config`).
    tokenizer: used by the default `example_fn` and for the pad id.
    global_batch_size: rows per step over all processes (`train.batch_size`).
    seed: data seed (shuffling).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    example_fn: document -> {inputs, targets, loss_mask} equal-length arrays;
      defaults to `PretrainingExample(tokenizer)`. SFT can pass its own.
  """
  validate_data_config(data_cfg)
  process_index, process_count = _resolve_process(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"train.batch_size={global_batch_size} must be a positive multiple of"
        f" the number of processes ({process_count}).")
  shards = int(_get(data_cfg, "shards", 0)) or process_count
  if shards % process_count:
    raise ValueError(
        f"data.shards={shards} must be a multiple of the number of processes"
        f" ({process_count}).")
  if global_batch_size % shards:
    raise ValueError(
        f"train.batch_size={global_batch_size} must be a multiple of"
        f" data.shards={shards} (each shard gives the same number of rows per batch).")
  if example_fn is None:
    example_fn = default_example_fn(data_cfg, tokenizer)
  per_process = shards // process_count
  shard_ids = range(process_index * per_process, (process_index + 1) * per_process)
  parts = [_shard_batches(data_cfg, tokenizer, example_fn, global_batch_size // shards, seed=seed,
                          shard=shard, shards=shards) for shard in shard_ids]
  # One shard per process (the default) is exactly the pipeline of that shard.
  ds = parts[0] if len(parts) == 1 else ConcatBatchesIterDataset(parts)

  num_workers = int(_get(data_cfg, "num_workers", 0))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers,
        per_worker_buffer_size=int(_get(data_cfg, "worker_buffer_size", 2))))
  prefetch = int(_get(data_cfg, "prefetch", 0))
  if prefetch > 0:
    ds = _thread_prefetch(ds, prefetch)
  return ds


def _shard_batches(data_cfg: Any, tokenizer: Tokenizer, example_fn: ExampleFn, batch_size: int, *,
                   seed: int, shard: int, shards: int) -> grain.IterDataset:
  """Batches of `batch_size` rows of one shard: its documents of every source, packed, mixed."""
  rows_by_source: dict[str, grain.IterDataset] = {}
  weights: dict[str, float] = {}
  for source_id, (name, source_cfg) in enumerate(_items(_get(data_cfg, "sources"))):
    weight = float(_get(source_cfg, "weight"))
    if weight == 0:
      continue  # disabled: not even opened (grain cannot mix zero weights)
    documents = sources_lib.make_source(name, source_cfg)
    rows_by_source[name] = make_source_rows(
        name, documents, example_fn,
        seq_len=int(_get(data_cfg, "seq_len")), seed=seed, source_id=source_id,
        process_index=shard, process_count=shards,
        shuffle=bool(_get(data_cfg, "shuffle", True)),
        split_across_rows=_get(data_cfg, "packing", "concat") == "concat",
        one_example_per_row=_get(data_cfg, "packing", "concat") == "none",
        pad_id=tokenizer.pad_id,
        read_threads=int(_get(data_cfg, "read_threads", 0)))
    weights[name] = weight
  # A mapping (not a list) so that grain restores each source's state by name.
  ds = grain.IterDataset.mix(rows_by_source, weights)
  return ds.batch(batch_size, drop_remainder=True)


class ConcatBatchesIterDataset(grain.IterDataset):
  """Batches of several parent datasets side by side: row blocks in parent order (this process's shards)."""

  def __init__(self, parents: list[grain.IterDataset]):
    super().__init__(parents)

  def __iter__(self) -> grain.DatasetIterator:
    return _ConcatBatchesIterator([p.__iter__() for p in self._parents])

  def __str__(self) -> str:
    return f"ConcatBatchesIterDataset({len(self._parents)} parts)"


class _ConcatBatchesIterator(grain.DatasetIterator):

  def __init__(self, parents: list[grain.DatasetIterator]):
    super().__init__(parents)

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(p) for p in self._parents]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"parts": [p.get_state() for p in self._parents]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state["parts"]) != len(self._parents):
      raise ValueError(
          f"the data position holds {len(state['parts'])} shards, this process builds"
          f" {len(self._parents)} (data.shards / number of processes): it is not this pipeline's.")
    for p, s in zip(self._parents, state["parts"]):
      p.set_state(s)


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; parse them with defaults if the
  program did not (e.g. a script or notebook without `absl.app.run`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _thread_prefetch(ds: grain.IterDataset, buffer_size: int) -> grain.IterDataset:
  """Prepares `buffer_size` batches ahead in a thread (checkpoint-exact).

  `ThreadPrefetchIterDataset` lives in `grain.experimental`; without it the
  pipeline simply runs synchronously.
  """
  prefetch_cls = getattr(getattr(grain, "experimental", None),
                         "ThreadPrefetchIterDataset", None)
  if prefetch_cls is None:
    logging.warning(
        "grain.experimental.ThreadPrefetchIterDataset is unavailable in this"
        " grain version; data.prefetch=%d is ignored.", buffer_size)
    return ds
  return prefetch_cls(ds, prefetch_buffer_size=buffer_size)


def _to_json_value(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"iterator state holds a non-JSON value {value!r}")


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """JSON-serialisable snapshot of the iterator's position.

  It is grain's own state in plain JSON types: the mixture index plus, under
  the mixture's `parents` (keyed by source name), each source's packing
  offset and document index.
  """
  return json.loads(json.dumps(it.get_state(), default=_to_json_value))


def restore_iterator(it: grain.DatasetIterator, state: Mapping[str, Any]) -> None:
  """Moves `it` (a fresh or used iterator of the same pipeline) to `state`."""
  it.set_state(dict(state))


def unigram_entropy(batches: Iterable[Mapping[str, np.ndarray]] | grain.IterDataset,
                    num_batches: int) -> float:
  """Unigram entropy (nats/token) of the targets where loss_mask > 0.

  The loss of a model that ignores context entirely; a trained LM should go
  well below it. Consumes `num_batches` batches from `batches` (an iterator,
  an iterable, or a dataset, which is iterated afresh).
  """
  counts = np.zeros(0, dtype=np.int64)
  iterator = iter(batches)
  for _ in range(num_batches):
    try:
      batch = next(iterator)
    except StopIteration:
      break
    targets = np.asarray(batch["targets"])
    mask = np.asarray(batch["loss_mask"]) > 0
    batch_counts = np.bincount(targets[mask].ravel().astype(np.int64))
    if len(batch_counts) > len(counts):
      counts = np.pad(counts, (0, len(batch_counts) - len(counts)))
    counts[:len(batch_counts)] += batch_counts
  total = counts.sum()
  if total == 0:
    raise ValueError("unigram_entropy: no target tokens with loss_mask > 0.")
  p = counts[counts > 0] / total
  return float(-(p * np.log(p)).sum())
