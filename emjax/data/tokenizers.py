"""Tokenizers: a dependency-free byte tokenizer, SentencePiece, Hugging Face.

Every tokenizer exposes the same small interface (`Tokenizer`): `encode` maps
text to ids *without* special tokens, and the pipeline adds `bos_id`/`eos_id`
around each document itself. `load_tokenizer(cfg)` builds one from the
`data.tokenizer` config block; `train_sentencepiece` (also available as
`python -m emjax.data.tokenizers train ...`) trains a SentencePiece model with
stable special ids (pad=0, bos=1, eos=2, unk=3).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from emjax.data import synthetic

TOKENIZER_KINDS = ("byte", "sentencepiece", "hf")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and samplers need from a tokenizer."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without bos/eos (the pipeline adds those)."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text."""
    ...


def _as_int_list(ids: Any) -> list[int]:
  """Accepts lists, tuples and numpy/jax arrays of ids."""
  if hasattr(ids, "tolist"):
    ids = ids.tolist()
  return [int(i) for i in ids]


class ByteTokenizer:
  """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, byte b -> b + 3.

  The fully offline default: no model file, vocab_size=259, and every string
  round-trips exactly.
  """

  pad_id = 0
  bos_id = 1
  eos_id = 2
  byte_offset = 3
  vocab_size = 256 + byte_offset

  def encode(self, text: str) -> list[int]:
    return [b + self.byte_offset for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    # Special ids (pad/bos/eos) carry no text; invalid UTF-8 (e.g. a sample cut
    # in the middle of a multi-byte character) is replaced, not an error.
    data = bytes(
        i - self.byte_offset
        for i in _as_int_list(ids)
        if self.byte_offset <= i < self.vocab_size
    )
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _resolve_special_ids(
    pad: int | None, bos: int | None, eos: int | None, what: str
) -> tuple[int, int, int]:
  """Fills missing special ids with documented fallbacks.

  eos is required (it separates documents). A missing bos falls back to eos
  (GPT-2 style: documents are delimited by one end-of-text token). A missing
  pad falls back to eos (SentencePiece passes 0 instead): padding positions
  are always masked out by `loss_mask` and `segment_ids == 0`, so the id used
  there never matters.
  """
  if eos is None:
    raise ValueError(
        f"{what} defines no end-of-sequence token; the data pipeline needs one"
        " to terminate documents."
    )
  if bos is None:
    bos = eos
  if pad is None:
    pad = eos
  return pad, bos, eos


class SentencePieceTokenizer:
  """A SentencePiece model file (`.model`).

  pad/bos/eos ids are read from the model. A model trained without a pad piece
  (pad_id=-1, the SentencePiece default) gets pad_id=0, which is then also a
  real piece (usually <unk>); that is harmless because padding is masked. A
  model without bos uses eos as bos. Models trained with `train_sentencepiece`
  have pad=0, bos=1, eos=2, unk=3.
  """

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    if not os.path.isfile(model_path):
      raise FileNotFoundError(
          f"SentencePiece model not found: {model_path!r}"
          " (set data.tokenizer.path to a .model file)."
      )
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = int(self._sp.get_piece_size())

    def known(i: int) -> int | None:
      return None if i < 0 else int(i)

    pad, bos, eos = (known(self._sp.pad_id()), known(self._sp.bos_id()),
                     known(self._sp.eos_id()))
    self.pad_id, self.bos_id, self.eos_id = _resolve_special_ids(
        pad if pad is not None else 0, bos, eos,
        f"SentencePiece model {model_path!r}")

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(_as_int_list(ids))

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_path!r})"

  # SentencePieceProcessor is not picklable; grain worker processes need to
  # pickle the pipeline, so pickle the path and reload.
  def __getstate__(self):
    return {"model_path": self.model_path}

  def __setstate__(self, state):
    self.__init__(state["model_path"])


class HFTokenizer:
  """A Hugging Face tokenizer loaded offline from a local directory (or cache).

  bos/eos/pad come from the tokenizer; see `_resolve_special_ids` for the
  fallbacks (bos -> eos; pad -> eos -> 0). `vocab_size` is `len(tokenizer)`,
  which includes added tokens.
  """

  def __init__(self, path: str):
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    self.path = path
    try:
      self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
      raise FileNotFoundError(
          f"Could not load a Hugging Face tokenizer from {path!r} without"
          f" network access (data.tokenizer.path): {e}"
      ) from e
    self.vocab_size = int(len(self._tok))
    self.pad_id, self.bos_id, self.eos_id = _resolve_special_ids(
        self._tok.pad_token_id, self._tok.bos_token_id,
        self._tok.eos_token_id, f"Hugging Face tokenizer {path!r}")

  @property
  def hf_tokenizer(self):
    """The wrapped `transformers` tokenizer (e.g. for chat templates)."""
    return self._tok

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False))

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(_as_int_list(ids))

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r})"

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """`cfg[key]` for dicts and ConfigDicts alike, with a default."""
  try:
    value = cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def load_tokenizer(cfg: Any) -> Tokenizer:
  """Builds the tokenizer described by the `data.tokenizer` config block.

  Args:
    cfg: ConfigDict or dict with `kind` ('byte' | 'sentencepiece' | 'hf') and
      `path` ('' for byte; a .model file for sentencepiece; a directory with
      tokenizer files for hf).

  Raises:
    ValueError: unknown kind.
    FileNotFoundError: the path is missing or does not exist.
  """
  kind = _cfg_get(cfg, "kind", "byte")
  path = _cfg_get(cfg, "path", "")
  if kind == "byte":
    return ByteTokenizer()
  if kind not in TOKENIZER_KINDS:
    raise ValueError(
        f"Unknown data.tokenizer.kind {kind!r}; expected one of"
        f" {list(TOKENIZER_KINDS)}."
    )
  if not path:
    raise FileNotFoundError(
        f"data.tokenizer.path must be set for data.tokenizer.kind={kind!r}."
    )
  if kind == "sentencepiece":
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"data.tokenizer.path={path!r} does not exist (expected a"
          " SentencePiece .model file)."
      )
    return SentencePieceTokenizer(path)
  # kind == "hf": a local directory, or a name already in the local HF cache.
  try:
    return HFTokenizer(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"data.tokenizer.path={path!r}: no local Hugging Face tokenizer there"
        f" ({e})"
    ) from e


