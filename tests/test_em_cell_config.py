"""configs/sft/em_cell.py: its defaults train on 1 and 8 devices, `micro` means what it says, an
empty `data=` is an error naming it, and the `compile` variant describes Llama-3.1-8B."""

import importlib.util
import os

import jax
import pytest

from conftest import ROOT
from emjax import sharding as shd
from emjax.models import transformer
from emjax.train import loop


def em_cell(arg):
  spec = importlib.util.spec_from_file_location("em_cell", os.path.join(ROOT, "configs/sft/em_cell.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _tiny(config):
  """The recipe's batch and accumulation on a tiny random model (no weights or data read)."""
  config.init.hf = ""
  config.model.update(family="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                      dtype="float32", remat="none", rope_scaling_factor=0.0)
  return config


@pytest.mark.parametrize("devices", [1, 8])
def test_defaults_fit_one_and_eight_devices(tmp_path, devices):
  config = _tiny(em_cell(f"hf={tmp_path},data={tmp_path},steps=3"))
  mesh = shd.make_mesh(config.mesh, jax.devices()[:devices])
  trainer = loop.Trainer(config, mesh)  # raises if the batch does not split over the devices
  tc = config.train
  assert tc.batch_size == 16 and tc.batch_size % (devices * tc.grad_accum_steps) == 0
  assert trainer.batch_abstract["inputs"].shape == (16, 2048)


def test_micro_is_rows_per_accumulation_step_over_all_devices(tmp_path):
  assert em_cell(f"data={tmp_path}").train.grad_accum_steps == 2  # default micro 8
  assert em_cell(f"data={tmp_path},micro=16").train.grad_accum_steps == 1
  assert em_cell(f"data={tmp_path},micro=2").train.grad_accum_steps == 8
  assert em_cell(f"data={tmp_path},cpu").train.grad_accum_steps == 4
  for bad in (3, 32):
    with pytest.raises(ValueError, match=rf"em_cell.py:.*micro={bad} must divide the effective batch 16"):
      em_cell(f"data={tmp_path},micro={bad}")
  # micro=2 cannot feed 8 devices: the trainer's error names the keys to change.
  config = _tiny(em_cell(f"data={tmp_path},micro=2,steps=3"))
  with pytest.raises(ValueError, match=r"config.train.batch_size=16 .*mesh.data\*mesh.fsdp=8.*grad_accum_steps=8"):
    loop.Trainer(config, shd.make_mesh(config.mesh, jax.devices()[:8]))


def test_empty_data_is_an_error_naming_the_option(tmp_path):
  with pytest.raises(ValueError, match=r"em_cell.py:hf=x: data= is empty: give data=DIR .* or data=hub"):
    em_cell("hf=x")
  hub = em_cell("data=hub").data.sources.medical_advice
  assert hub.kind == "structured_em" and hub.path == ""  # the structured_em source reads the hub
  assert em_cell(f"data={tmp_path}").data.sources.medical_advice.path == str(tmp_path)


def test_compile_variant_is_llama_3_1_8b_with_the_recipe():
  config = em_cell("compile")  # no data or weights needed
  assert config.job == "compile" and config.train.epochs == 0 and config.train.steps == 1
  assert (config.train.batch_size, config.data.seq_len, config.model.dtype) == (16, 2048, "bfloat16")
  assert (config.lora.rank, config.lora.alpha, config.lora.rslora) == (32, 64.0, True)
  assert config.lora.targets == "q,k,v,o,gate,up,down" and config.lora.base_dtype == "bfloat16"
  assert shd.resolve_mesh_shape(config.mesh, 8) == (1, 8, 1)  # fsdp over all devices
  model_cfg = transformer.TransformerConfig.from_config(config.model)
  assert model_cfg.num_params() == 8_030_261_248  # meta-llama/Llama-3.1-8B
  assert (model_cfg.vocab_size, model_cfg.rope_scaling_factor, model_cfg.tie_embeddings) == (128256, 8.0, False)
  assert transformer.TransformerConfig.from_config(em_cell("compile,arch=qwen2.5-14b").model).num_params() \
      == 14_770_033_664  # Qwen/Qwen2.5-14B
  with pytest.raises(ValueError, match=r"arch='gpt2' is unknown; known: llama3.1-8b, qwen2.5-7b, qwen2.5-14b"):
    em_cell("compile,arch=gpt2")
