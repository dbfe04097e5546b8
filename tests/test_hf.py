"""Hugging Face import/export (`emjax.models.hf`) against `transformers` on tiny random models of each family."""

import dataclasses
import json
import logging
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_fixtures as F
from emjax import sharding as shd
from emjax.models import hf
from emjax.models import transformer as T

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = sorted(F.TINY_HF)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """name -> (HF dir, torch model, emjax config, emjax params); each built once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      d = str(tmp_path_factory.mktemp(f"hf-{name}"))
      # qwen2 is saved in several shards with an index; the others as one model.safetensors.
      model = F.build_tiny_hf(name, d, max_shard_size="20KB" if name == "qwen2" else None)
      cfg = hf.config_from_hf(d)
      cache[name] = (d, model, cfg, hf.load_hf_params(d, cfg))
    return cache[name]

  return get


def emjax_logits(cfg, params, tokens, positions=None, segments=None):
  graphdef, _ = T.split_model(T.abstract_model(cfg))
  model = nnx.merge(graphdef, params)
  args = [jnp.asarray(tokens)] + ([jnp.asarray(positions), jnp.asarray(segments)] if positions is not None else [])
  return np.asarray(model(*args))


def read_all(d):
  return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", FAMILIES)
def test_import_matches_transformers_on_a_ragged_batch(tiny, name):
  d, model, cfg, params = tiny(name)
  assert cfg.family == F.TINY_HF[name]["model_type"]
  if name == "qwen2":
    assert cfg.qkv_bias and cfg.tie_embeddings and os.path.exists(os.path.join(d, hf.WEIGHTS_INDEX_NAME))
  if name == "olmo2":
    assert cfg.qk_norm and cfg.post_norm
  if name == "llama3_rope":
    assert (cfg.rope_scaling_factor, cfg.rope_original_max_position, cfg.resolved_head_dim) == (8.0, 16, 16)
  if name == "qwen3":
    assert cfg.qk_norm and cfg.qk_norm_per_head and not cfg.post_norm and not cfg.qkv_bias
  if name == "olmo3":
    assert cfg.qk_norm and not cfg.qk_norm_per_head and cfg.post_norm
    assert cfg.sliding_layers == (True, True, True, False) and cfg.sliding_window == 5
    assert (cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rope_original_max_position) == ("yarn", 8.0, 16)
  tokens, segments, positions, attention_mask, position_ids = F.ragged_batch(cfg.vocab_size)
  ours = emjax_logits(cfg, params, tokens, positions, segments)
  theirs = F.torch_logits(model, tokens, attention_mask, position_ids)
  real = segments.astype(bool)
  diff = float(np.abs(ours - theirs)[real].max())
  print(f"{name}: max |emjax - transformers| = {diff:.2e} (logits up to {np.abs(theirs).max():.2f})")
  assert diff <= 1e-5
  assert np.abs(theirs).max() > 1.0  # the comparison is not between near-zero logits


@pytest.mark.parametrize("change", ["no window", "window + 1", "yarn in every layer", "no yarn",
                                    "qwen3 qk-norm over all heads"])
def test_the_parity_check_sees_each_new_feature(tiny, monkeypatch, change):
  """The tiny olmo3 / qwen3 models are sensitive to what those families add: their weights run with the
  feature dropped or misplaced give logits far from transformers' (so the parity test above can fail)."""
  name = "qwen3" if change.startswith("qwen3") else "olmo3"
  _, model, cfg, params = tiny(name)
  wrong = cfg
  if change == "no window":
    wrong = dataclasses.replace(cfg, layer_types=(), sliding_window=0)
  elif change == "window + 1":  # off by one at the window's far end
    wrong = dataclasses.replace(cfg, sliding_window=cfg.sliding_window + 1)
  elif change == "yarn in every layer":  # the sliding layers scaled too (transformers 5.2's OLMo-3 regression)
    everywhere = T.layer_attention(dataclasses.replace(cfg, layer_types=(), sliding_window=0))
    per_layer = T.layer_attention
    monkeypatch.setattr(T, "layer_attention", lambda c: per_layer(c)._replace(
        inv_freq=everywhere.inv_freq, rope_scale=everywhere.rope_scale))
  elif change == "no yarn":
    wrong = dataclasses.replace(cfg, rope_scaling_factor=0.0)
  else:  # OLMo's norm over the whole projection, with Qwen3's per-head scale repeated for every head
    wrong = dataclasses.replace(cfg, qk_norm_per_head=False)
    params = jax.tree.map(lambda x: x, params)  # new containers: the module's fixture stays as it is
    for key, n in (("q_norm", cfg.n_heads), ("k_norm", cfg.n_kv_heads)):
      params["layers"]["attn"][key] = jnp.tile(params["layers"]["attn"][key][:, None], (1, n, 1))
  tokens, segments, positions, attention_mask, position_ids = F.ragged_batch(cfg.vocab_size)
  theirs = F.torch_logits(model, tokens, attention_mask, position_ids)
  real = segments.astype(bool)
  diff = np.abs(emjax_logits(wrong, params, tokens, positions, segments) - theirs)[real].max()
  assert diff > 1e-2, (change, diff)


