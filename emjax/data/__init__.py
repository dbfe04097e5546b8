"""Data: tokenizers, document sources, and the packed, mixed batch pipeline.

Typical use::

  from emjax import data
  tokenizer = data.load_tokenizer(cfg.data.tokenizer)
  it = iter(data.make_batches(cfg.data, tokenizer, cfg.train.batch_size,
                              seed=cfg.seed))
  batch = next(it)                      # dict of numpy arrays (pipeline.py)
  state = data.iterator_state(it)       # JSON-serialisable
  data.restore_iterator(fresh_iterator, state)

Names are imported lazily (PEP 562) so that `python -m emjax.data.tokenizers`
does not import its own module twice.
"""

import importlib

_EXPORTS = {
    "packing": ("PackedRowsIterDataset", "causal_lm_example"),
    "pipeline": (
        "BATCH_KEYS", "PretrainingExample", "default_data_config",
        "iterator_state", "make_batches", "restore_iterator", "source_names",
        "source_weights", "unigram_entropy", "validate_data_config",
    ),
    "sources": (
        "SYNTHETIC_GENERATORS", "default_source_config", "make_source",
        "write_array_record",
    ),
    "tokenizers": (
        "ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer",
        "load_tokenizer", "train_sentencepiece",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items()
              for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name in _EXPORTS or name == "synthetic":  # a submodule, e.g. data.sources
    return importlib.import_module(f"emjax.data.{name}")
  module = _MODULE_OF.get(name)
  if module is None:
    raise AttributeError(f"module 'emjax.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"emjax.data.{module}"), name)
  globals()[name] = value  # cache: later lookups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