def train_sentencepiece(
    texts: Iterable[str] | None = None,
    model_prefix: str = "spm",
    vocab_size: int = 1024,
    model_type: str = "bpe",
    *,
    input_files: Sequence[str] = (),
    character_coverage: float = 1.0,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
    extra_options: dict[str, Any] | None = None,
) -> str:
  """Trains a SentencePiece model; returns the path of the `.model` file.

  Special ids are fixed so that models are interchangeable in the pipeline:
  pad=0, bos=1, eos=2, unk=3. `byte_fallback=True` lets any string be encoded,
  and normalisation is disabled (identity rule, no dummy prefix, whitespace
  kept) so that `decode(encode(text)) == text` exactly, newlines included.

  Args:
    texts: documents to train on (each is split into lines; SentencePiece
      trains on lines). Either this or `input_files`.
    model_prefix: output prefix; writes `<prefix>.model` and `<prefix>.vocab`.
    vocab_size: total vocabulary size. With byte fallback this must exceed
      260 (4 specials + 256 byte pieces) plus the number of distinct
      characters.
    model_type: 'bpe' or 'unigram'.
    input_files: plain-text training files (one sentence per line).
    character_coverage: fraction of characters covered by pieces.
    max_sentences: sample at most this many training lines.
    num_threads: trainer threads (default: number of CPUs).
    extra_options: any further `SentencePieceTrainer.train` options.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  if texts is None and not input_files:
    raise ValueError("train_sentencepiece needs `texts` or `input_files`.")
  for f in input_files:
    if not os.path.isfile(f):
      raise FileNotFoundError(f"SentencePiece training input not found: {f!r}")
  out_dir = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(out_dir, exist_ok=True)

  options = dict(
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      pad_id=0, bos_id=1, eos_id=2, unk_id=3,
      pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>",
      byte_fallback=True,
      character_coverage=character_coverage,
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      # Newlines never reach the trainer (it trains on lines), so give "\n" its
      # own piece instead of leaving it to a byte-fallback piece.
      user_defined_symbols=["\n"],
      input_sentence_size=max_sentences,
      shuffle_input_sentence=True,
      num_threads=num_threads or os.cpu_count() or 1,
      minloglevel=2,
  )
  options.update(extra_options or {})

  if texts is not None:
    # Stream the documents through a temporary file: SentencePiece's own file
    # reader handles sampling and large corpora better than sentence_iterator.
    with tempfile.NamedTemporaryFile(
        "w", suffix=".txt", delete=False, encoding="utf-8") as f:
      tmp_input = f.name
      for text in texts:
        for line in text.split("\n"):
          if line.strip():
            f.write(line + "\n")
    files = [tmp_input, *input_files]
  else:
    tmp_input = None
    files = list(input_files)
  try:
    spm.SentencePieceTrainer.train(input=",".join(files), **options)
  finally:
    if tmp_input is not None:
      os.remove(tmp_input)
  return model_prefix + ".model"


def _main(argv: Sequence[str] | None = None) -> int:
  """`python -m emjax.data.tokenizers train ...`: train a SentencePiece model."""
  parser = argparse.ArgumentParser(
      prog="python -m emjax.data.tokenizers",
      description="Tokenizer utilities.")
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser(
      "train", help="Train a SentencePiece model (pad=0 bos=1 eos=2 unk=3).")
  train.add_argument("--input", nargs="+", default=[],
                     help="Plain-text training file(s), one sentence per line.")
  train.add_argument("--synthetic", default="",
                     help="Train on a built-in synthetic generator instead "
                     "(e.g. grammar, arithmetic, sorting).")
  train.add_argument("--num_docs", type=int, default=20_000,
                     help="Documents to draw from --synthetic.")
  train.add_argument("--seed", type=int, default=0,
                     help="Seed of the --synthetic generator.")
  train.add_argument("--vocab_size", type=int, required=True)
  train.add_argument("--output", required=True,
                     help="Output prefix: writes PREFIX.model and PREFIX.vocab.")
  train.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
  args = parser.parse_args(argv)

  if not args.input and not args.synthetic:
    parser.error("give --input FILE [FILE ...] or --synthetic NAME")
  texts = None
  if args.synthetic:
    docs = synthetic.SyntheticDocuments(
        args.synthetic, num_docs=args.num_docs, seed=args.seed)
    texts = (docs[i] for i in range(len(docs)))
  path = train_sentencepiece(
      texts, args.output, args.vocab_size, args.model_type,
      input_files=args.input)
  tok = SentencePieceTokenizer(path)
  print(f"Wrote {path} (vocab_size={tok.vocab_size}, pad={tok.pad_id},"
        f" bos={tok.bos_id}, eos={tok.eos_id}).")
  return 0


if __name__ == "__main__":
  sys.exit(_main())
