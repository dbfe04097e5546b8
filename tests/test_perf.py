"""MFU bookkeeping: the peak of a device kind (and its source), and the model FLOPs of a step as it runs.

Expected FLOPs are written out from the model's dimensions here, not through the functions tested.
"""

import os

import pytest

from conftest import tiny_config
from emjax import config as config_lib
from emjax.train import loop
from emjax.train import perf
from emjax.train import settings


class _Device:
  def __init__(self, device_kind, platform):
    self.device_kind, self.platform = device_kind, platform


@pytest.mark.parametrize("kind, platform, tflops", [
    ("NVIDIA H100 80GB HBM3", "gpu", 989),  # SXM
    ("NVIDIA H100 PCIe", "gpu", 756),
    ("NVIDIA H100 NVL", "gpu", 835),
    ("NVIDIA H200", "gpu", 989),
    ("NVIDIA GH200 480GB", "gpu", 989),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312),
    ("NVIDIA L4", "gpu", 121),
    ("NVIDIA L40S", "gpu", 362),
    ("TPU v5 lite", "tpu", 197),
    ("TPU v5e", "tpu", 197),  # suffixes and spellings jax or a future libtpu may use
    ("TPU v5 litepod", "tpu", 197),
    ("TPU v5", "tpu", 459),
    ("TPU v5p", "tpu", 459),
    ("TPU v6 lite", "tpu", 918),
    ("TPU v4", "tpu", 275),
    ("TPU v3", "tpu", 61.5),  # a v3 device is one of the chip's two TensorCores
    ("TPU v4 lite", "tpu", None),  # an inference chip the table does not know: no MFU rather than a wrong one
    ("cpu", "cpu", None),
])
def test_peak_of_a_device_kind_and_its_source(kind, platform, tflops):
  device = _Device(kind, platform)
  peak = perf.peak_flops_per_device(0.0, device)
  if tflops is None:
    assert peak is None and perf.peak_source(0.0, device) is None
    return
  assert peak == pytest.approx(tflops * 1e12)
  assert perf.peak_source(0.0, device)
  assert perf.peak_flops_per_device(1e15, device) == 1e15


def _dims(c):
  m = c.model
  dh = m.d_model // m.n_heads
  n_matmul = m.n_layers * (m.d_model * dh * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff
                           + 2 * m.d_model) + m.d_model + m.vocab_size * m.d_model
  return m, dh, n_matmul


def test_lora_step_counts_the_frozen_base_forward_and_input_gradient_only():
  c = tiny_config()
  c.lora.update(enabled=True, rank=4, targets="q,v,down")
  m, dh, n_matmul = _dims(c)
  seq, tokens = c.data.seq_len, c.train.batch_size * c.data.seq_len
  adapters = m.n_layers * 4 * ((m.d_model + m.n_heads * dh) + (m.d_model + m.n_kv_heads * dh) + (m.d_ff + m.d_model))
  attention_fwd = 4 * m.n_heads * dh * m.n_layers * seq / 2
  want = (4 * n_matmul + 3 * attention_fwd + 6 * adapters) * tokens
  trainer = loop.Trainer(c)
  assert trainer.step_flops() == {"train": pytest.approx(want)}
  assert trainer.flops_per_step() == pytest.approx(want)
  full = loop.Trainer(tiny_config()).flops_per_step()
  assert full == pytest.approx((6 * n_matmul + 3 * attention_fwd) * tokens)
  assert trainer.flops_per_step() < full


def test_distillation_step_counts_the_teacher_forward_and_the_rollouts(tmp_path):
  teacher = settings.base_config()
  teacher.model.update(dict(tiny_config().model), d_model=64, n_heads=4, n_kv_heads=4, d_ff=128, n_layers=3)
  teacher_dir = str(tmp_path / "teacher")
  os.makedirs(teacher_dir)
  config_lib.write_config(teacher, teacher_dir)  # an architecture only: no weights are read here
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"id": "a", "prompt": "x"}\n')
  c = tiny_config()
  c.teacher.update(path=teacher_dir, dtype="float32")
  c.data.tokenizer = dict(teacher.data.tokenizer)
  c.train.update(objective="reverse_kl")
  c.on_policy.update(enabled=True, prompts=str(prompts), max_prompt_length=12, max_new_tokens=16, mix_lambda=0.5)
  m, dh, n_matmul = _dims(c)
  t, t_dh, t_matmul = _dims(teacher)
  seq, batch = c.data.seq_len, c.train.batch_size
  train = (6 * n_matmul + 12 * m.n_heads * dh * m.n_layers * seq / 2) * batch * seq
  teacher_fwd = (2 * t_matmul + 4 * t.n_heads * t_dh * t.n_layers * seq / 2) * batch * seq
  rollout = 12 + 16
  rollouts = 0.5 * batch * rollout * (2 * n_matmul + 4 * m.n_heads * dh * m.n_layers * rollout / 2)
  trainer = loop.Trainer(c)
  got = trainer.step_flops()
  assert got == {"train": pytest.approx(train), "teacher_forward": pytest.approx(teacher_fwd),
                 "rollouts": pytest.approx(rollouts)}
  assert trainer.flops_per_step() == pytest.approx(train + teacher_fwd + rollouts)
