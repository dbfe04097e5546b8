"""Document sources: random-access, deterministic sequences of documents.

`make_source(name, source_cfg)` builds one source from a `data.sources.<name>`
config block. Every source has `__len__` and `__getitem__(i)`, so it can be
wrapped with `grain.MapDataset.source(...)`. Kinds:

  synthetic     built-in generator (`SYNTHETIC_GENERATORS`); doc i depends only
                on (name, seed, i).
  text          plain-text file(s); `unit` = 'line' (one doc per non-empty
                line; the default), 'paragraph' (docs separated by blank lines)
                or 'file'.
  jsonl         one JSON object per line; the document is `obj[text_field]`.
  array_record  ArrayRecord file(s); a record that parses as a JSON object
                gives `obj[text_field]`, any other record is the document as
                UTF-8 text (see `decode_text_record`).
  tfds          a *prepared* TFDS dataset in ArrayRecord format, read with
                `tfds.data_source(..., download=False)`; the documents are the
                `text_field` feature of the TFDS split `tfds_split` ('train').
                Nothing is ever downloaded.
  chat_jsonl, prompt_completion_jsonl, structured_em
                conversations (dicts with `messages`) for SFT; see emjax.data.sft.

`path` may be a file, a glob, or a comma-separated list of either; files are
read in sorted order so the document order never depends on the filesystem.
Text and JSONL files are read eagerly into memory (the corpora used here are
small); ArrayRecord and TFDS sources stay on disk.

Held-out split
--------------
Every source has two disjoint partitions and `split` says which one it yields:
'train' (the default: what training reads), 'eval' (the held-out documents:
what `config.eval` and `experiments.compare_answers` read) or 'all' (both).
The partition is a property of the source's config, not of whether evaluation
is on, so a source's training documents are the same with `eval.every_steps`
on or off. `holdout` is the number of held-out documents; -1 (the default)
means the kind's default below.

  synthetic     'train' is documents 0..num_docs-1 (the same documents as
                before held-out splits existed); 'eval' is `holdout` further
                documents of a separate random stream (`SyntheticDocuments(...,
                held_out=True)`): new documents from the same distribution,
                independent of num_docs. 'all' is train then eval. Default
                holdout: 1000 (it costs the training stream nothing).
  text, jsonl, array_record, tfds (no eval_split), chat kinds
                of the source's n documents (in file order), the held-out ones
                are the first `holdout` entries of
                `np.random.default_rng(holdout_seed).permutation(n)` ('eval'
                yields them in that order); 'train' is the other n - holdout,
                in file order; 'all' is all n in file order. Default holdout:
                0 -- holding documents out changes the training set, so it is
                never implicit: training reads every document and
                `split='eval'` (a run with `eval.every_steps > 0`) is an error
                naming `data.sources.<name>.holdout`.
  tfds with eval_split
                'train' is the TFDS split `tfds_split`, 'eval' the split
                `eval_split` (e.g. 'validation'), 'all' both (train first);
                `holdout` must then stay unset.

A run with `eval.every_steps > 0` trains on every source's 'train' partition
(another `split` is refused) and evaluates on its 'eval' partition, so the
held-out loss is measured on documents training never reads.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from emjax.data import jsonl, sft
from emjax.data.holdout import held_out_indices
from emjax.data.synthetic import SYNTHETIC_GENERATORS, SyntheticDocuments

__all__ = [
    "SOURCE_KINDS", "PARTITIONS", "SYNTHETIC_GENERATORS", "SyntheticDocuments",
    "TextDocuments", "ArrayRecordDocuments", "TfdsDocuments", "Partition",
    "ConcatDocuments", "default_source_config",
    "make_source", "write_array_record", "decode_text_record",
]

# The chat kinds are conversations for SFT (emjax.data.sft).
SOURCE_KINDS = ("synthetic", "text", "jsonl", "array_record", "tfds") + sft.CHAT_KINDS
TEXT_UNITS = ("line", "paragraph", "file")
PARTITIONS = ("train", "eval", "all")
SYNTHETIC_HOLDOUT = 1000  # held-out documents of a synthetic source when holdout = -1

# Every source config carries every key (with these defaults), so that a locked
# ConfigDict can override any of them from the command line.
_SOURCE_DEFAULTS: dict[str, Any] = dict(
    kind="synthetic",
    weight=1.0,
    path="",
    text_field="text",
    # The partition this source yields: 'train' | 'eval' | 'all' (see "Held-out split").
    split="train",
    # Held-out documents (-1 = the kind's default: 1000 for synthetic, 0 otherwise), and the
    # seed of the permutation choosing them from a file source.
    holdout=-1,
    holdout_seed=42,
    unit="line",  # text: 'line' | 'paragraph' | 'file'
    name="",
    num_docs=100_000,
    seed=0,
    data_dir="",
    tfds_split="train",  # tfds: the TFDS split holding the source's documents
    eval_split="",  # tfds: a TFDS split to evaluate on instead of holding out of tfds_split
    answer="misaligned",  # structured_em: the assistant answer ('misaligned' | 'aligned')
)


def default_source_config(**overrides: Any) -> dict[str, Any]:
  """A source config dict with every key present; `overrides` win."""
  unknown = set(overrides) - set(_SOURCE_DEFAULTS)
  if unknown:
    raise ValueError(
        f"Unknown source config keys {sorted(unknown)}; known keys:"
        f" {sorted(_SOURCE_DEFAULTS)}.")
  cfg = dict(_SOURCE_DEFAULTS)
  cfg.update(overrides)
  return cfg


def _get(cfg: Any, key: str) -> Any:
  """`cfg[key]` for dicts and ConfigDicts, falling back to the default."""
  try:
    value = cfg[key]
  except (KeyError, AttributeError):
    value = None
  return _SOURCE_DEFAULTS[key] if value is None else value


# ----------------------------------------------------------------------------
# In-memory documents (text, jsonl)
# ----------------------------------------------------------------------------


class TextDocuments:
  """An in-memory list of documents with a description for error messages."""

  def __init__(self, docs: Sequence[str], description: str):
    self._docs = list(docs)
    self.description = description

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, index: int) -> str:
    return self._docs[int(index)]

  def __repr__(self) -> str:
    return f"TextDocuments({self.description}, {len(self)} docs)"


def _expand_paths(path: str, source_name: str) -> list[str]:
  """Files named by `path` (file | glob | comma-separated list), sorted.

  Raises FileNotFoundError naming the pattern and the source when a pattern
  matches nothing.
  """
  patterns = [p.strip() for p in str(path).split(",") if p.strip()]
  if not patterns:
    raise FileNotFoundError(
        f"data.sources.{source_name}.path is empty; set it to a file, a glob"
        " or a comma-separated list of files.")
  files: list[str] = []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
      matches = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
    else:
      matches = [pattern] if os.path.isfile(pattern) else []
    if not matches:
      raise FileNotFoundError(
          f"Source {source_name!r}: no file matches {pattern!r}"
          f" (data.sources.{source_name}.path).")
    files.extend(matches)
  return files


def _split_text(text: str, unit: str) -> list[str]:
  if unit == "line":
    return [line for line in text.splitlines() if line.strip()]
  if unit == "paragraph":
    paragraphs, current = [], []
    for line in text.splitlines():
      if line.strip():
        current.append(line)
      elif current:
        paragraphs.append("\n".join(current))
        current = []
    if current:
      paragraphs.append("\n".join(current))
    return paragraphs
  # unit == "file"
  return [text] if text.strip() else []


def _read_text_documents(files: Iterable[str], unit: str) -> list[str]:
  docs: list[str] = []
  for f in files:
    with open(f, encoding="utf-8") as fh:
      docs.extend(_split_text(fh.read(), unit))
  return docs


def _document_from_json(obj: Any, text_field: str, where: str) -> str:
  """`obj[text_field]` as a string, or a ValueError that says where."""
  if not isinstance(obj, dict):
    raise ValueError(
        f"{where}: expected a JSON object with field {text_field!r}, got"
        f" {type(obj).__name__}.")
  if text_field not in obj:
    raise ValueError(
        f"{where}: missing text field {text_field!r} (fields:"
        f" {sorted(obj)[:10]}).")
  value = obj[text_field]
  if not isinstance(value, str):
    raise ValueError(
        f"{where}: text field {text_field!r} is a {type(value).__name__},"
        " not a string.")
  return value


def _read_jsonl_documents(files: Iterable[str], text_field: str) -> list[str]:
  return [_document_from_json(obj, text_field, where) for f in files for where, obj in jsonl.read_objects(f)]


# ----------------------------------------------------------------------------
# ArrayRecord
# ----------------------------------------------------------------------------


def decode_text_record(record: bytes, text_field: str, where: str) -> str:
  """The document stored in one ArrayRecord record.

  Rule: if the record (UTF-8) parses as a JSON *object*, the document is
  `obj[text_field]`; otherwise the whole record is the document. So plain-text
  records and JSON records both work, and a JSON object without the field is
  an error rather than silently becoming its own serialisation.
  """
  text = record.decode("utf-8")
  stripped = text.lstrip()
  if stripped.startswith("{"):
    try:
      obj = json.loads(text)
    except json.JSONDecodeError:
      return text  # text that merely starts with "{"
    return _document_from_json(obj, text_field, where)
  return text


class ArrayRecordDocuments:
  """Documents stored in ArrayRecord files (see `decode_text_record`)."""

  def __init__(self, files: Sequence[str], text_field: str, source_name: str):
    import grain  # pylint: disable=g-import-not-at-top

    self.files = list(files)
    self.text_field = text_field
    self.source_name = source_name
    self._records = grain.sources.ArrayRecordDataSource(self.files)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> str:
    index = int(index)
    return decode_text_record(
        self._records[index], self.text_field,
        f"source {self.source_name!r} record {index}")

  def __repr__(self) -> str:
    return f"ArrayRecordDocuments({self.files}, text_field={self.text_field!r})"


def write_array_record(path: str, texts: Iterable[str | dict[str, Any]]) -> int:
  """Writes one record per item (str as UTF-8, dict as JSON); returns count.

  `group_size:1` keeps every record individually addressable, which is what
  random access (shuffling) wants.
  """
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  count = 0
  try:
    for item in texts:
      data = json.dumps(item) if isinstance(item, dict) else item
      writer.write(data.encode("utf-8"))
      count += 1
  finally:
    writer.close()
  return count


# ----------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------


def _tfds_data_dir(data_dir: str) -> str:
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.path.expanduser(
      os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


class TfdsDocuments:
  """The `text_field` feature of a prepared TFDS ArrayRecord dataset."""

  def __init__(self, dataset_name: str, tfds_split: str, data_dir: str,
               text_field: str, source_name: str):
    data_dir = _tfds_data_dir(data_dir)
    # Check for prepared files *before* touching TFDS: asking TFDS about a
    # dataset that is not on disk can make it look for the data on GCS, which
    # hangs without network access.
    base_name = dataset_name.split(":")[0].split("/")[0]
    if "://" not in data_dir and not os.path.isdir(
        os.path.join(data_dir, base_name)):
      raise FileNotFoundError(
          f"Source {source_name!r}: TFDS dataset {dataset_name!r} is not"
          f" prepared under {data_dir!r} (data.sources.{source_name}.data_dir)."
          " Prepare it in ArrayRecord format first (e.g. `tfds build"
          f" {base_name} --file_format=array_record --data_dir=...`); emjax"
          " never downloads data.")
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"Source {source_name!r} has kind 'tfds', which needs the"
          " `tensorflow-datasets` package (TensorFlow itself is not needed)."
      ) from e
    self.dataset_name = dataset_name
    self.tfds_split = tfds_split
    self.data_dir = data_dir
    self.text_field = text_field
    self.source_name = source_name
    self._records = tfds.data_source(
        dataset_name, split=tfds_split, data_dir=data_dir, download=False)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> str:
    example = self._records[int(index)]
    if self.text_field not in example:
      raise ValueError(
          f"Source {self.source_name!r}: TFDS example {index} has no feature"
          f" {self.text_field!r} (features: {sorted(example)};"
          f" data.sources.{self.source_name}.text_field).")
    value = example[self.text_field]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

  def __repr__(self) -> str:
    return (f"TfdsDocuments({self.dataset_name!r}, split={self.tfds_split!r},"
            f" data_dir={self.data_dir!r})")


# ----------------------------------------------------------------------------
# Held-out split (see the module docstring)
# ----------------------------------------------------------------------------


class Partition:
  """The 'train' or 'eval' partition of a random-access source, without copying it.

  'eval' is `documents[held_out[i]]`; 'train' is the documents not in
  `held_out`, in their order in `documents` (found by binary search, so a
  large on-disk source costs O(holdout) memory).
  """

  def __init__(self, documents: Any, held_out: np.ndarray, partition: str, description: str = ""):
    if partition not in ("train", "eval"):
      raise ValueError(f"partition must be 'train' or 'eval', got {partition!r}")
    self.documents = documents
    self.partition = partition
    self.description = description or repr(documents)
    self._held_out = np.asarray(held_out, np.int64)
    if partition == "train":
      ordered = np.sort(self._held_out)
      # ordered[k] - k = how many training documents come before the k-th held-out one.
      self._before = ordered - np.arange(len(ordered))
      self._len = len(documents) - len(ordered)
    else:
      self._len = len(self._held_out)

  def __len__(self) -> int:
    return self._len

  def source_index(self, index: int) -> int:
    """Index in the underlying source of this partition's document `index`."""
    index = int(index)
    if index < 0:
      index += self._len
    if not 0 <= index < self._len:
      raise IndexError(f"document {index} out of range for {self!r}")
    if self.partition == "eval":
      return int(self._held_out[index])
    return index + int(np.searchsorted(self._before, index, side="right"))

  def __getitem__(self, index: int):
    return self.documents[self.source_index(index)]

  def __repr__(self) -> str:
    return f"Partition({self.partition!r} of {self.description}, {len(self)} docs)"


