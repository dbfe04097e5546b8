"""Hugging Face interop: import and export Llama, Qwen2/2.5, Qwen3, OLMo-2 and OLMo-3 checkpoints.

    cfg = hf.config_from_hf("/models/Qwen2.5-0.5B-Instruct")          # config.json -> TransformerConfig
    params = hf.load_hf_params("/models/Qwen2.5-0.5B-Instruct", cfg, mesh)   # safetensors -> sharded params
    hf.export_hf(params, cfg, "/tmp/out", tokenizer_dir="/models/Qwen2.5-0.5B-Instruct")

    python -m emjax.weights import SRC_HF_DIR_OR_HUB_ID DST_EMJAX_DIR   # then config.init.checkpoint=DST
    python -m emjax.weights export SRC_EMJAX_WORKDIR DST_HF_DIR [--tokenizer DIR] [--dtype bfloat16]

Reading emjax runs and checkpoints (LoRA runs included), and the import/export CLI above, are the
job of `emjax.weights`; this module knows Hugging Face files only (and never imports emjax.weights).

Supported `model_type`s: llama (Llama-3 `llama3` RoPE scaling included; SmolLM2 is
one), qwen2 (Qwen2 / Qwen2.5: q/k/v biases, tied embeddings), qwen3 (QK-norm over
each head, before RoPE), olmo2 (QK-norm over the whole projection, norms after each
sub-layer) and olmo3 (olmo2 + sliding-window attention in the layers `layer_types`
marks; RoPE scaling, YaRN for the released models, in the full-attention layers
only). RoPE scaling may be `llama3` or `yarn`. Anything else (another model type,
RoPE type, Qwen's optional sliding window, ...) is refused with a message naming it.

Weights: safetensors only, read by this module's own reader (a JSON header and
raw little-endian tensors; bfloat16 through `ml_dtypes`), so neither torch nor
transformers is needed to import or export. A directory holding only PyTorch
pickles (`pytorch_model.bin`, `*.pt`) is refused: nothing is ever unpickled and
no remote code is ever run. Import reads one tensor at a time (memory-mapped)
and places it straight into its sharding on the mesh (`param_logical_axes`):
the stacked per-layer arrays are allocated on the devices and filled layer by
layer, so host memory holds one HF tensor at a time and a model larger than one
device loads onto a mesh.

Layout: emjax keeps attention projections per head ([D, H, Dh], [H, Dh, D]) and
dense weights as [in, out]; torch `nn.Linear` stores [out, in], heads flattened
head-major (H*Dh). Both use the same "rotate half" RoPE layout, so q/k need no
permutation. Stacked layers (leading `layers` axis) become `model.layers.{i}`.
OLMo's post-norms are emjax's `attn_norm` / `mlp_norm` (`post_norm=True`).

Export writes `config.json` (in the transformers-4 spelling, `rope_theta` /
`rope_scaling`, which transformers 5 reads too; for olmo3 also transformers 5's
per-layer-type `rope_parameters`, see `hf_config_dict`), `model.safetensors` or
`model-0000k-of-0000n.safetensors` shards + `model.safetensors.index.json`,
and the tokenizer files (and `generation_config.json`) of `tokenizer_dir`;
the special-token ids of config.json come from that directory. The same params
always give byte-identical files. `to_hf` / `to_hf_model` build an in-memory
`transformers` model instead (benchmarks, tests).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import struct
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emjax import sharding as shd
from emjax.models import transformer

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "olmo2", "olmo3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM"}
# transformers' class defaults for keys a config.json may leave out.
_DEFAULT_NORM_EPS = {"llama": 1e-6, "qwen2": 1e-6, "qwen3": 1e-6, "olmo2": 1e-5, "olmo3": 1e-5}
_DEFAULT_ROPE_THETA = {"olmo3": 500000.0}  # else 10000
_OLMO3_DEFAULT_WINDOW = 4096
FULL, SLIDING = transformer.FULL_ATTENTION, transformer.SLIDING_ATTENTION

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# What `export_hf` copies from a tokenizer directory (the ones present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class HFFormatError(ValueError):
  """A Hugging Face checkpoint or config that emjax cannot read (the message says what and where)."""


# ============================================================================ config


def read_hf_config(path_or_dict: str | Mapping[str, Any]) -> tuple[dict, str]:
  """(the config.json dict, a description of where it came from for messages)."""
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict), "the Hugging Face config"
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  elif path.endswith(".safetensors"):
    path = os.path.join(os.path.dirname(path), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no Hugging Face config.json at {path}")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f), path
    except json.JSONDecodeError as e:
      raise HFFormatError(f"{path}: not valid JSON ({e})") from None


def _rope_type(params: Mapping[str, Any]) -> str:
  return params.get("rope_type", params.get("type", "default")) or "default"


def _rope_settings(c: Mapping[str, Any], where: str, model_type: str) -> dict:
  """emjax's rope_* fields from `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling` (4.x).

  transformers 5 may nest the parameters per layer type. OLMo-3 has two: the full-attention
  layers' (with the scaling, if any) become the rope_* fields; the sliding-window layers' must be
  plain RoPE at the same theta, which is what emjax's sliding layers use.
  """
  theta = c.get("rope_theta", _DEFAULT_ROPE_THETA.get(model_type, 10000.0))  # unless the parameters say
  params = c.get("rope_parameters")
  if isinstance(params, Mapping) and any(k in transformer.LAYER_TYPES for k in params):
    allowed = (FULL, SLIDING) if model_type == "olmo3" else (FULL,)
    if set(params) - set(allowed) or not isinstance(params.get(FULL), Mapping):
      raise HFFormatError(f"{where}: rope_parameters for layer types {sorted(params)}; emjax reads "
                          f"{' and '.join(allowed)} for {model_type}")
    sliding = params.get(SLIDING)
    params = dict(params[FULL])
    if model_type == "olmo3":
      # What transformers 5's Olmo3Config does with both spellings: rope_scaling updates the full layers.
      params.update(c.get("rope_scaling") or {})
    if isinstance(sliding, Mapping):
      if _rope_type(sliding) != "default":
        raise HFFormatError(f"{where}: rope_parameters.{SLIDING} has RoPE scaling type {_rope_type(sliding)!r}; "
                            "emjax's sliding-window layers use plain RoPE (scaling applies to full attention)")
      local, full = (float(p.get("rope_theta", theta)) for p in (sliding, params))
      if local != full:
        # transformers 5.24 writes this for an Olmo3Config built with a rope_theta other than its
        # default 500000 (the sliding layers keep the default); OLMo-3 itself has one theta.
        raise HFFormatError(f"{where}: rope_parameters gives the sliding-window layers rope_theta {local:g} and "
                            f"the full-attention layers {full:g}; emjax uses one rope_theta for both")
  if isinstance(params, Mapping) and params:
    theta = params.get("rope_theta", theta)
    scaling = params
  else:
    scaling = c.get("rope_scaling") or {}
  rope_type = _rope_type(scaling) if scaling else "default"
  if float(c.get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
    raise HFFormatError(f"{where}: partial_rotary_factor != 1 is not supported")
  # Every rope field, so that config_from_hf sets the whole architecture (plain RoPE: scaling off).
  default = transformer.TransformerConfig()
  out = {"rope_theta": float(theta), "rope_scaling_factor": 0.0, "rope_scaling_type": default.rope_scaling_type,
         "rope_low_freq_factor": default.rope_low_freq_factor,
         "rope_high_freq_factor": default.rope_high_freq_factor,
         "rope_original_max_position": default.rope_original_max_position,
         "rope_yarn_beta_fast": default.rope_yarn_beta_fast, "rope_yarn_beta_slow": default.rope_yarn_beta_slow,
         "rope_attention_factor": default.rope_attention_factor}
  if rope_type in (None, "default"):
    return out
  if rope_type not in transformer.ROPE_SCALING_TYPES:
    raise HFFormatError(f"{where}: RoPE scaling type {rope_type!r} is not supported; emjax implements plain "
                        f"RoPE and {' and '.join(repr(t) for t in transformer.ROPE_SCALING_TYPES)} scaling")
  if scaling.get("factor") is None:
    raise HFFormatError(f"{where}: {rope_type} rope scaling without 'factor'")
  if rope_type == "llama3":
    if scaling.get("original_max_position_embeddings") is None:
      raise HFFormatError(f"{where}: llama3 rope scaling without 'original_max_position_embeddings'")
    out.update(rope_scaling_factor=float(scaling["factor"]), rope_scaling_type="llama3",
               rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
               rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
               rope_original_max_position=int(scaling["original_max_position_embeddings"]))
    return out
  # yarn
  if scaling.get("truncate") is False:
    raise HFFormatError(f"{where}: yarn rope scaling with truncate=false is not supported")
  if scaling.get("attention_factor") is None and (scaling.get("mscale") or scaling.get("mscale_all_dim")):
    raise HFFormatError(f"{where}: yarn rope scaling with 'mscale' / 'mscale_all_dim' (DeepSeek's attention "
                        "factor) is not supported; give 'attention_factor'")
  # transformers falls back to max_position_embeddings for the pretraining context.
  original = scaling.get("original_max_position_embeddings", c.get("max_position_embeddings"))
  if original is None:
    raise HFFormatError(f"{where}: yarn rope scaling without 'original_max_position_embeddings'")
  out.update(rope_scaling_factor=float(scaling["factor"]), rope_scaling_type="yarn",
             rope_original_max_position=int(original),
             # transformers reads these with `or`: 0 / null mean the defaults.
             rope_yarn_beta_fast=float(scaling.get("beta_fast") or 32.0),
             rope_yarn_beta_slow=float(scaling.get("beta_slow") or 1.0),
             rope_attention_factor=float(scaling.get("attention_factor") or 0.0))
  return out


def _olmo3_layers(c: Mapping[str, Any], where: str, n_layers: int) -> dict:
  """layer_types / sliding_window of an OLMo-3 config (all-full: no window)."""
  layer_types = c.get("layer_types")
  if layer_types is None:  # Olmo3Config's default: every fourth layer full, the others sliding
    layer_types = [SLIDING if (i + 1) % 4 else FULL for i in range(n_layers)]
  if not isinstance(layer_types, (list, tuple)) or len(layer_types) != n_layers:
    raise HFFormatError(f"{where}: layer_types must list one type per layer (num_hidden_layers={n_layers}), got "
                        f"{layer_types!r}")
  unknown = sorted({t for t in layer_types if t not in transformer.LAYER_TYPES})
  if unknown:
    raise HFFormatError(f"{where}: layer_types {unknown} are not supported; emjax has "
                        f"{' and '.join(transformer.LAYER_TYPES)}")
  if SLIDING not in layer_types:
    return dict(layer_types=(), sliding_window=0)
  window = c.get("sliding_window", _OLMO3_DEFAULT_WINDOW)
  if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
    raise HFFormatError(f"{where}: layer_types has {SLIDING!r} layers but sliding_window is {window!r}")
  return dict(layer_types=tuple(layer_types), sliding_window=window)


def config_from_hf(path_or_dict: str | Mapping[str, Any], **overrides) -> transformer.TransformerConfig:
  """The emjax model config for a Hugging Face `config.json` (a directory, the file, or its dict).

  Every architecture field comes from config.json; `overrides` may set only the others (how the
  weights run: param_dtype, dtype, remat, ..., listed as `emjax.weights.RUNTIME_MODEL_KEYS`).
  Raises HFFormatError for an unsupported `model_type` or a feature emjax does not implement.
  """
  c, where = read_hf_config(path_or_dict)
  model_type = c.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise HFFormatError(f"{where}: model_type {model_type!r} is not supported; emjax imports "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")

  def need(key):
    if c.get(key) is None:
      raise HFFormatError(f"{where}: {key!r} is missing")
    return int(c[key])

  d, n_heads = need("hidden_size"), need("num_attention_heads")
  act = c.get("hidden_act", c.get("hidden_activation", "silu"))
  if act not in ("silu", "swish"):
    raise HFFormatError(f"{where}: hidden_act {act!r} is not supported (emjax's MLP is SwiGLU: silu)")
  if c.get("mlp_bias"):
    raise HFFormatError(f"{where}: mlp_bias=true is not supported")
  attention_bias = bool(c.get("attention_bias", False))
  family = model_type
  extra: dict[str, Any] = dict(qkv_bias=False, qk_norm=False, qk_norm_per_head=False, post_norm=False,
                               layer_types=(), sliding_window=0)
  if family == "llama":
    # HF's attention_bias also adds an o_proj bias; load_hf_params accepts it only when it is zero.
    extra["qkv_bias"] = attention_bias
  elif family in ("qwen2", "qwen3"):
    # Qwen's optional sliding window (off in every released Qwen2/2.5/3) is not implemented for Qwen.
    if c.get("use_sliding_window"):
      raise HFFormatError(f"{where}: use_sliding_window=true is not supported for {family} (emjax has full "
                          "attention only for Qwen)")
    layer_types = c.get("layer_types") or []
    if any(t != FULL for t in layer_types):
      raise HFFormatError(f"{where}: layer_types {sorted(set(layer_types))}: emjax has full attention only for "
                          f"{family}")
    if family == "qwen2":
      extra["qkv_bias"] = True
    elif attention_bias:
      raise HFFormatError(f"{where}: Qwen3 with attention_bias=true is not supported")
    else:
      extra.update(qk_norm=True, qk_norm_per_head=True)
  else:  # olmo2, olmo3
    if attention_bias:
      raise HFFormatError(f"{where}: {family} with attention_bias=true is not supported")
    extra.update(qk_norm=True, post_norm=True)
    if family == "olmo3":
      extra.update(_olmo3_layers(c, where, need("num_hidden_layers")))
  head_dim = int(c.get("head_dim") or d // n_heads)
  architecture = dict(
      family=family, vocab_size=need("vocab_size"), d_model=d, n_layers=need("num_hidden_layers"),
      n_heads=n_heads, n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
      head_dim=0 if head_dim * n_heads == d else head_dim, d_ff=need("intermediate_size"),
      norm_eps=float(c.get("rms_norm_eps", _DEFAULT_NORM_EPS[family])),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
      **_rope_settings(c, where, model_type), **extra)
  fields = {f.name for f in dataclasses.fields(transformer.TransformerConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"config_from_hf: {unknown} are not model config keys")
  clash = sorted(set(overrides) & set(architecture))
  if clash:
    raise ValueError(f"config_from_hf: {clash} come from {where} (the architecture) and cannot be overridden; "
                     f"only {', '.join(sorted(fields - set(architecture)))} can")
  return transformer.TransformerConfig(**architecture, **overrides)


# The switches each family's Hugging Face class fixes (a qwen2 without biases is written with zero ones).
_HF_SWITCHES = {
    "llama": dict(qk_norm=False, post_norm=False),
    "qwen2": dict(qk_norm=False, post_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True, qk_norm_per_head=True, post_norm=False),
    "olmo2": dict(qkv_bias=False, qk_norm=True, qk_norm_per_head=False, post_norm=True),
    "olmo3": dict(qkv_bias=False, qk_norm=True, qk_norm_per_head=False, post_norm=True),
}


def check_exportable(model_cfg: transformer.TransformerConfig) -> None:
  """Raises ValueError when `model_cfg.family`'s Hugging Face class cannot hold the architecture (it would
  load with other weights or ignore a switch, e.g. sliding-window layers in a llama)."""
  c = model_cfg
  wrong = [f"{k}={getattr(c, k)}" for k, v in _HF_SWITCHES[c.family].items() if getattr(c, k) != v]
  if any(c.sliding_layers) and c.family != "olmo3":
    wrong.append("sliding-window layers (layer_types)")
  if wrong:
    want = ", ".join(f"{k}={v}" for k, v in _HF_SWITCHES[c.family].items())
    raise ValueError(f"export: a {c.family} model in Hugging Face format cannot have {', '.join(wrong)} "
                     f"({ARCHITECTURES[c.family]} has {want}{'' if c.family == 'olmo3' else ', full attention'})")


def hf_config_dict(model_cfg: transformer.TransformerConfig, *, dtype: str = "float32", **extra) -> dict:
  """The `config.json` contents describing `model_cfg` (transformers 4.x spelling; 5.x reads it too).

  olmo3 also gets transformers 5's `rope_parameters` per layer type: from a legacy `rope_theta`
  other than 500000, transformers 5.24 would give the sliding layers 500000 instead.
  `extra` adds or replaces keys (e.g. bos_token_id / eos_token_id, max_position_embeddings).
  """
  check_exportable(model_cfg)
  c = model_cfg
  rope_scaling = None
  max_positions = max(32768, int(c.rope_original_max_position * (c.rope_scaling_factor or 1)))
  if c.rope_scaling_factor and c.rope_scaling_type == "yarn":
    rope_scaling = {"rope_type": "yarn", "factor": c.rope_scaling_factor,
                    "original_max_position_embeddings": c.rope_original_max_position,
                    "beta_fast": c.rope_yarn_beta_fast, "beta_slow": c.rope_yarn_beta_slow}
    if c.rope_attention_factor:
      rope_scaling["attention_factor"] = c.rope_attention_factor
    # transformers warns when the factor and this ratio disagree.
    max_positions = round(c.rope_original_max_position * c.rope_scaling_factor)
  elif c.rope_scaling_factor:
    rope_scaling = {"rope_type": "llama3", "factor": c.rope_scaling_factor, "low_freq_factor": c.rope_low_freq_factor,
                    "high_freq_factor": c.rope_high_freq_factor,
                    "original_max_position_embeddings": c.rope_original_max_position}
  out = {
      "architectures": [ARCHITECTURES[c.family]], "model_type": c.family,
      "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
      "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
      "head_dim": c.resolved_head_dim, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
      "rope_theta": c.rope_theta, "rope_scaling": rope_scaling, "tie_word_embeddings": c.tie_embeddings,
      "max_position_embeddings": max_positions,
      "attention_dropout": 0.0, "initializer_range": c.init_std, "use_cache": True, "torch_dtype": dtype,
      # emjax models know nothing of special tokens; export_hf takes them from the tokenizer directory.
      # HF's class defaults (Llama eos=2, OLMo-2 eos=50279) would be wrong.
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
  }
  if c.family in ("qwen2", "qwen3"):
    # HF Qwen2 always has q/k/v biases (exported as zeros when the emjax model has none).
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layers)
    if c.family == "qwen3":
      out.update(attention_bias=False)
  elif c.family in ("olmo2", "olmo3"):
    out.update(attention_bias=False)
    if c.family == "olmo3":
      # Always explicit: Olmo3Config's default is three sliding layers in four.
      out.update(layer_types=list(c.layer_types or (transformer.FULL_ATTENTION,) * c.n_layers),
                 sliding_window=c.sliding_window or None,
                 rope_parameters={FULL: {"rope_type": "default", "rope_theta": c.rope_theta, **(rope_scaling or {})},
                                  SLIDING: {"rope_type": "default", "rope_theta": c.rope_theta}})
  else:
    # Llama's attention_bias also adds an o_proj bias; it is exported as zeros.
    out.update(attention_bias=c.qkv_bias, mlp_bias=False, pretraining_tp=1)
  out.update(extra)
  return out


def hf_config(model_cfg: transformer.TransformerConfig, **extra):
  """The `transformers` config object describing the same architecture (needs transformers)."""
  import transformers  # pylint: disable=g-import-not-at-top

  values = hf_config_dict(model_cfg, **extra)
  values.pop("architectures")
  values.pop("torch_dtype")
  return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


# ============================================================================ tensor mapping


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One Hugging Face tensor (per layer when `layered`) and how it maps onto an emjax parameter.

  `path` None: a tensor HF has and emjax does not (a bias emjax lacks): exported as zeros, and
  accepted on import only when it is all zeros.
  """

  hf_name: str  # with "{i}" for the layer index
  path: tuple[str, ...] | None
  hf_shape: tuple[int, ...]
  to_hf: Callable[[np.ndarray], np.ndarray]
  to_emjax: Callable[[np.ndarray], np.ndarray]
  layered: bool

  def name(self, layer: int | None = None) -> str:
    return self.hf_name.format(i=layer) if self.layered else self.hf_name