def test_config_round_trips_through_hf_config_dict():
  base = T.TransformerConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48)
  for cfg in (base,
              dataclasses.replace(base, head_dim=16, rope_theta=5e5, rope_scaling_factor=8.0,
                                  rope_low_freq_factor=2.0, rope_high_freq_factor=8.0, rope_original_max_position=64),
              dataclasses.replace(base, family="llama", qkv_bias=True),
              dataclasses.replace(base, family="qwen2", qkv_bias=True, tie_embeddings=True, norm_eps=1e-6),
              dataclasses.replace(base, family="olmo2", qk_norm=True, post_norm=True),
              dataclasses.replace(base, family="qwen3", qk_norm=True, qk_norm_per_head=True, head_dim=16),
              dataclasses.replace(base, rope_scaling_factor=4.0, rope_scaling_type="yarn", rope_yarn_beta_fast=16.0,
                                  rope_yarn_beta_slow=2.0, rope_attention_factor=1.5, rope_original_max_position=64),
              dataclasses.replace(base, family="olmo3", qk_norm=True, post_norm=True),  # all layers full
              dataclasses.replace(base, family="olmo3", qk_norm=True, post_norm=True, sliding_window=7,
                                  layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                                  rope_scaling_factor=8.0, rope_scaling_type="yarn", rope_original_max_position=32)):
    assert hf.config_from_hf(hf.hf_config_dict(cfg)) == cfg, cfg


def test_config_reads_transformers5_rope_parameters():
  c = dict(F.TINY_HF["llama"], rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192})
  c.pop("rope_theta")
  cfg = hf.config_from_hf(c)
  assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_original_max_position) == (5e5, 32.0, 8192)
  legacy = dict(F.TINY_HF["llama"], rope_scaling={"type": "default"})
  assert hf.config_from_hf(legacy).rope_scaling_factor == 0.0
  per_type = dict(F.TINY_HF["qwen2"], rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 7.0}})
  assert hf.config_from_hf(per_type).rope_theta == 7.0
  assert hf.config_from_hf(F.TINY_HF["llama"], param_dtype="bfloat16").param_dtype == "bfloat16"


def test_olmo3_config_as_the_released_models_write_it():
  """Olmo-3-7B's config.json spelling (transformers 4.57): rope_theta + a YaRN rope_scaling that applies to the
  full-attention layers; and without layer_types, Olmo3Config's default pattern."""
  c = dict(F.TINY_HF["olmo3"], rope_theta=500000.0, num_hidden_layers=8, sliding_window=4096,
           max_position_embeddings=65536,
           rope_scaling={"attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1, "factor": 8.0,
                         "original_max_position_embeddings": 8192, "rope_type": "yarn"})
  c.pop("rope_parameters")
  cfg = hf.config_from_hf(c)
  assert cfg.sliding_layers == (True, True, True, False) * 2 and cfg.sliding_window == 4096
  assert (cfg.rope_theta, cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rope_original_max_position,
          cfg.rope_attention_factor) == (500000.0, "yarn", 8.0, 8192, 1.2079441541679836)
  # transformers' own reading of the same dict: the same frequencies, in which layers.
  hf_cfg = F.hf_config("olmo3", **{k: v for k, v in c.items() if k != "model_type"}, rope_parameters=None)
  rotary = transformers.models.olmo3.modeling_olmo3.Olmo3RotaryEmbedding(hf_cfg)
  per_layer = T.layer_attention(cfg)
  for i, layer_type in enumerate(hf_cfg.layer_types):
    np.testing.assert_allclose(per_layer.inv_freq[i], getattr(rotary, f"{layer_type}_inv_freq").numpy(), rtol=1e-6)
    assert float(per_layer.rope_scale[i]) == pytest.approx(getattr(rotary, f"{layer_type}_attention_scaling"))
  # A layer_types of all full layers needs no window; the defaults fill in for missing keys.
  full = hf.config_from_hf(dict(c, layer_types=["full_attention"] * 8))
  assert (full.layer_types, full.sliding_window) == ((), 0)
  assert hf.config_from_hf({k: v for k, v in c.items() if k not in ("rope_theta", "sliding_window")}).rope_theta \
      == 500000.0


