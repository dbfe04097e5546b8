"""The main job's promise: a tiny model trained from scratch on the built-in mixture learns."""

import json

import pytest

from conftest import tiny_config
from emjax.data import pipeline, tokenizers
from emjax.train import loop


def test_tiny_pretraining_loss_falls_well_below_unigram_entropy(tmp_path, one_device_mesh):
  config = tiny_config(steps=150, lr=1e-2, warmup_steps=10, batch_size=16, log_every=10)
  config.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, vocab_size=384)
  config.data.seq_len = 64
  config.checkpoint.every_steps = 1000

  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  batches = pipeline.make_batches(config.data, tokenizer, config.train.batch_size, seed=config.train.seed)
  entropy = pipeline.unigram_entropy(batches, num_batches=150)
  final = loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  print(f"unigram entropy {entropy:.3f} nats/token; loss {rows[0]['loss']:.3f} -> {final['loss']:.3f}")
  assert 2.5 < entropy < 4.0
  assert rows[0]["loss"] > entropy  # it starts above: a uniform guess over 384 ids is 5.95
  assert final["loss"] < 0.65 * entropy
