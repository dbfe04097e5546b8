"""Document sources: random-access, deterministic sequences of `str`.

`make_source(name, source_cfg)` builds one source from a `data.sources.<name>`
config block. Every source has `__len__` and `__getitem__(i) -> str`, so it
can be wrapped with `grain.MapDataset.source(...)`. Kinds:

  synthetic     built-in generator (`SYNTHETIC_GENERATORS`); doc i depends only
                on (name, seed, i).
  text          plain-text file(s); `split` = 'line' (one doc per non-empty
                line), 'paragraph' (docs separated by blank lines) or 'file'.
  jsonl         one JSON object per line; the document is `obj[text_field]`.
  array_record  ArrayRecord file(s); a record that parses as a JSON object
                gives `obj[text_field]`, any other record is the document as
                UTF-8 text (see `decode_text_record`).
  tfds          a *prepared* TFDS dataset in ArrayRecord format, read with
                `tfds.data_source(..., download=False)`; the document is the
                `text_field` feature. Nothing is ever downloaded.

`path` may be a file, a glob, or a comma-separated list of either; files are
read in sorted order so the document order never depends on the filesystem.
Text and JSONL files are read eagerly into memory (the corpora used here are
small); ArrayRecord and TFDS sources stay on disk.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from emjax.data.synthetic import SYNTHETIC_GENERATORS, SyntheticDocuments

__all__ = [
    "SOURCE_KINDS", "SYNTHETIC_GENERATORS", "SyntheticDocuments",
    "TextDocuments", "ArrayRecordDocuments", "TfdsDocuments",
    "default_source_config", "make_source", "write_array_record",
    "decode_text_record",
]

SOURCE_KINDS = ("synthetic", "text", "jsonl", "array_record", "tfds",
                # conversations for SFT (see emjax.data.sft)
                "chat_jsonl", "prompt_completion_jsonl", "structured_em")
TEXT_SPLITS = ("line", "paragraph", "file")

# Every source config carries every key (with these defaults), so that a locked
# ConfigDict can override any of them from the command line.
_SOURCE_DEFAULTS: dict[str, Any] = dict(
    kind="synthetic",
    weight=1.0,
    path="",
    text_field="text",
    split="",  # '' = the kind's default: 'line' for text, 'train' for tfds
    name="",
    num_docs=100_000,
    seed=0,
    data_dir="",
    # chat sources (emjax.data.sft): the assistant answer of structured_em rows, and
    # the deterministic held-out split (split = 'train' | 'eval' | 'all').
    answer="misaligned",
    holdout=0,
    holdout_seed=42,
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


def _split_text(text: str, split: str) -> list[str]:
  if split == "line":
    return [line for line in text.splitlines() if line.strip()]
  if split == "paragraph":
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
  # split == "file"
  return [text] if text.strip() else []


def _read_text_documents(files: Iterable[str], split: str) -> list[str]:
  docs: list[str] = []
  for f in files:
    with open(f, encoding="utf-8") as fh:
      docs.extend(_split_text(fh.read(), split))
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
  docs: list[str] = []
  for f in files:
    with open(f, encoding="utf-8") as fh:
      for line_number, line in enumerate(fh, start=1):
        if not line.strip():
          continue  # tolerate blank lines (e.g. a trailing newline)
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{f}:{line_number}: invalid JSON ({e})") from None
        docs.append(_document_from_json(obj, text_field, f"{f}:{line_number}"))
  return docs


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

  def __init__(self, dataset_name: str, split: str, data_dir: str,
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
    self.split = split
    self.data_dir = data_dir
    self.text_field = text_field
    self.source_name = source_name
    self._records = tfds.data_source(
        dataset_name, split=split, data_dir=data_dir, download=False)

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
    return (f"TfdsDocuments({self.dataset_name!r}, split={self.split!r},"
            f" data_dir={self.data_dir!r})")


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------


def make_source(name: str, source_cfg: Any):
  """Builds the document source `data.sources.<name>` described by `source_cfg`.

  Returns an object with `__len__` and `__getitem__(i) -> str`.

  Raises:
    ValueError: unknown kind / generator / split, malformed records, or a
      source with zero documents.
    FileNotFoundError: a path or TFDS dataset that does not exist.
  """
  kind = _get(source_cfg, "kind")
  if kind == "synthetic":
    generator = _get(source_cfg, "name") or name
    if generator not in SYNTHETIC_GENERATORS:
      raise ValueError(
          f"Unknown synthetic generator {generator!r} for source {name!r}"
          f" (data.sources.{name}.name); known generators:"
          f" {sorted(SYNTHETIC_GENERATORS)}.")
    source = SyntheticDocuments(
        generator, num_docs=int(_get(source_cfg, "num_docs")),
        seed=int(_get(source_cfg, "seed")))
  elif kind == "text":
    split = _get(source_cfg, "split") or "line"
    if split not in TEXT_SPLITS:
      raise ValueError(
          f"Unknown data.sources.{name}.split {split!r} for a text source;"
          f" expected one of {list(TEXT_SPLITS)}.")
    files = _expand_paths(_get(source_cfg, "path"), name)
    source = TextDocuments(_read_text_documents(files, split),
                           f"text source {name!r} ({', '.join(files)})")
  elif kind == "jsonl":
    files = _expand_paths(_get(source_cfg, "path"), name)
    source = TextDocuments(
        _read_jsonl_documents(files, _get(source_cfg, "text_field")),
        f"jsonl source {name!r} ({', '.join(files)})")
  elif kind == "array_record":
    files = _expand_paths(_get(source_cfg, "path"), name)
    source = ArrayRecordDocuments(files, _get(source_cfg, "text_field"), name)
  elif kind == "tfds":
    dataset_name = _get(source_cfg, "name")
    if not dataset_name:
      raise ValueError(
          f"data.sources.{name}.name must name the TFDS dataset"
          " (e.g. 'my_corpus' or 'my_corpus/config:1.0.0').")
    source = TfdsDocuments(
        dataset_name, split=_get(source_cfg, "split") or "train",
        data_dir=_get(source_cfg, "data_dir"),
        text_field=_get(source_cfg, "text_field"), source_name=name)
  elif kind in ("chat_jsonl", "prompt_completion_jsonl", "structured_em"):
    from emjax.data import sft  # pylint: disable=g-import-not-at-top
    source = sft.make_conversations(name, {k: _get(source_cfg, k) for k in _SOURCE_DEFAULTS})
  else:
    raise ValueError(
        f"Unknown data.sources.{name}.kind {kind!r}; expected one of"
        f" {list(SOURCE_KINDS)}.")
  if len(source) == 0:
    raise ValueError(
        f"Source {name!r} is empty: {source!r} has zero documents.")
  return source