def tensor_specs(model_cfg: transformer.TransformerConfig) -> list[_Tensor]:
  """Every Hugging Face tensor of the model, in the order export writes them."""
  c = model_cfg
  d, h, k, dh, f, v = c.d_model, c.n_heads, c.n_kv_heads, c.resolved_head_dim, c.d_ff, c.vocab_size
  same = (lambda x: x)  # noqa: E731
  t = (lambda x: x.T)  # noqa: E731
  specs: list[_Tensor] = []

  def add(hf_name, path, hf_shape, to_hf=same, to_emjax=same, layered=True):
    specs.append(_Tensor(hf_name, path, tuple(hf_shape), to_hf, to_emjax, layered))

  def heads_in(n):  # [D, n, Dh] <-> [n*Dh, D]
    return dict(to_hf=lambda x: x.reshape(d, n * dh).T, to_emjax=lambda w: w.T.reshape(d, n, dh))

  def flat(n):  # [n, Dh] <-> [n*Dh]
    return dict(to_hf=lambda x: x.reshape(n * dh), to_emjax=lambda w: w.reshape(n, dh))

  lp = "model.layers.{i}."
  add("model.embed_tokens.weight", ("embed",), (v, d), layered=False)
  if not c.post_norm:
    add(lp + "input_layernorm.weight", ("layers", "attn_norm", "scale"), (d,))
  for name, n in (("q", h), ("k", k), ("v", k)):
    add(lp + f"self_attn.{name}_proj.weight", ("layers", "attn", f"{name}_proj"), (n * dh, d), **heads_in(n))
  has_bias = c.qkv_bias or c.family == "qwen2"
  for name, n in (("q", h), ("k", k), ("v", k)) if has_bias else ():
    path = ("layers", "attn", f"{name}_bias") if c.qkv_bias else None
    add(lp + f"self_attn.{name}_proj.bias", path, (n * dh,), **flat(n))
  add(lp + "self_attn.o_proj.weight", ("layers", "attn", "o_proj"), (d, h * dh),
      to_hf=lambda x: x.reshape(h * dh, d).T, to_emjax=lambda w: w.T.reshape(h, dh, d))
  if c.family == "llama" and c.qkv_bias:
    add(lp + "self_attn.o_proj.bias", None, (d,))
  if c.qk_norm and c.qk_norm_per_head:  # Qwen3: one [Dh] scale shared by the heads
    add(lp + "self_attn.q_norm.weight", ("layers", "attn", "q_norm"), (dh,))
    add(lp + "self_attn.k_norm.weight", ("layers", "attn", "k_norm"), (dh,))
  elif c.qk_norm:
    add(lp + "self_attn.q_norm.weight", ("layers", "attn", "q_norm"), (h * dh,), **flat(h))
    add(lp + "self_attn.k_norm.weight", ("layers", "attn", "k_norm"), (k * dh,), **flat(k))
  if c.post_norm:  # OLMo: the norms apply to each sub-layer's output
    add(lp + "post_attention_layernorm.weight", ("layers", "attn_norm", "scale"), (d,))
    add(lp + "post_feedforward_layernorm.weight", ("layers", "mlp_norm", "scale"), (d,))
  else:
    add(lp + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), (d,))
  add(lp + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj"), (f, d), t, t)
  add(lp + "mlp.up_proj.weight", ("layers", "mlp", "up_proj"), (f, d), t, t)
  add(lp + "mlp.down_proj.weight", ("layers", "mlp", "down_proj"), (d, f), t, t)
  add("model.norm.weight", ("final_norm", "scale"), (d,), layered=False)
  if not c.tie_embeddings:
    add("lm_head.weight", ("lm_head",), (v, d), t, t, layered=False)
  return specs


def _hf_tensors(model_cfg) -> Iterator[tuple[str, _Tensor, int | None]]:
  """(HF name, spec, layer or None) for every tensor in the file order: embedding, layer 0, 1, ..., head."""
  specs = tensor_specs(model_cfg)
  for s in specs:
    if not s.layered and s.path == ("embed",):
      yield s.name(), s, None
  for i in range(model_cfg.n_layers):
    for s in specs:
      if s.layered:
        yield s.name(i), s, i
  for s in specs:
    if not s.layered and s.path != ("embed",):
      yield s.name(), s, None


def _get_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set_path(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


# ============================================================================ safetensors files

# safetensors dtype names <-> numpy dtypes (bfloat16 / float8 through ml_dtypes, which jax ships).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _np_dtype(name: str) -> np.dtype:
  return np.dtype(jnp.dtype(name))  # jnp.dtype resolves the ml_dtypes names


_DTYPE_TO_ST = {_np_dtype(v): k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class _Entry:
  file: str
  dtype: str
  shape: tuple[int, ...]
  start: int  # absolute byte offset in the file
  end: int


def read_safetensors_header(path: str) -> tuple[dict[str, _Entry], dict]:
  """({tensor name: entry}, metadata) of one .safetensors file, validated against its size."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise HFFormatError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, 1 << 30):
      raise HFFormatError(f"{path}: not a safetensors file (header size {n} for a {size}-byte file)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise HFFormatError(f"{path}: not a safetensors file (bad header: {e})") from None
  metadata = header.pop("__metadata__", None) or {}
  entries = {}
  for name, info in header.items():
    try:
      dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise HFFormatError(f"{path}: bad header entry for {name!r}: {info!r}") from None
    if dtype not in _ST_DTYPES:
      raise HFFormatError(f"{path}: tensor {name!r} has dtype {dtype}, which emjax cannot read "
                          f"(known: {', '.join(_ST_DTYPES)})")
    nbytes = math.prod(shape) * _np_dtype(_ST_DTYPES[dtype]).itemsize
    if end - begin != nbytes or 8 + n + end > size or begin < 0:
      raise HFFormatError(f"{path}: tensor {name!r} ({dtype}{list(shape)}) has bad offsets {begin}..{end} "
                          f"(file truncated or corrupt?)")
    entries[name] = _Entry(path, dtype, shape, 8 + n + begin, 8 + n + end)
  return entries, metadata


class SafetensorsCheckpoint:
  """The tensors of a Hugging Face model directory (single file or sharded with an index), memory-mapped."""

  def __init__(self, path: str):
    self.path = path
    files = _weight_files(path)
    self.entries: dict[str, _Entry] = {}
    for file in files:
      entries, _ = read_safetensors_header(file)
      for name, entry in entries.items():
        if name in self.entries:
          raise HFFormatError(f"{path}: tensor {name!r} is in both {self.entries[name].file} and {file}")
        self.entries[name] = entry
    index = os.path.join(path, WEIGHTS_INDEX_NAME) if os.path.isdir(path) else None
    if index and os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
      for name, file in weight_map.items():
        entry = self.entries.get(name)
        if entry is None or os.path.basename(entry.file) != file:
          raise HFFormatError(f"{index}: lists {name!r} in {file}, but that file does not hold it")
    self._maps: dict[str, np.memmap] = {}

  def names(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name].shape

  def read(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy array (a view of the memory-mapped file)."""
    e = self.entries[name]
    mm = self._maps.get(e.file)
    if mm is None:
      mm = self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
    dtype = _np_dtype(_ST_DTYPES[e.dtype])
    return np.frombuffer(mm, dtype=dtype, count=math.prod(e.shape), offset=e.start).reshape(e.shape)

  def close(self):
    self._maps.clear()


def _weight_files(path: str) -> list[str]:
  """The safetensors files of a model directory (or one file); a clear error for pickles or nothing."""
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise HFFormatError(f"{path}: emjax reads safetensors weights only (it never unpickles PyTorch files)")
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no Hugging Face model at {path!r}")
  index = os.path.join(path, WEIGHTS_INDEX_NAME)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise HFFormatError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    files = sorted(set(weight_map.values()))
    missing = [x for x in files if not os.path.isfile(os.path.join(path, x))]
    if missing:
      raise FileNotFoundError(f"{index} names shard(s) that are not there: {', '.join(missing)}")
    return [os.path.join(path, x) for x in files]
  single = os.path.join(path, WEIGHTS_NAME)
  if os.path.isfile(single):
    return [single]
  names = sorted(os.listdir(path))
  safetensors = [x for x in names if x.endswith(".safetensors")]
  if len(safetensors) == 1:
    return [os.path.join(path, safetensors[0])]
  pickles = [x for x in names if x.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise HFFormatError(
        f"{path} has only PyTorch pickle weights ({', '.join(pickles[:3])}); emjax reads safetensors only and "
        "never unpickles files. Convert them once where you trust the file, e.g. "
        "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`")
  if safetensors:
    raise HFFormatError(f"{path}: several .safetensors files ({', '.join(safetensors[:4])}) but no "
                        f"{WEIGHTS_INDEX_NAME} saying which tensors each holds")
  raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (no weights)")


def _write_safetensors(path: str, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                       fetch: Callable[[str], np.ndarray]) -> None:
  """Writes a .safetensors file; the header comes first (from shapes alone), then each tensor as fetched."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in tensors:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype in tensors:
      x = np.ascontiguousarray(fetch(name), dtype=dtype)
      if x.shape != tuple(shape):
        raise AssertionError(f"internal: {name} has shape {x.shape}, expected {shape}")
      f.write(x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes())
  os.replace(tmp, path)


# ============================================================================ import


def resolve_hf_path(path_or_id: str) -> str:
  """A local directory for a model directory or a hub id (downloaded only when online).

  A hub id is looked up in the local Hugging Face cache first; it is downloaded (safetensors,
  config and tokenizer files only) only when HF_HUB_OFFLINE is not set.
  """
  path = os.path.expanduser(os.fspath(path_or_id))
  if os.path.exists(path):
    return path
  looks_like_id = path.count("/") == 1 and not path.startswith((".", "/"))
  if not looks_like_id:
    raise FileNotFoundError(f"no Hugging Face model directory at {path!r}")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError(f"{path!r} is not a local directory, and huggingface_hub (to look it up as a hub "
                            "id) is not installed") from None
  patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "merges.txt", "*.jinja"]
  try:
    return huggingface_hub.snapshot_download(path, allow_patterns=patterns, local_files_only=True)
  except Exception:  # noqa: BLE001 -- not cached: maybe download below
    pass
  offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
  if offline:
    raise FileNotFoundError(f"{path!r} is not a local directory nor in the Hugging Face cache, and "
                            "HF_HUB_OFFLINE is set (no download)")
  try:
    return huggingface_hub.snapshot_download(path, allow_patterns=patterns)
  except Exception as e:  # noqa: BLE001
    raise FileNotFoundError(f"{path!r}: not a local directory, and downloading it from the hub failed "
                            f"({type(e).__name__}: {e})") from e


def _check_names_and_shapes(ckpt: SafetensorsCheckpoint, model_cfg, where: str) -> list[tuple[str, _Tensor, Any]]:
  tensors = list(_hf_tensors(model_cfg))
  expected = {name for name, _, _ in tensors}
  have = set(ckpt.names())
  missing = [name for name, _, _ in tensors if name not in have]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise HFFormatError(f"{where}: missing weight(s) {', '.join(repr(m) for m in missing[:5])}{more} "
                        f"for a {model_cfg.family} model with {model_cfg.n_layers} layers")
  ignorable = lambda n: n.endswith("rotary_emb.inv_freq") or (  # noqa: E731
      n == "lm_head.weight" and model_cfg.tie_embeddings)
  unexpected = sorted(n for n in have - expected if not ignorable(n))
  if unexpected:
    more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
    raise HFFormatError(f"{where}: unexpected weight(s) {', '.join(repr(u) for u in unexpected[:5])}{more}: "
                        f"the checkpoint does not match its config (emjax maps every tensor or refuses)")
  for name, spec, _ in tensors:
    if ckpt.shape(name) != spec.hf_shape:
      raise HFFormatError(f"{where}: weight {name!r} has shape {list(ckpt.shape(name))}, but config.json "
                          f"implies {list(spec.hf_shape)}")
  return tensors


def load_hf_params(path: str, model_cfg: transformer.TransformerConfig | None = None, mesh=None) -> dict:
  """Parameters (a nested dict matching `transformer.split_model`) from a Hugging Face directory.

  `model_cfg` defaults to `config_from_hf(path)`; its `param_dtype` is the dtype of the result.
  With a `mesh`, each parameter is created in its sharding from `param_logical_axes`; without,
  on the default device. Tensors are read one at a time from the memory-mapped files.
  """
  path = resolve_hf_path(path)
  if model_cfg is None:
    model_cfg = config_from_hf(path)
  ckpt = SafetensorsCheckpoint(path)
  where = path
  tensors = _check_names_and_shapes(ckpt, model_cfg, where)
  abstract_model = transformer.abstract_model(model_cfg)
  _, abstract = transformer.split_model(abstract_model)
  if mesh is not None:
    shardings = shd.tree_shardings(transformer.param_logical_axes(abstract_model), abstract, mesh)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  dtype = np.dtype(jnp.dtype(model_cfg.param_dtype))
  out: dict = {}
  filled: dict[tuple, Any] = {}
  try:
    for name, spec, layer in tensors:
      raw = ckpt.read(name)
      if spec.path is None:  # a tensor emjax does not have: only zeros are representable
        if np.any(raw.astype(np.float32) != 0):
          raise HFFormatError(f"{where}: weight {name!r} is non-zero, but emjax's {model_cfg.family} has no "
                              "such parameter")
        continue
      leaf_abstract, sharding = _get_path(abstract, spec.path), _get_path(shardings, spec.path)
      value = np.asarray(spec.to_emjax(raw)).astype(dtype)
      if layer is None:
        assert value.shape == leaf_abstract.shape, (name, value.shape, leaf_abstract.shape)
        _set_path(out, spec.path, _put(value, sharding))
        continue
      assert value.shape == leaf_abstract.shape[1:], (name, value.shape, leaf_abstract.shape)
      if spec.path not in filled:
        filled[spec.path] = _LayerFiller(leaf_abstract.shape, dtype, sharding)
      filled[spec.path].set(layer, value)
  finally:
    ckpt.close()
  for p, filler in filled.items():
    _set_path(out, p, filler.array)
  if jax.tree.structure(out) != jax.tree.structure(abstract):
    raise AssertionError(f"internal: imported tree {jax.tree.structure(out)} != model {jax.tree.structure(abstract)}")
  return out


def _put(value: np.ndarray, sharding) -> jax.Array:
  """A host array placed in `sharding` (each device gets only its slice)."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _layer_sharding(sharding):
  """The sharding of one layer's slice of a stacked array (its spec without the leading axis)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)
    if spec and spec[0] is not None:  # the layers axis itself is split: give each layer to all devices
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  return sharding


class _LayerFiller:
  """A stacked [n_layers, ...] array allocated on the devices and written one layer at a time (donated)."""

  def __init__(self, shape, dtype, sharding):
    # Zeros straight into each device's shard: no compilation, nothing gathered anywhere.
    self.array = jax.make_array_from_callback(
        shape, sharding, lambda index: np.zeros(_slice_shape(shape, index), dtype))
    self.sharding = sharding
    self.layer_sharding = _layer_sharding(sharding)

  def set(self, i: int, value: np.ndarray):
    self.array = _set_layer(self.array, _put(value, self.layer_sharding), np.int32(i), self.sharding)


def _slice_shape(shape, index) -> tuple[int, ...]:
  return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _set_layer(stacked, layer, i, sharding):
  """stacked[i] = layer, in place; compiled once per (shape, sharding)."""
  out = jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, 0)
  return jax.lax.with_sharding_constraint(out, sharding)


# ============================================================================ export


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _hf_tensor(params, spec: _Tensor, layer: int | None, dtype: np.dtype) -> np.ndarray:
  if spec.path is None:
    return np.zeros(spec.hf_shape, dtype)
  leaf = _get_path(params, spec.path)
  x = _to_host(leaf if layer is None else leaf[layer])
  return np.ascontiguousarray(spec.to_hf(x)).astype(dtype)


def _special_token_ids(tokenizer_dir: str | None) -> dict:
  """bos/eos/pad token ids for config.json, from the tokenizer directory's config files or its tokenizer."""
  if not tokenizer_dir:
    return {}
  keys = ("bos_token_id", "eos_token_id", "pad_token_id")
  for name in ("config.json", "generation_config.json"):
    p = os.path.join(tokenizer_dir, name)
    if os.path.isfile(p):
      with open(p, encoding="utf-8") as f:
        c = json.load(f)
      found = {k: c[k] for k in keys if c.get(k) is not None}
      if found:
        return found
  try:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
  except Exception as e:  # noqa: BLE001 -- best effort: the ids are optional
    log.warning("export: could not read special-token ids from %s (%s); config.json will have none",
                tokenizer_dir, e)
    return {}
  return {k: getattr(tok, k) for k in keys if getattr(tok, k, None) is not None}


def export_hf(params: Mapping[str, Any], model_cfg: transformer.TransformerConfig, out_dir: str,
              tokenizer_dir: str | None = None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              dtype: str | None = None, config_overrides: Mapping[str, Any] | None = None) -> str:
  """Writes a Hugging Face model directory (config.json, safetensors + index, tokenizer files); returns it.

  `dtype` (default: the parameters' own) is the dtype of the written tensors. Shards hold at most
  `max_shard_bytes` (one tensor larger than that gets a shard of its own); a single shard is
  `model.safetensors` with no index. Tensors are fetched to the host one at a time. In a
  multi-process job every process must call this (it gathers); process 0 writes.
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  check_exportable(model_cfg)  # before anything is written
  tokenizer_files = []
  if tokenizer_dir is not None:
    if not os.path.isdir(tokenizer_dir):
      raise FileNotFoundError(f"export: tokenizer directory {tokenizer_dir!r} does not exist")
    tokenizer_files = [x for x in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, x))]
    if not any(x.startswith("tokenizer") for x in tokenizer_files):
      raise FileNotFoundError(f"export: no tokenizer files in {tokenizer_dir!r} (looked for "
                              f"{', '.join(x for x in TOKENIZER_FILES if x.startswith('tokenizer'))})")
  leaves = jax.tree.leaves(params)
  out_dtype = np.dtype(jnp.dtype(dtype)) if dtype else np.dtype(jnp.dtype(leaves[0].dtype))
  if out_dtype.name not in ("float32", "bfloat16", "float16", "float64"):
    raise ValueError(f"export: dtype {out_dtype} cannot be written (use float32, bfloat16 or float16)")
  _, abstract = transformer.split_model(transformer.abstract_model(model_cfg))
  if jax.tree.structure(params) != jax.tree.structure(abstract):
    raise ValueError("export: params do not match model_cfg (LoRA adapters must be merged first: "
                     "emjax.models.lora.merge_lora)")
  bad = [(jax.tree_util.keystr(p), tuple(x.shape), a.shape)
         for (p, x), a in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(abstract))
         if tuple(x.shape) != a.shape]
  if bad:
    raise ValueError(f"export: parameter {bad[0][0]} has shape {bad[0][1]}, model_cfg implies {bad[0][2]}")

  tensors = list(_hf_tensors(model_cfg))
  by_name = {name: (spec, layer) for name, spec, layer in tensors}
  shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
  size = 0
  for name, spec, _ in tensors:
    nbytes = math.prod(spec.hf_shape) * out_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, spec.hf_shape, out_dtype))
    size += nbytes
  n = len(shards)
  files = [WEIGHTS_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # shards of an earlier export would confuse loaders
      if stale == WEIGHTS_INDEX_NAME or (stale.startswith("model") and stale.endswith(".safetensors")):
        os.remove(os.path.join(out_dir, stale))
  fetch = lambda name: _hf_tensor(params, *by_name[name], out_dtype)  # noqa: E731
  for file, shard in zip(files, shards):
    if writer:
      _write_safetensors(os.path.join(out_dir, file), shard, fetch)
    else:
      for name, _, _ in shard:
        fetch(name)  # take part in the gathers
  if not writer:
    return out_dir
  if n > 1:
    total = sum(math.prod(s) * d.itemsize for shard in shards for _, s, d in shard)
    index = {"metadata": {"total_size": total},
             "weight_map": {name: file for file, shard in zip(files, shards) for name, _, _ in shard}}
    with open(os.path.join(out_dir, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
      json.dump(index, f, indent=2, sort_keys=True)
      f.write("\n")
  extra = _special_token_ids(tokenizer_dir)
  extra.update(config_overrides or {})
  config = hf_config_dict(model_cfg, dtype=out_dtype.name, **extra)
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  if tokenizer_dir is not None and os.path.abspath(tokenizer_dir) != os.path.abspath(out_dir):
    for x in tokenizer_files:
      shutil.copyfile(os.path.join(tokenizer_dir, x), os.path.join(out_dir, x))
  return out_dir


# ============================================================================ in-memory transformers model


def to_hf(params: Mapping[str, Any], model_cfg: transformer.TransformerConfig,
          torch_dtype: str = "float32") -> tuple[Any, dict]:
  """(transformers config, state_dict of torch tensors) for emjax `params` (a nested dict of arrays)."""
  import torch  # pylint: disable=g-import-not-at-top

  dtype = getattr(torch, torch_dtype)
  sd = {}
  for name, spec, layer in _hf_tensors(model_cfg):
    # float32 on the host, then torch's own contiguous copy in the requested dtype.
    sd[name] = torch.from_numpy(_hf_tensor(params, spec, layer, np.dtype(np.float32)).copy()).to(dtype).contiguous()
  return hf_config(model_cfg), sd


def to_hf_model(params: Mapping[str, Any], model_cfg: transformer.TransformerConfig,
                torch_dtype: str = "float32", attn_implementation: str = "sdpa"):
  """A ready `transformers` causal LM (eval mode, CPU) holding the same weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  cfg, sd = to_hf(params, model_cfg, torch_dtype)
  cfg._attn_implementation = attn_implementation  # pylint: disable=protected-access
  model = transformers.AutoModelForCausalLM.from_config(cfg).to(getattr(torch, torch_dtype))
  missing, unexpected = model.load_state_dict(sd, strict=False)
  # A tied head is not in the state dict; it follows the embedding.
  missing = [m for m in missing if not (m == "lm_head.weight" and model_cfg.tie_embeddings)]
  if missing or unexpected:
    raise ValueError(f"to_hf_model: state_dict mismatch: missing {missing}, unexpected {unexpected}")
  return model.eval()
