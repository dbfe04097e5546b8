"""LoRA / rsLoRA adapters on the decoder's projections, selected by name and by layer.

An adapter on the weight W (contracting input dims I, output dims O) adds

    y += scale * ((dropout(x) . A) . B),   A: [I..., r],  B: [r, O...]
    scale = alpha / r   (LoRA)   or   alpha / sqrt(r)   (rsLoRA)

B starts at zero, so an adapted model starts equal to its base. The decoder
stores its layers stacked, so adapters are stacked too ([n_layers, ...]);
restricting them to some layers multiplies the update by a constant per-layer
0/1 mask, which also zeroes the gradient of the unselected layers' adapters —
so "rank-1 LoRA on the down projection of layer 7 only" is
`LoRAConfig(rank=1, targets=("down",), layers=(7,))`.

Adapter parameters are `LoRAParam`s (a `nnx.Param` subclass): the trainer
trains exactly those and keeps the base weights frozen, outside the optimizer.
A LoRA run checkpoints the adapters alone; `merge_trees` + `merge_lora` (or
`merge_adapters`) put them back onto their base, as plain nested dicts.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from emjax import sharding as shd
from emjax.models import transformer

# Short target names -> (sub-module of a Block, weight name).
TARGETS = {
    "q": ("attn", "q_proj"),
    "k": ("attn", "k_proj"),
    "v": ("attn", "v_proj"),
    "o": ("attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
# The contraction each weight takes part in (see transformer.Attention / MLP).
EQUATIONS = {
    "q_proj": "bld,dhk->blhk", "k_proj": "bld,dhk->blhk", "v_proj": "bld,dhk->blhk",
    "o_proj": "blhk,hkd->bld", "gate_proj": "bld,df->blf", "up_proj": "bld,df->blf", "down_proj": "blf,fd->bld",
}
_RANK = "z"  # einsum letter for the LoRA rank (unused by the equations above)


class LoRAParam(nnx.Param):
  """A trainable adapter weight."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 32
  alpha: float = 64.0
  rslora: bool = True
  dropout: float = 0.0
  targets: tuple[str, ...] = tuple(TARGETS)
  layers: tuple[int, ...] = ()  # empty: every layer

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  @classmethod
  def from_config(cls, lora_cfg) -> "LoRAConfig":
    """From `config.lora` (targets and layers as comma-separated strings or sequences)."""
    def as_tuple(value, cast):
      if isinstance(value, str):
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
      return tuple(cast(v) for v in value)
    return cls(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha), rslora=bool(lora_cfg.rslora),
               dropout=float(lora_cfg.dropout), targets=as_tuple(lora_cfg.targets, str),
               layers=as_tuple(lora_cfg.layers, int))


def _split_equation(equation: str):
  inputs, out_spec = equation.split("->")
  x_spec, w_spec = inputs.split(",")
  contracted = "".join(c for c in w_spec if c in x_spec)
  w_out = "".join(c for c in w_spec if c not in x_spec)
  x_free = "".join(c for c in x_spec if c not in contracted)
  return x_spec, contracted, w_out, x_free, out_spec


class LoRA(nnx.Module):
  """The adapter of one (stacked) weight."""

  def __init__(self, base: nnx.Param, weight_name: str, cfg: LoRAConfig, n_layers: int, *, rngs: nnx.Rngs,
               param_dtype=None):
    equation = EQUATIONS[weight_name]
    _, contracted, w_out, _, _ = _split_equation(equation)
    shape = base[...].shape[1:]  # without the layers axis
    axes = tuple(base.get_metadata()["logical_axes"])[1:]
    w_spec = equation.split("->")[0].split(",")[1]
    in_shape = tuple(shape[w_spec.index(c)] for c in contracted)
    out_shape = tuple(shape[w_spec.index(c)] for c in w_out)
    in_axes = tuple(axes[w_spec.index(c)] for c in contracted)
    out_axes = tuple(axes[w_spec.index(c)] for c in w_out)
    fan_in = math.prod(in_shape)
    # The model's parameter dtype, not the base weight's: a frozen base held in bf16 still trains
    # float32 adapters (and float32 optimizer moments).
    dtype = jnp.dtype(param_dtype) if param_dtype is not None else base[...].dtype
    # A as in PEFT (kaiming-uniform, a=sqrt(5) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))); B = 0.
    bound = 1.0 / math.sqrt(fan_in)
    self.lora_a = LoRAParam(
        jax.random.uniform(rngs.params(), (n_layers, *in_shape, cfg.rank), dtype, -bound, bound),
        logical_axes=("layers", *in_axes, None))
    self.lora_b = LoRAParam(jnp.zeros((n_layers, cfg.rank, *out_shape), dtype),
                            logical_axes=("layers", None, *out_axes))
    self.scale = cfg.scale
    self.dropout = cfg.dropout
    self.dropout_salt = zlib.crc32(weight_name.encode())  # independent masks for q, k, v, ...
    self.layer_mask = tuple(float(not cfg.layers or i in cfg.layers) for i in range(n_layers))

  def __call__(self, x, equation: str, ctx: transformer.LayerContext | None):
    x_spec, contracted, w_out, x_free, out_spec = _split_equation(equation)
    if self.dropout > 0 and ctx is not None and ctx.dropout_key is not None:
      key = jax.random.fold_in(ctx.dropout_key, self.dropout_salt)
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
    a = self.lora_a[...].astype(x.dtype)
    b = self.lora_b[...].astype(x.dtype)
    h = transformer.matmul(f"{x_spec},{contracted}{_RANK}->{x_free}{_RANK}", x, a)
    y = transformer.matmul(f"{x_free}{_RANK},{_RANK}{w_out}->{out_spec}", h, b)
    scale = self.scale
    if not all(self.layer_mask):
      index = 0 if ctx is None else ctx.index
      scale = scale * jnp.asarray(self.layer_mask, x.dtype)[index]
    return y * scale