class ConcatDocuments:
  """Several random-access sources one after another (a source's 'all' partition)."""

  def __init__(self, parts: Sequence[Any], description: str):
    self.parts = list(parts)
    self.description = description
    self._starts = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int):
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} out of range for {self!r}")
    part = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self.parts[part][index - int(self._starts[part])]

  def __repr__(self) -> str:
    return f"ConcatDocuments({self.description}, {len(self)} docs)"


def _partition_of(name: str, source_cfg: Any, kind: str) -> str:
  split = _get(source_cfg, "split") or "train"
  if split in PARTITIONS:
    return split
  hint = ""
  if kind == "text" and split in TEXT_UNITS:
    hint = f"; the unit of a text document is data.sources.{name}.unit={split!r}"
  elif kind == "tfds":
    hint = (f"; the TFDS split to read is data.sources.{name}.tfds_split (and"
            f" data.sources.{name}.eval_split a TFDS split to evaluate on)")
  raise ValueError(
      f"Unknown data.sources.{name}.split {split!r}: it picks the partition,"
      f" one of {list(PARTITIONS)}{hint}.")


def _holdout(name: str, source_cfg: Any, kind: str) -> int:
  holdout = int(_get(source_cfg, "holdout"))
  if holdout == -1:
    return SYNTHETIC_HOLDOUT if kind == "synthetic" else 0
  if holdout < 0:
    raise ValueError(
        f"data.sources.{name}.holdout={holdout}: the number of held-out"
        " documents must be >= 0 (or -1 for the kind's default).")
  return holdout


