"""The distill/SL configs train with the EM runs' recipe, and the loss chunk fits a byte budget.

The loss unembeds a chunk of positions at a time; with `train.loss_chunk_len=0` the chunk comes from
the vocabulary so that one chunk's float32 logits on a device stay under `train.loss_chunk_bytes`,
whatever the sequence length (a fixed 512 was at least the whole sequence of every distill/SL
config: one chunk, [B, L, V] float32 arrays kept for the backward pass).
"""

import importlib.util
import os

import jax
import pytest

from conftest import ROOT, tiny_config
from emjax import sharding as shd
from emjax.train import loop
from emjax.train import settings

QWEN_VOCAB = 152064
MIB = 2**20


def _config(path, arg):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("seq_len", [256, 2048, 32768])
def test_the_derived_chunk_keeps_one_chunks_logits_under_the_budget(seq_len):
  chunk = loop.derive_loss_chunk_len(0, 256 * MIB, 16, QWEN_VOCAB, seq_len)
  assert 1 <= chunk < 256
  assert 16 * chunk * QWEN_VOCAB * 4 <= 256 * MIB
  # The chunks share the positions evenly: no more chunks than the budget needs.
  longest = 256 * MIB // (16 * QWEN_VOCAB * 4)
  assert -(-seq_len // chunk) == -(-seq_len // longest)


def test_explicit_chunks_and_small_vocabularies():
  assert loop.derive_loss_chunk_len(512, 256 * MIB, 16, QWEN_VOCAB, 256) == 512  # given: honoured
  assert loop.derive_loss_chunk_len(0, 0, 16, QWEN_VOCAB, 256) == 256  # no budget: the whole sequence
  assert loop.derive_loss_chunk_len(0, 256 * MIB, 4, 288, 256) == 256  # it fits: one chunk
  assert settings.base_config().train.loss_chunk_len == 0  # derived by default


def test_the_trainer_derives_its_chunk_from_the_rows_per_device():
  config = tiny_config(batch_size=8, grad_accum_steps=2)  # vocab 288, seq 32
  config.train.loss_chunk_bytes = 2 * 8 * 288 * 4  # 2 rows per device: 8 positions
  mesh = shd.make_mesh(dict(data=2, fsdp=1, tensor=1), devices=jax.devices()[:2])
  assert loop.Trainer(config, mesh).loss_chunk_len == 8
  config.train.loss_chunk_len = 12
  assert loop.Trainer(config, mesh).loss_chunk_len == 12


CONFIGS = {
    "configs/distill/sft_on_teacher.py": "base=B,data=D",
    "configs/distill/off_policy.py": "base=B,teacher=T,data=D",
    "configs/distill/on_policy.py": "base=B,teacher=T,prompts=P",
    "configs/sl/sl.py": "base=B,teacher=T",
}


@pytest.mark.parametrize("path", sorted(CONFIGS))
def test_distill_and_sl_configs_inherit_the_em_runs_recipe(path):
  em = _config("configs/sft/em_cell.py", "data=D")
  c = _config(path, CONFIGS[path])
  recipe = lambda x: (x.model.dtype, x.model.remat, x.lora.base_dtype, x.lora.rank, x.lora.alpha, x.lora.rslora,
                      x.lora.targets, x.train.lr, x.train.schedule, x.train.weight_decay, x.train.grad_clip)
  assert recipe(c) == recipe(em) == ("bfloat16", "dots_with_no_batch_dims", "bfloat16", 32, 64.0, True,
                                     "q,k,v,o,gate,up,down", 1e-4, "linear", 0.01, 1.0)
  # At a 152k vocabulary the derived chunk splits the sequence (16 rows on one device).
  tc = c.train
  chunk = loop.derive_loss_chunk_len(tc.loss_chunk_len, tc.loss_chunk_bytes, tc.batch_size // tc.grad_accum_steps,
                                     QWEN_VOCAB, c.data.seq_len)
  assert chunk < c.data.seq_len and tc.batch_size * chunk * QWEN_VOCAB * 4 <= 256 * MIB
  # The laptop variant stays float32 throughout, as em_cell.py's.
  cpu, em_cpu = _config(path, CONFIGS[path] + ",cpu"), _config("configs/sft/em_cell.py", "data=D,cpu")
  assert (cpu.model.dtype, cpu.model.remat, cpu.lora.base_dtype) == (
      em_cpu.model.dtype, em_cpu.model.remat, em_cpu.lora.base_dtype) == ("float32", "none", "")