def add_lora(model: transformer.Transformer, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> transformer.Transformer:
  """Attach adapters in place (and return the model). Unknown targets or layers are errors."""
  unknown = [t for t in cfg.targets if t not in TARGETS]
  if unknown or not cfg.targets:
    raise ValueError(f"config.lora.targets: {unknown or 'nothing'} matches no projection; "
                     f"choose from {', '.join(TARGETS)}")
  n_layers = model.cfg.n_layers
  bad_layers = [i for i in cfg.layers if not 0 <= i < n_layers]
  if bad_layers:
    raise ValueError(f"config.lora.layers: {bad_layers} out of range for a model with {n_layers} layers")
  if cfg.rank < 1:
    raise ValueError(f"config.lora.rank must be >= 1, got {cfg.rank}")
  if not 0.0 <= cfg.dropout < 1.0:
    raise ValueError(f"config.lora.dropout must be in [0, 1), got {cfg.dropout}")
  for target in cfg.targets:
    sub_name, weight_name = TARGETS[target]
    sub = getattr(model.layers, sub_name)
    adapter = LoRA(getattr(sub, weight_name), weight_name, cfg, n_layers, rngs=rngs,
                   param_dtype=model.cfg.param_dtype)
    setattr(sub, f"{weight_name}_lora", adapter)
  return model


def merge_lora(params: dict, cfg: LoRAConfig) -> dict:
  """Base + adapters -> plain base weights (the adapters removed), e.g. for export."""
  merged = jax.tree.map(lambda x: x, params)  # shallow structural copy
  for target in cfg.targets:
    sub_name, weight_name = TARGETS[target]
    sub = dict(merged["layers"][sub_name])
    adapter = sub.pop(f"{weight_name}_lora")
    _, contracted, w_out, _, _ = _split_equation(EQUATIONS[weight_name])
    w_spec = EQUATIONS[weight_name].split("->")[0].split(",")[1]
    a, b = adapter["lora_a"], adapter["lora_b"]
    delta = jnp.einsum(f"n{contracted}{_RANK},n{_RANK}{w_out}->n{w_spec}", a, b)
    mask = jnp.asarray([float(not cfg.layers or i in cfg.layers) for i in range(a.shape[0])], a.dtype)
    delta = delta * (cfg.scale * mask).reshape((-1,) + (1,) * (delta.ndim - 1))
    sub[weight_name] = (sub[weight_name] + delta.astype(sub[weight_name].dtype))
    merged["layers"] = dict(merged["layers"], **{sub_name: sub})
  return merged


def merge_adapters(base: dict, adapters: dict, cfg: LoRAConfig) -> dict:
  """A LoRA run's effective weights: `adapters` (its checkpointed `params`) merged into `base`."""
  return merge_lora(merge_trees(base, adapters), cfg)


# ----------------------------------------------------------------------------- parameter trees


def merge_trees(a: dict, b: dict) -> dict:
  """Nested-dict union of two parameter trees (frozen base + trainable adapters)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_trees(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def select_like(full: dict, like: dict) -> dict:
  """The subtree of `full` with the structure of `like`."""
  return {k: select_like(full[k], v) if isinstance(v, dict) else full[k] for k, v in like.items()}


def split_trainable(model: transformer.Transformer, lora_cfg: LoRAConfig | None) -> tuple[object, dict, dict]:
  """(graphdef, trainable, frozen): the adapters and the base under LoRA; every parameter and {} otherwise."""
  if lora_cfg is None:
    graphdef, trainable = nnx.split(model, nnx.Param)
    frozen = {}
  else:
    graphdef, trainable, frozen = nnx.split(model, LoRAParam, nnx.Param)
    frozen = transformer._to_pure_dict(frozen)  # pylint: disable=protected-access
  return graphdef, transformer._to_pure_dict(trainable), frozen  # pylint: disable=protected-access


def abstract_model(model_cfg: transformer.TransformerConfig, cfg: LoRAConfig | None) -> transformer.Transformer:
  """The model (with adapters attached when `cfg` is given) as shapes only: nothing is allocated."""
  if cfg is None:
    return transformer.abstract_model(model_cfg)
  return nnx.eval_shape(lambda: add_lora(transformer.Transformer(model_cfg, rngs=nnx.Rngs(0)), cfg,
                                         rngs=nnx.Rngs(1)))


def adapter_abstract(model_cfg: transformer.TransformerConfig, cfg: LoRAConfig, mesh) -> dict:
  """ShapeDtypeStructs (replicated on `mesh`) of the adapters: what a LoRA run checkpoints as `params`."""
  _, adapters, _ = split_trainable(abstract_model(model_cfg, cfg), cfg)
  rep = shd.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), adapters)