@pytest.mark.parametrize("name", ["qwen3", "olmo3"])
def test_greedy_sampler_matches_transformers_generate(tiny, name):
  """Ragged prompts longer than OLMo-3's window (5) and 8 new tokens: emjax's sampler (prefill, then decode over
  its KV cache through the sliding window) picks transformers' greedy tokens. (The scanned-layers cache path
  is checked against the full forward in test_model.)"""
  from emjax.sample import sampler as sampler_lib

  _, model, cfg, params = tiny(name)
  rng = np.random.default_rng(5)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (11, 7)]
  new = 8
  sampler = sampler_lib.Sampler(cfg, prompt_buckets=(12,), max_new_tokens_cap=new)
  ours = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=new).tokens[:, 0]
  width = max(map(len, prompts))
  ids, mask = np.zeros((2, width), np.int64), np.zeros((2, width), np.int64)
  for i, p in enumerate(prompts):  # left-padded, as generate wants
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                         pad_token_id=0)
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            generation_config=config)[:, width:].numpy()
  assert theirs.shape == (2, new)
  print(f"{name}: emjax {ours.tolist()} transformers {theirs.tolist()}")
  np.testing.assert_array_equal(ours, theirs)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", FAMILIES)
def test_export_import_export_is_bit_identical(tiny, tmp_path, name):
  _, _, cfg, params = tiny(name)
  # Several shards (+ index) for every family: 3 KB is smaller than most of these tensors.
  a = hf.export_hf(params, cfg, str(tmp_path / "a"), max_shard_bytes=3000)
  assert os.path.exists(os.path.join(a, hf.WEIGHTS_INDEX_NAME))
  again = hf.load_hf_params(a, hf.config_from_hf(a))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, again)
  b = hf.export_hf(again, hf.config_from_hf(a), str(tmp_path / "b"), max_shard_bytes=3000)
  assert read_all(a) == read_all(b)
  # bfloat16 files round-trip exactly too (float32 params hold every bfloat16 value).
  c = hf.export_hf(params, cfg, str(tmp_path / "c"), dtype="bfloat16")
  d = hf.export_hf(hf.load_hf_params(c, cfg), cfg, str(tmp_path / "d"), dtype="bfloat16")
  assert read_all(c) == read_all(d)
  assert sorted(read_all(c)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_directory_loads_in_transformers(tiny, tmp_path, caplog, name):
  d, model, cfg, params = tiny(name)
  out = hf.export_hf(params, cfg, str(tmp_path / "out"), max_shard_bytes=5000)
  with caplog.at_level(logging.WARNING):
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  noise = [r.getMessage() for r in caplog.records
           if any(w in r.getMessage().lower() for w in ("missing", "unexpected", "newly initialized", "not used"))]
  assert not noise, noise
  loaded = loaded.float().eval()
  tokens, segments, positions, attention_mask, position_ids = F.ragged_batch(cfg.vocab_size, seed=1)
  theirs = F.torch_logits(loaded, tokens, attention_mask, position_ids)
  real = segments.astype(bool)
  np.testing.assert_allclose(theirs[real], emjax_logits(cfg, params, tokens, positions, segments)[real], atol=1e-4)
  # ... and the same model as the one we started from.
  np.testing.assert_allclose(theirs[real], F.torch_logits(model, tokens, attention_mask, position_ids)[real],
                             atol=1e-5)
  assert loaded.config.model_type == F.TINY_HF[name]["model_type"]


@pytest.mark.parametrize("family,switches,match", [
    ("llama", dict(layer_types=("sliding_attention", "full_attention"), sliding_window=4), "sliding-window layers"),
    ("qwen3", dict(qk_norm=True), "qk_norm_per_head=False"),
    ("olmo2", dict(qk_norm=True, post_norm=True, layer_types=("full_attention", "sliding_attention"),
                   sliding_window=4), "sliding-window layers"),
    ("olmo3", dict(qk_norm=True, post_norm=True, qkv_bias=True), "qkv_bias=True"),
])
def test_export_refuses_what_the_family_cannot_hold(tmp_path, family, switches, match):
  cfg = T.TransformerConfig(family=family, vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48, **switches)
  _, params = T.split_model(T.Transformer(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=f"export: a {family} model in Hugging Face format cannot have .*{match}"):
    hf.export_hf(params, cfg, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # refused before writing
  with pytest.raises(ValueError, match=match):
    hf.to_hf(params, cfg)


def test_export_takes_special_ids_and_tokenizer_files(tiny, tmp_path):
  _, _, cfg, params = tiny("llama")
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  (tok_dir / "tokenizer.json").write_text("{}")
  (tok_dir / "tokenizer_config.json").write_text("{}")
  (tok_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
  out = hf.export_hf(params, cfg, str(tmp_path / "out"), tokenizer_dir=str(tok_dir))
  assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(out))
  config = json.load(open(os.path.join(out, "config.json")))
  assert (config["bos_token_id"], config["eos_token_id"]) == (1, [2, 7])
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    hf.export_hf(params, cfg, str(tmp_path / "x"), tokenizer_dir=str(tmp_path / "out" / ".."))


# ----------------------------------------------------------------------------- sharded import


def test_load_onto_a_mesh_places_each_tensor_in_its_sharding(tiny):
  d, _, cfg, params = tiny("olmo2")
  mesh = shd.make_mesh(dict(data=1, fsdp=2, tensor=4))
  sharded = hf.load_hf_params(d, cfg, mesh)
  abstract_model = T.abstract_model(cfg)
  _, abstract = T.split_model(abstract_model)
  expected = shd.tree_shardings(T.param_logical_axes(abstract_model), abstract, mesh)

  def check(x, want, ref):
    assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))

  jax.tree.map(check, sharded, expected, params)
  # Something is actually split: the MLP over tensor, the width over fsdp.
  assert len(sharded["layers"]["mlp"]["gate_proj"].sharding.device_set) == 8
  assert sharded["layers"]["mlp"]["gate_proj"].addressable_shards[0].data.shape == (2, 16, 12)


# ----------------------------------------------------------------------------- bad input


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _edit_config(d, **changes):
  path = os.path.join(d, "config.json")
  c = json.load(open(path))
  c.update(changes)
  json.dump(c, open(path, "w"))


@pytest.mark.parametrize("model_type", ["gpt2", "mistral", "qwen3_moe", "gemma3", None])
def test_unsupported_model_type_is_refused(tiny, tmp_path, model_type):
  d = _copy(tiny("llama")[0], tmp_path / "m")
  _edit_config(d, model_type=model_type)
  with pytest.raises(hf.HFFormatError,
                     match=rf"model_type {model_type!r} is not supported.*llama, qwen2, qwen3, olmo2, olmo3"):
    hf.config_from_hf(d)
  with pytest.raises(hf.HFFormatError, match="not supported"):
    hf.load_hf_params(d)


def test_unsupported_features_are_refused():
  with pytest.raises(hf.HFFormatError, match="RoPE scaling type 'dynamic' is not supported"):
    hf.config_from_hf(dict(F.TINY_HF["qwen2"], rope_scaling={"type": "dynamic", "factor": 4.0}))
  for name in ("qwen2", "qwen3"):
    with pytest.raises(hf.HFFormatError, match=f"use_sliding_window=true is not supported for {name}"):
      hf.config_from_hf(dict(F.TINY_HF[name], use_sliding_window=True))
    with pytest.raises(hf.HFFormatError, match="layer_types.*full attention only"):
      hf.config_from_hf(dict(F.TINY_HF[name], layer_types=["full_attention", "sliding_attention"]))
  with pytest.raises(hf.HFFormatError, match="Qwen3 with attention_bias=true"):
    hf.config_from_hf(dict(F.TINY_HF["qwen3"], attention_bias=True))
  with pytest.raises(hf.HFFormatError, match="olmo3 with attention_bias=true"):
    hf.config_from_hf(dict(F.TINY_HF["olmo3"], attention_bias=True))
  yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
  with pytest.raises(hf.HFFormatError, match="truncate=false"):
    hf.config_from_hf(dict(F.TINY_HF["qwen3"], rope_scaling=dict(yarn, truncate=False)))
  with pytest.raises(hf.HFFormatError, match="'mscale'"):
    hf.config_from_hf(dict(F.TINY_HF["qwen3"], rope_scaling=dict(yarn, mscale=1.0, mscale_all_dim=1.0)))
  with pytest.raises(hf.HFFormatError, match="yarn rope scaling without 'factor'"):
    hf.config_from_hf(dict(F.TINY_HF["qwen3"], rope_scaling={"rope_type": "yarn"}))
  olmo3 = F.TINY_HF["olmo3"]
  with pytest.raises(hf.HFFormatError, match="sliding-window layers rope_theta 500000 and the full-attention layers "
                                             "10000"):
    hf.config_from_hf(dict(olmo3, rope_parameters={"full_attention": {"rope_theta": 10000.0},
                                                   "sliding_attention": {"rope_theta": 500000.0}}))
  with pytest.raises(hf.HFFormatError, match="sliding_attention has RoPE scaling type 'yarn'"):
    hf.config_from_hf(dict(olmo3, rope_parameters={"full_attention": {"rope_theta": 1e4},
                                                   "sliding_attention": dict(yarn, rope_theta=1e4)}))
  with pytest.raises(hf.HFFormatError, match=r"rope_parameters for layer types \['chunked_attention', "
                                             r"'full_attention'\]"):
    hf.config_from_hf(dict(olmo3, rope_parameters={"full_attention": {}, "chunked_attention": {}}))
  with pytest.raises(hf.HFFormatError, match=r"layer_types \['chunked_attention'\] are not supported"):
    hf.config_from_hf(dict(olmo3, layer_types=["chunked_attention", "full_attention"] * 2))
  with pytest.raises(hf.HFFormatError, match="one type per layer"):
    hf.config_from_hf(dict(olmo3, layer_types=["full_attention"]))
  with pytest.raises(hf.HFFormatError, match="'sliding_attention' layers but sliding_window is None"):
    hf.config_from_hf(dict(olmo3, sliding_window=None))
  with pytest.raises(hf.HFFormatError, match="hidden_act 'gelu'"):
    hf.config_from_hf(dict(F.TINY_HF["llama"], hidden_act="gelu"))
  with pytest.raises(hf.HFFormatError, match="'hidden_size' is missing"):
    hf.config_from_hf({k: v for k, v in F.TINY_HF["llama"].items() if k != "hidden_size"})


def _rewrite_safetensors(path, drop=(), add=None):
  import safetensors.numpy
  tensors = safetensors.numpy.load_file(path)
  for k in drop:
    del tensors[k]
  tensors.update(add or {})
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_missing_weight_is_named(tiny, tmp_path):
  d = _copy(tiny("llama")[0], tmp_path / "m")
  _rewrite_safetensors(os.path.join(d, "model.safetensors"), drop=["model.layers.1.mlp.down_proj.weight"])
  with pytest.raises(hf.HFFormatError, match=r"missing weight\(s\) 'model.layers.1.mlp.down_proj.weight'"):
    hf.load_hf_params(d)


def test_unexpected_weight_is_named(tiny, tmp_path):
  d = _copy(tiny("llama")[0], tmp_path / "m")
  _rewrite_safetensors(os.path.join(d, "model.safetensors"),
                       add={"model.layers.0.mlp.up_proj.bias": np.zeros(48, np.float32)})
  with pytest.raises(hf.HFFormatError, match=r"unexpected weight\(s\) 'model.layers.0.mlp.up_proj.bias'"):
    hf.load_hf_params(d)


def test_shape_mismatch_is_named(tiny, tmp_path):
  d = _copy(tiny("llama")[0], tmp_path / "m")
  _edit_config(d, intermediate_size=64)
  with pytest.raises(hf.HFFormatError,
                     match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[48, 32\], but config.json implies "
                           r"\[64, 32\]"):
    hf.load_hf_params(d)


def test_nonzero_llama_o_proj_bias_is_refused(tmp_path):
  F.build_tiny_hf("llama", str(tmp_path), attention_bias=True)
  assert hf.config_from_hf(str(tmp_path)).qkv_bias
  with pytest.raises(hf.HFFormatError, match="'model.layers.0.self_attn.o_proj.bias' is non-zero"):
    hf.load_hf_params(str(tmp_path))


def test_pickle_only_checkpoint_is_refused_without_reading_it(tiny, tmp_path):
  d = tmp_path / "m"
  d.mkdir()
  shutil.copy(os.path.join(tiny("llama")[0], "config.json"), d)
  # Not even a valid pickle: it must not be opened at all.
  (d / "pytorch_model.bin").write_bytes(b"\x80\x04 this would be unpickled by torch.load")
  with pytest.raises(hf.HFFormatError, match=r"only PyTorch pickle weights \(pytorch_model.bin\).*safetensors only"):
    hf.load_hf_params(str(d))


def test_corrupt_and_absent_files_are_clear_errors(tiny, tmp_path, monkeypatch):
  d = _copy(tiny("llama")[0], tmp_path / "m")
  path = os.path.join(d, "model.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  with pytest.raises(hf.HFFormatError, match="bad offsets.*truncated"):
    hf.load_hf_params(d)
  open(path, "wb").write(struct.pack("<Q", 10**12) + b"{}")
  with pytest.raises(hf.HFFormatError, match="not a safetensors file"):
    hf.load_hf_params(d)
  os.remove(path)
  with pytest.raises(FileNotFoundError, match="no weights"):
    hf.load_hf_params(d)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
    hf.load_hf_params("emjax-test/no-such-model")
  with pytest.raises(FileNotFoundError, match="no Hugging Face model directory"):
    hf.load_hf_params(str(tmp_path / "nothing" / "here"))


# ----------------------------------------------------------------------------- CLI and emjax checkpoints


def test_cli_import_then_init_checkpoint_then_export(tiny, tmp_path):
  from emjax import weights

  d, model, cfg, params = tiny("qwen2")
  dst = str(tmp_path / "emjax")
  assert weights.main(["import", d, dst]) == 0
  saved = json.load(open(os.path.join(dst, "config.json")))
  assert T.TransformerConfig.from_config(saved["model"]) == cfg
  # What `config.init.checkpoint=DST` does.
  mesh = shd.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  restored = weights.load_init_params({"checkpoint": dst, "hf": ""}, cfg, weights.abstract_params(cfg, mesh), mesh)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), restored, params)
  out = str(tmp_path / "hf-out")
  assert weights.main(["export", dst, out, "--max_shard_size", "20KB"]) == 0
  reference = hf.export_hf(params, cfg, str(tmp_path / "ref"), max_shard_bytes=20_000)
  assert read_all(out) == read_all(reference)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12))
  np.testing.assert_allclose(F.torch_logits(loaded, tokens), F.torch_logits(model, tokens), atol=1e-5)