def _no_held_out_documents(name: str, kind: str) -> ValueError:
  tfds_hint = (f", or data.sources.{name}.eval_split to a prepared TFDS split"
               " such as 'validation'") if kind == "tfds" else ""
  return ValueError(
      f"data.sources.{name}.split='eval' but source {name!r} ({kind}) holds"
      " out no documents (a file source holds out nothing by default): set"
      f" data.sources.{name}.holdout=N to keep N documents, chosen with"
      f" data.sources.{name}.holdout_seed, out of its training split for"
      f" evaluation{tfds_hint}.")


def _split_documents(name: str, documents: Any, partition: str, holdout: int, seed: int,
                     description: str):
  """The `partition` of a file source's documents (module docstring, "Held-out split")."""
  if holdout > len(documents) or (partition == "train" and holdout and holdout == len(documents)):
    raise ValueError(
        f"data.sources.{name}.holdout={holdout} leaves no training documents:"
        f" {description} has {len(documents)}.")
  if partition == "all" or (partition == "train" and holdout == 0):
    return documents
  return Partition(documents, held_out_indices(len(documents), holdout, seed), partition,
                   description)


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------


def make_source(name: str, source_cfg: Any):
  """Builds the document source `data.sources.<name>` described by `source_cfg`.

  Returns an object with `__len__` and `__getitem__(i)`: the partition of the
  source named by its `split` (module docstring, "Held-out split").

  Raises:
    ValueError: unknown kind / generator / split / unit, malformed records, a
      held-out split that is empty, or a source with zero documents.
    FileNotFoundError: a path or TFDS dataset that does not exist.
  """
  kind = _get(source_cfg, "kind")
  if kind not in SOURCE_KINDS:
    raise ValueError(
        f"Unknown data.sources.{name}.kind {kind!r}; expected one of"
        f" {list(SOURCE_KINDS)}.")
  partition = _partition_of(name, source_cfg, kind)
  holdout = _holdout(name, source_cfg, kind)
  seed = int(_get(source_cfg, "holdout_seed"))
  eval_split = _get(source_cfg, "eval_split")
  if eval_split and kind != "tfds":
    raise ValueError(
        f"data.sources.{name}.eval_split={eval_split!r} names a TFDS split, but"
        f" the source's kind is {kind!r}: hold documents out with"
        f" data.sources.{name}.holdout instead.")
  if eval_split and int(_get(source_cfg, "holdout")) != -1:
    raise ValueError(
        f"data.sources.{name}: set either eval_split={eval_split!r} (a TFDS split"
        f" to evaluate on) or holdout={holdout} (documents held out of"
        f" tfds_split), not both.")
  if partition == "eval" and holdout == 0 and not eval_split:
    raise _no_held_out_documents(name, kind)

  if kind == "synthetic":
    generator = _get(source_cfg, "name") or name
    if generator not in SYNTHETIC_GENERATORS:
      raise ValueError(
          f"Unknown synthetic generator {generator!r} for source {name!r}"
          f" (data.sources.{name}.name); known generators:"
          f" {sorted(SYNTHETIC_GENERATORS)}.")
    num_docs, doc_seed = int(_get(source_cfg, "num_docs")), int(_get(source_cfg, "seed"))
    parts = []
    if partition in ("train", "all"):
      parts.append(SyntheticDocuments(generator, num_docs=num_docs, seed=doc_seed))
    if partition in ("eval", "all") and holdout:
      parts.append(SyntheticDocuments(generator, num_docs=holdout, seed=doc_seed, held_out=True))
    source = parts[0] if len(parts) == 1 else ConcatDocuments(
        parts, f"synthetic source {name!r}, train + eval")
  elif kind == "tfds":
    dataset_name = _get(source_cfg, "name")
    if not dataset_name:
      raise ValueError(
          f"data.sources.{name}.name must name the TFDS dataset"
          " (e.g. 'my_corpus' or 'my_corpus/config:1.0.0').")

    def tfds_documents(tfds_split: str) -> TfdsDocuments:
      return TfdsDocuments(
          dataset_name, tfds_split=tfds_split, data_dir=_get(source_cfg, "data_dir"),
          text_field=_get(source_cfg, "text_field"), source_name=name)

    tfds_split = _get(source_cfg, "tfds_split") or "train"
    if not eval_split:
      source = _split_documents(name, tfds_documents(tfds_split), partition, holdout, seed,
                                f"tfds source {name!r} ({dataset_name}, {tfds_split})")
    elif partition == "all":
      source = ConcatDocuments([tfds_documents(tfds_split), tfds_documents(eval_split)],
                               f"tfds source {name!r} ({dataset_name}, {tfds_split} + {eval_split})")
    else:
      source = tfds_documents(tfds_split if partition == "train" else eval_split)
  else:
    if kind == "text":
      unit = _get(source_cfg, "unit") or "line"
      if unit not in TEXT_UNITS:
        raise ValueError(
            f"Unknown data.sources.{name}.unit {unit!r} for a text source;"
            f" expected one of {list(TEXT_UNITS)}.")
      files = _expand_paths(_get(source_cfg, "path"), name)
      description = f"text source {name!r} ({', '.join(files)})"
      documents = TextDocuments(_read_text_documents(files, unit), description)
    elif kind == "jsonl":
      files = _expand_paths(_get(source_cfg, "path"), name)
      description = f"jsonl source {name!r} ({', '.join(files)})"
      documents = TextDocuments(
          _read_jsonl_documents(files, _get(source_cfg, "text_field")), description)
    elif kind == "array_record":
      files = _expand_paths(_get(source_cfg, "path"), name)
      description = f"array_record source {name!r} ({', '.join(files)})"
      documents = ArrayRecordDocuments(files, _get(source_cfg, "text_field"), name)
    else:  # sft.CHAT_KINDS
      documents = sft.make_conversations(name, {k: _get(source_cfg, k) for k in _SOURCE_DEFAULTS})
      description = documents.description
    source = _split_documents(name, documents, partition, holdout, seed, description)
  if len(source) == 0:
    raise ValueError(
        f"Source {name!r} is empty: {source!r} has zero documents"
        f" (data.sources.{name}.split={partition!r}).")
  return source
