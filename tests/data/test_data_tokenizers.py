"""Tokenizers: byte round trip, SentencePiece train/load, HF offline, config."""

import pickle

import numpy as np
import pytest

from emjax.data import synthetic
from emjax.data import tokenizers

TEXTS = [
    "",
    "the small dog sees a red ball .",
    "17 + 25 = 42\n9 * 3 = 27",
    "  leading and  double  spaces\n\nünïcødé 🙂 ",
]


def test_byte_tokenizer_round_trip_and_ids():
  tok = tokenizers.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  assert isinstance(tok, tokenizers.Tokenizer)
  for text in TEXTS:
    ids = tok.encode(text)
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
  assert tok.encode("A") == [ord("A") + 3]
  # Special ids carry no text; numpy input works.
  assert tok.decode(np.array([1, *tok.encode("hi"), 2, 0, 0])) == "hi"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  docs = synthetic.SyntheticDocuments("grammar", num_docs=300, seed=0)
  prefix = str(tmp_path_factory.mktemp("spm") / "grammar")
  return tokenizers.train_sentencepiece(
      (docs[i] for i in range(len(docs))), prefix, vocab_size=500)


def test_sentencepiece_train_load_round_trip(spm_model):
  tok = tokenizers.load_tokenizer({"kind": "sentencepiece", "path": spm_model})
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 500
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text
  # Trained pieces compress the training distribution well below 1 id/byte.
  doc = synthetic.SyntheticDocuments("grammar", num_docs=10, seed=5)[0]
  assert len(tok.encode(doc)) < 0.5 * len(doc)
  # Picklable (grain worker processes pickle the pipeline).
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(doc) == tok.encode(doc)


def test_sentencepiece_tokenizer_in_pipeline(spm_model):
  from emjax import data
  cfg = data.default_data_config()
  cfg.seq_len = 64
  cfg.tokenizer.kind = "sentencepiece"
  cfg.tokenizer.path = spm_model
  tok = data.load_tokenizer(cfg.tokenizer)
  it = iter(data.make_batches(cfg, tok, 4, seed=0, process_index=0,
                              process_count=1))
  batch = next(it)
  assert batch["inputs"].max() < tok.vocab_size
  assert (batch["inputs"] == tok.bos_id).any()


def test_sentencepiece_cli(tmp_path):
  corpus = tmp_path / "corpus.txt"
  docs = synthetic.SyntheticDocuments("arithmetic", num_docs=200, seed=0)
  corpus.write_text("\n".join(docs[i] for i in range(len(docs))))
  prefix = str(tmp_path / "out" / "arith")
  assert tokenizers._main(["train", "--input", str(corpus), "--vocab_size",
                           "300", "--output", prefix]) == 0
  tok = tokenizers.SentencePieceTokenizer(prefix + ".model")
  assert tok.decode(tok.encode("12 * 3 = 36")) == "12 * 3 = 36"


def _build_hf_tokenizer(directory):
  from tokenizers import Tokenizer as RawTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  raw.train_from_iterator(["the dog sees a ball .", "1 + 2 = 3"], trainer)
  PreTrainedTokenizerFast(
      tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
      pad_token="<pad>").save_pretrained(directory)


def test_hf_tokenizer_offline(tmp_path):
  pytest.importorskip("transformers")
  _build_hf_tokenizer(tmp_path / "hf")
  tok = tokenizers.load_tokenizer({"kind": "hf", "path": str(tmp_path / "hf")})
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size >= 259
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text


def test_load_tokenizer_errors(tmp_path):
  assert isinstance(tokenizers.load_tokenizer({"kind": "byte", "path": ""}),
                    tokenizers.ByteTokenizer)
  with pytest.raises(ValueError, match=r"data\.tokenizer\.kind.*'wordpiece'"
                     r".*\['byte', 'sentencepiece', 'hf'\]"):
    tokenizers.load_tokenizer({"kind": "wordpiece", "path": ""})
  with pytest.raises(FileNotFoundError, match=r"data\.tokenizer\.path"):
    tokenizers.load_tokenizer({"kind": "sentencepiece", "path": ""})
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizers.load_tokenizer({"kind": "sentencepiece", "path": missing})
  with pytest.raises(FileNotFoundError, match=r"data\.tokenizer\.path"):
    tokenizers.load_tokenizer({"kind": "hf", "path": str(tmp_path / "none")})