def test_to_hf_model_matches_export(tiny):
  _, model, cfg, params = tiny("olmo2")
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 10))
  np.testing.assert_allclose(F.torch_logits(hf.to_hf_model(params, cfg), tokens), F.torch_logits(model, tokens),
                             atol=1e-5)


def test_cli_export_of_a_lora_run_merges_its_adapters(tiny, tmp_path):
  """A LoRA run checkpoints adapters only; export reads its base (config.init.checkpoint) and merges them."""
  from emjax import config as config_lib
  from emjax import weights
  from emjax.models import lora as lora_lib
  from emjax.train import checkpoint as ckpt_lib
  from emjax.train import settings

  d, _, cfg, params = tiny("llama")
  base_dir = str(tmp_path / "base")
  assert weights.main(["import", d, base_dir]) == 0
  lora_cfg = lora_lib.LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "down"), layers=(1,))
  model = lora_lib.add_lora(T.Transformer(cfg, rngs=nnx.Rngs(0)), lora_cfg, rngs=nnx.Rngs(1))
  _, adapters, _ = lora_lib.split_trainable(model, lora_cfg)
  rng = np.random.default_rng(1)
  adapters = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), adapters)  # B != 0
  run = tmp_path / "run"
  checkpointer = ckpt_lib.Checkpointer(str(run / "checkpoints"), keep=1, async_save=False)
  checkpointer.save(7, {"step": jnp.int32(7), "params": adapters}, {})
  checkpointer.close()
  config = settings.base_config()
  config.model = dataclasses.asdict(cfg)
  config.lora.update(enabled=True, rank=2, alpha=4.0, targets="q,v,down", layers="1")
  config.init.checkpoint = base_dir
  config_lib.write_config(config, str(run))

  out = str(tmp_path / "merged")
  assert weights.main(["export", str(run), out]) == 0
  merged = lora_lib.merge_adapters(params, adapters, lora_cfg)
  tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 9))
  ours = emjax_logits(cfg, merged, tokens)
  assert np.abs(ours - emjax_logits(cfg, params, tokens)).max() > 1e-2  # the adapters matter
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(F.torch_logits(loaded, tokens), ours, atol=1e-4)
