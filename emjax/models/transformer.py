"""Decoder-only transformer in Flax NNX for the Llama / Qwen2 / Qwen3 / OLMo-2 / OLMo-3 family.

One module tree covers the five families; they differ only in switches:

  llama   pre-norm blocks, no biases, optional Llama-3 RoPE scaling
  qwen2   llama + a bias on the q/k/v projections
  qwen3   llama + RMS QK-norm over each head (`qk_norm_per_head`), before RoPE
  olmo2   post-norm blocks (norm applied to each sub-layer's output) + RMS
          QK-norm over the full q and k projections
  olmo3   olmo2 + sliding-window attention in the layers `layer_types` marks
          (plain RoPE there; YaRN scaling, if any, in the full-attention layers)

Parameters live in `param_dtype` (float32) and are cast to the compute `dtype`
(bfloat16 on accelerators) where they are used. Every parameter carries its
logical axis names as `logical_axes` metadata; `emjax.sharding` maps them onto
the mesh. The blocks are stored stacked (a leading `layers` axis) so that the
forward pass can `lax.scan` over them: one compiled block whatever the depth.

Shapes are named in variable suffixes: B batch, L length (queries), S length
(keys), D model width, H query heads, K kv heads, G = H // K, Dh head dim,
F MLP width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax import sharding as shd

FAMILIES = ("llama", "qwen2", "qwen3", "olmo2", "olmo3")
# Hugging Face's names for a layer's attention (`config.model.layer_types`).
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
ROPE_SCALING_TYPES = ("llama3", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
# xla: emjax's einsum attention; fused: jax.nn.dot_product_attention's XLA lowering; cudnn: jax's cuDNN
# kernel or an error; auto: picked per call by `resolve_attention` from the platform the program is
# compiled for (the mesh's devices).
ATTENTION_IMPLS = ("auto", "xla", "fused", "cudnn")
# jax's names for the precision of float32 matmuls (`jax.default_matmul_precision`); "default" leaves
# the platform's choice (TF32 on NVIDIA GPUs, one bf16 pass on TPUs), "highest" asks for float32.
MATMUL_PRECISIONS = ("default", "high", "highest")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of the decoder; built from `config.model` by `from_config`."""

  family: str = "llama"
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 0  # 0 = d_model // n_heads
  d_ff: int = 128
  rope_theta: float = 10000.0
  # Frequency scaling of the full-attention layers (sliding-window layers keep plain RoPE at
  # rope_theta, as OLMo-3's do); factor 0 disables it. `rope_scaling_type` "llama3" (Llama 3.1:
  # the low/high_freq_factor bands) or "yarn" (YaRN: a ramp between the beta_fast / beta_slow
  # rotation counts, and cos/sin times rope_attention_factor, 0 = YaRN's 0.1 ln(factor) + 1).
  rope_scaling_factor: float = 0.0
  rope_scaling_type: str = "llama3"
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rope_yarn_beta_fast: float = 32.0
  rope_yarn_beta_slow: float = 1.0
  rope_attention_factor: float = 0.0
  qkv_bias: bool = False
  qk_norm: bool = False
  # QK-norm over each head's Dh with one scale [Dh] shared by the heads (Qwen3), instead of over
  # the whole projected q (and k) with a scale [H, Dh] (OLMo-2/3).
  qk_norm_per_head: bool = False
  post_norm: bool = False
  # Per layer "full_attention" or "sliding_attention" (Hugging Face's names); () = all full. A
  # sliding layer's query at position p sees the keys at positions (p - sliding_window, p].
  layer_types: tuple[str, ...] = ()
  sliding_window: int = 0
  tie_embeddings: bool = False
  norm_eps: float = 1e-5
  init_std: float = 0.02
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = True
  attention: str = "auto"
  matmul_precision: str = "default"

  def __post_init__(self):
    def bad(key, msg):
      raise ValueError(f"config.model.{key}: {msg}")

    if isinstance(self.layer_types, str) or not isinstance(self.layer_types, (list, tuple)):
      bad("layer_types", f"must be a list of {' / '.join(LAYER_TYPES)}, one per layer, got {self.layer_types!r}")
    # A config read back from JSON holds a list; the config stays hashable (a static jit argument).
    object.__setattr__(self, "layer_types", tuple(self.layer_types))

    if self.family not in FAMILIES:
      bad("family", f"unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}")
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
      if getattr(self, key) <= 0:
        bad(key, f"must be positive, got {getattr(self, key)}")
    if self.n_heads % self.n_kv_heads:
      bad("n_kv_heads", f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim == 0 and self.d_model % self.n_heads:
      bad("head_dim", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
    if self.resolved_head_dim % 2:
      bad("head_dim", f"must be even for RoPE, got {self.resolved_head_dim}")
    if self.layer_types and len(self.layer_types) != self.n_layers:
      bad("layer_types", f"has {len(self.layer_types)} entries for n_layers={self.n_layers}")
    unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
    if unknown:
      bad("layer_types", f"unknown layer type(s) {unknown}; choose from {', '.join(LAYER_TYPES)}")
    if self.sliding_window < 0:
      bad("sliding_window", f"must be >= 0 (0 = none), got {self.sliding_window}")
    if any(self.sliding_layers) and not self.sliding_window:
      bad("sliding_window", f"layer_types has {SLIDING_ATTENTION!r} layers but no window (sliding_window=0)")
    if self.sliding_window and not any(self.sliding_layers):
      bad("sliding_window", f"is {self.sliding_window} but no layer is {SLIDING_ATTENTION!r} (set layer_types)")
    if self.qk_norm_per_head and not self.qk_norm:
      bad("qk_norm_per_head", "needs qk_norm=True")
    if self.rope_scaling_type not in ROPE_SCALING_TYPES:
      bad("rope_scaling_type", f"unknown RoPE scaling {self.rope_scaling_type!r}; choose from "
          f"{', '.join(ROPE_SCALING_TYPES)}")
    if self.rope_scaling_factor < 0:
      bad("rope_scaling_factor", f"must be >= 0 (0 = no scaling), got {self.rope_scaling_factor}")
    if self.rope_scaling_factor and self.rope_original_max_position <= 0:
      bad("rope_original_max_position", f"must be positive, got {self.rope_original_max_position}")
    if self.remat not in REMAT_POLICIES:
      bad("remat", f"unknown remat policy {self.remat!r}; choose from {', '.join(REMAT_POLICIES)}")
    if self.attention not in ATTENTION_IMPLS:
      bad("attention", f"unknown attention implementation {self.attention!r}; choose from {', '.join(ATTENTION_IMPLS)}")
    if self.matmul_precision not in MATMUL_PRECISIONS:
      bad("matmul_precision", f"unknown precision {self.matmul_precision!r}; choose from {', '.join(MATMUL_PRECISIONS)}")
    for key in ("param_dtype", "dtype"):
      try:
        jnp.dtype(getattr(self, key))
      except TypeError:
        bad(key, f"unknown dtype {getattr(self, key)!r}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: does it attend through the sliding window."""
    return tuple(t == SLIDING_ATTENTION for t in self.layer_types) or (False,) * self.n_layers

  @classmethod
  def from_config(cls, model_cfg: Mapping[str, Any]) -> "TransformerConfig":
    values = dict(model_cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"config.model: unknown keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)

  def num_params(self, include_embeddings: bool = True) -> int:
    d, dh, f = self.d_model, self.resolved_head_dim, self.d_ff
    attn = d * dh * (2 * self.n_heads + 2 * self.n_kv_heads)
    if self.qkv_bias:
      attn += dh * (self.n_heads + 2 * self.n_kv_heads)
    if self.qk_norm:
      attn += 2 * dh if self.qk_norm_per_head else dh * (self.n_heads + self.n_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    total = self.n_layers * per_layer + d
    if include_embeddings:
      total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return total

  def matmul_params(self) -> int:
    """Parameters a token's forward multiplies by: every non-embedding weight plus the LM head."""
    return self.num_params(include_embeddings=False) + self.vocab_size * self.d_model

  def attention_keys(self, seq_len: int) -> float:
    """Keys a query sees on average, summed over the layers: seq_len / 2 causal; a sliding layer at most
    `sliding_window` (w - w^2 / 2L on average once the sequence is longer)."""
    w = self.sliding_window
    return sum(min(seq_len / 2, w - w * w / (2 * seq_len)) if sliding else seq_len / 2
               for sliding in self.sliding_layers)

  def forward_flops_per_token(self, seq_len: int) -> float:
    """One forward pass: 2 FLOPs per matmul parameter + 4 H Dh per (query, key) pair (scores, values)."""
    return 2.0 * self.matmul_params() + 4.0 * self.n_heads * self.resolved_head_dim * self.attention_keys(seq_len)

  def flops_per_token(self, seq_len: int) -> float:
    """Training every weight: forward + backward (input and weight gradients) = 3 forwards = 6 N + attention."""
    return 3.0 * self.forward_flops_per_token(seq_len)

  def lora_flops_per_token(self, seq_len: int, adapter_params: int) -> float:
    """Training adapters on a frozen base: the base's forward and its input-gradient backward (no weight
    gradient: 4 N, not 6 N), attention forward and backward in full (its operands are activations),
    and 6 FLOPs per adapter parameter (forward, input and weight gradients)."""
    attention = 4.0 * self.n_heads * self.resolved_head_dim * self.attention_keys(seq_len)
    return 4.0 * self.matmul_params() + 3.0 * attention + 6.0 * adapter_params


# ----------------------------------------------------------------------------- parameters


def _param(rngs: nnx.Rngs, shape, axes, cfg: TransformerConfig, std: float | None = None, init: str = "normal"):
  dtype = jnp.dtype(cfg.param_dtype)
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (std if std is not None else cfg.init_std) * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class LayerContext(NamedTuple):
  """What a layer's projections may need besides their input (LoRA adapters use it)."""

  index: Any  # this layer's index in the stack (traced under scan)
  dropout_key: Any = None  # None: no dropout (evaluation, sampling)
  edit: "ResidualEdit | None" = None  # steering / directional ablation (sampling)


class ResidualEdit(NamedTuple):
  """Steering and directional ablation of the residual stream, all traced arrays: new values of alpha,
  of the direction or of the positions never recompile; only whether an edit is given does.

  Residual position p in [0, n_layers] is the stream entering block p (0: the embeddings, n_layers:
  after the last block, before the final norm): Hugging Face's `hidden_states[p]` for p < n_layers
  (its last entry, p = n_layers, is taken after the final norm; here it is before).

  * Steering at p: every token's residual there gets `alpha_p * ||x|| * d` added (alpha relative to
    that token's residual norm, so one alpha means the same push at every layer and in every model).
  * Directional ablation (Arditi et al. 2024): what is written to the stream is projected off `d`,
    `c <- c - d d^T c`: at p = 0 the embeddings, at p >= 1 block p-1's attention and MLP outputs.
    Ablating every position leaves the stream with no component along `d` anywhere.

  `d` must have unit norm for the projection to remove it (`residual_edit` normalises it). The edit is
  computed in float32 and cast back to the stream's dtype: in bf16 an ablated write keeps a component
  along `d` of the order of bf16's rounding (2^-8 of its norm).
  """

  direction_D: Any  # [D] float32, unit norm
  steer_P: Any  # [n_layers + 1] alpha at each residual position (0: none)
  ablate_P: Any  # [n_layers + 1] 1 where the writes at that position are projected off d, else 0

  def steer(self, x_BxLxD, position):
    alpha = self.steer_P[position]
    x32 = x_BxLxD.astype(jnp.float32)
    norm_BxLx1 = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return (x32 + alpha * norm_BxLx1 * self.direction_D).astype(x_BxLxD.dtype)

  def ablate(self, c_BxLxD, position):
    x32 = c_BxLxD.astype(jnp.float32)
    along_BxLx1 = jnp.sum(x32 * self.direction_D, axis=-1, keepdims=True)
    return (x32 - self.ablate_P[position] * along_BxLx1 * self.direction_D).astype(c_BxLxD.dtype)


def residual_edit(n_layers: int, direction_D, *, steer: Mapping[int, float] | None = None,
                  ablate: Sequence[int] | str = ()) -> ResidualEdit:
  """A `ResidualEdit` from a direction (normalised here) and {position: alpha} / ablated positions
  ('all': every position, the directional ablation of Arditi et al.)."""
  d = np.asarray(direction_D, np.float64).reshape(-1)
  norm = float(np.linalg.norm(d))
  if not np.isfinite(norm) or norm == 0:
    raise ValueError(f"the direction of a residual edit must be a finite, non-zero vector (its norm is {norm})")
  steer_P, ablate_P = np.zeros(n_layers + 1, np.float32), np.zeros(n_layers + 1, np.float32)
  positions = range(n_layers + 1) if ablate == "all" else ablate
  for name, where in (("steer", list(steer or {})), ("ablate", list(positions))):
    bad = [p for p in where if not 0 <= int(p) <= n_layers]
    if bad:
      raise ValueError(f"{name}: residual positions {bad} are outside [0, {n_layers}] (0: the embeddings, "
                       f"{n_layers}: after the last block)")
  for p, alpha in (steer or {}).items():
    steer_P[int(p)] = alpha
  ablate_P[[int(p) for p in positions]] = 1.0
  return ResidualEdit(jnp.asarray(d / norm, jnp.float32), jnp.asarray(steer_P), jnp.asarray(ablate_P))


def matmul(equation: str, x, w):
  """`jnp.einsum(equation, x, w)` for `<free><contracted>,<contracted><out>-><free><out>`, as one 2-D matmul.

  XLA:CPU lowers the backward of a dot whose operands keep several leading dims (b, l) to a loop
  several times slower than a GEMM (the weight gradient contracts b and l together); with them
  flattened first, forward and backward are plain GEMMs. The contraction is the same, and
  GPU/TPU compilers canonicalise dots to this form themselves. Other equations go to einsum.
  """
  inputs, out = equation.split("->")
  x_spec, w_spec = inputs.split(",")
  contracted = "".join(c for c in w_spec if c in x_spec)
  n = len(contracted)
  free, w_out = x_spec[:len(x_spec) - n], w_spec[n:]
  if not n or x_spec[len(x_spec) - n:] != contracted or w_spec[:n] != contracted or out != free + w_out:
    return jnp.einsum(equation, x, w)
  k = math.prod(x.shape[len(free):])
  y = jnp.reshape(x, (-1, k)) @ jnp.reshape(w, (k, -1))
  return jnp.reshape(y, (*x.shape[:len(free)], *w.shape[n:]))


def project(module: nnx.Module, name: str, equation: str, x, ctx: LayerContext | None):
  """x . W for the weight `module.<name>`, plus its LoRA adapter (`<name>_lora`) if one is attached."""
  y = matmul(equation, x, getattr(module, name)[...].astype(x.dtype))
  adapter = getattr(module, f"{name}_lora", None)
  if adapter is not None:
    y = y + adapter(x, equation, ctx).astype(y.dtype)
  return y


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.scale = _param(rngs, (dim,), ("norm",), cfg, init="ones")

  def __call__(self, x):
    # Normalise in float32 (as HF does), then return in the input's dtype.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_inverse_frequencies(cfg: TransformerConfig, scaled: bool = True) -> jax.Array:
  """RoPE's inverse frequencies [Dh/2]; `scaled` False: plain RoPE (what sliding-window layers use)."""
  dh = cfg.resolved_head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  if not (scaled and cfg.rope_scaling_factor):
    return inv_freq
  factor, old_len = cfg.rope_scaling_factor, cfg.rope_original_max_position
  if cfg.rope_scaling_type == "yarn":
    # YaRN (as transformers computes it): wavelengths that turn more than beta_fast times over the
    # original context keep their frequency, those under beta_slow are slowed by `factor`, and a
    # linear ramp over the dimensions in between (bounds rounded outwards) mixes the two.
    def dim_of(rotations):
      return dh * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(dim_of(cfg.rope_yarn_beta_fast)), 0)
    high = min(math.ceil(dim_of(cfg.rope_yarn_beta_slow)), dh - 1)
    if low == high:
      high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    keep = 1 - jnp.clip((jnp.arange(dh // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
  # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, smooth in between.
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  low_wavelen, high_wavelen = old_len / low, old_len / high
  scaled_freq = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled_freq / factor + smooth * scaled_freq
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, smoothed, scaled_freq)


def rope_attention_factor(cfg: TransformerConfig) -> float:
  """What the full-attention layers multiply cos/sin by: YaRN's attention factor, else 1."""
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling_type != "yarn" or not factor:
    return 1.0
  if cfg.rope_attention_factor:
    return float(cfg.rope_attention_factor)
  return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


class LayerAttention(NamedTuple):
  """How one layer's attention handles positions (stacked with a leading layers axis for the stack)."""

  inv_freq: Any  # [Dh/2] RoPE inverse frequencies
  rope_scale: Any = None  # cos/sin multiplier (YaRN's attention factor); None = 1
  window: Any = None  # int32: keys at positions (p - window, p] are seen; None = no window


def layer_attention(cfg: TransformerConfig) -> LayerAttention:
  """Every layer's `LayerAttention`, stacked: the data that `lax.scan` hands each layer.

  Sliding-window layers rotate with plain RoPE; the full-attention ones get the RoPE scaling.
  `window` is None without sliding layers and `rope_scale` None without YaRN: then nothing extra
  is computed (the other families run exactly as before these existed).
  """
  sliding_Lyr = jnp.asarray(cfg.sliding_layers)
  full, plain = rope_inverse_frequencies(cfg), rope_inverse_frequencies(cfg, scaled=False)
  inv_freq_LyrxHalf = jnp.where(sliding_Lyr[:, None], plain[None], full[None])
  scale = rope_attention_factor(cfg)
  rope_scale_Lyr = jnp.where(sliding_Lyr, 1.0, scale).astype(jnp.float32) if scale != 1.0 else None
  window_Lyr = None
  if cfg.sliding_window:
    # A full layer's "window" is larger than any position difference.
    window_Lyr = jnp.where(sliding_Lyr, cfg.sliding_window, jnp.iinfo(jnp.int32).max).astype(jnp.int32)
  return LayerAttention(inv_freq_LyrxHalf, rope_scale_Lyr, window_Lyr)


def apply_rope(x_BxLxNxDh, positions_BxL, inv_freq, scale=None):
  """Rotary embedding with the "rotate half" layout that HF Llama/Qwen/OLMo use; cos/sin times `scale` if given."""
  angles_BxLxHalf = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BxLxHalf)[:, :, None, :]
  sin = jnp.sin(angles_BxLxHalf)[:, :, None, :]
  if scale is not None:
    cos, sin = cos * scale, sin * scale
  x1, x2 = jnp.split(x_BxLxNxDh.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxDh.dtype)


def write_cache(buf_Bx___, x_Bx___, index, axis: int):
  """`x` written into `buf` from slot `index` along `axis`: one slot for every row (a scalar), or
  each row its own (`index` [B]: continuous batching, where the rows are at different steps)."""
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(buf_Bx___, x_Bx___, index, axis=axis)
  return jax.vmap(lambda b, x, i: jax.lax.dynamic_update_slice_in_dim(b, x, i, axis=axis - 1))(buf_Bx___, x_Bx___,
                                                                                                index)


def attention_mask(q_positions_BxL, q_segments_BxL, kv_positions_BxS, kv_segments_BxS, window=None):
  """Causal and same-document: query i sees key j iff same segment and pos_j <= pos_i
  (and, with a sliding `window`, pos_i - pos_j < window).

  Segment id 0 marks padding; padded keys are never visible. A padded query sees
  nothing, and its (ignored) output is defined as zeros by the softmax guard below.
  Positions restart in each document, so the window never reaches into another one.
  """
  same_doc = q_segments_BxL[:, :, None] == kv_segments_BxS[:, None, :]
  causal = kv_positions_BxS[:, None, :] <= q_positions_BxL[:, :, None]
  real_key = kv_segments_BxS[:, None, :] != 0
  mask = same_doc & causal & real_key
  if window is not None:
    mask &= (q_positions_BxL[:, :, None] - kv_positions_BxS[:, None, :]) < window
  return mask


def _attend(scores_BxKxGxLxS, mask_BxLxS, v_BxKxSxDh):
  """softmax(scores) . v over the keys each query may see -> [B, K, G, L, Dh].

  The probabilities are never formed: exp(scores - max) multiplies v and the product is divided
  by the row sums, which divides a [.., L, Dh] tensor instead of the [.., L, S] one and keeps the
  softmax's backward to one pass over the scores (on XLA:CPU the attention of a small model ran
  at half the speed of torch's fused kernel with the probabilities formed first). A query that
  sees no key (padding) gets zeros.
  """
  scores = jnp.where(mask_BxLxS[:, None, None], scores_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  weights = jnp.exp(scores - row_max)
  out = jnp.einsum("bkgls,bksd->bkgld", weights.astype(v_BxKxSxDh.dtype), v_BxKxSxDh,
                   preferred_element_type=jnp.float32)
  sees_a_key_Bx1x1xLx1 = mask_BxLxS.any(-1)[:, None, None, :, None]
  out = out / jnp.sum(weights, axis=-1, keepdims=True) * sees_a_key_Bx1x1xLx1
  return out.astype(v_BxKxSxDh.dtype)


def attention_device():
  """The first device of the mesh the model is traced for (`shd.activation_sharding`), else the local one.

  The mesh, not `jax.default_backend()`: a plan compiles on a CPU for a TPU slice, and must trace the
  attention that slice runs.
  """
  mesh = shd.active_mesh()
  return mesh.devices.flat[0] if mesh is not None else jax.devices()[0]


def _cudnn_head_dim_limit(device) -> int:
  # jax's cuDNN flash attention takes head dims up to 256 on Hopper and later, 128 before.
  capability = getattr(device, "compute_capability", None)
  try:
    major = int(str(capability).split(".")[0])
  except ValueError:
    major = 0
  return 256 if major >= 9 else 128


def resolve_attention(impl: str, dtype, head_dim: int, q_len: int, kv_len: int, masked: bool, device=None) -> str:
  """The implementation `impl` ("auto" or a forced one) stands for on `device`'s platform.

  auto: cuDNN on NVIDIA GPUs when its flash kernel takes the call (bf16/fp16, head dim a multiple of
  8 within its limit, even lengths when a mask becomes a bias), else jax's XLA lowering on
  accelerators ("fused"), and emjax's einsum attention on CPUs, where XLA:CPU runs it at the speed of
  torch's fused kernel.
  """
  if impl != "auto":
    return impl
  device = device if device is not None else attention_device()
  platform = device.platform
  if platform == "cpu":
    return "xla"
  if (platform == "gpu" and "nvidia" in str(device.device_kind).lower()
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      and head_dim % 8 == 0 and head_dim <= _cudnn_head_dim_limit(device)
      and not (masked and (q_len % 2 or kv_len % 2))):
    return "cudnn"
  return "fused"


def causal_mask(q_len: int, kv_len: int):
  """[1, L, S]: query i sees key j <= i (the index order; what `is_causal` means to jax's kernels)."""
  return jnp.tril(jnp.ones((q_len, kv_len), bool))[None]


def dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, impl: str, causal: bool = False):
  """Grouped-query attention; `impl` picks emjax's einsum path ("xla") or jax's ("fused", "cudnn").

  `causal`: query i never sees key j > i, which holds whenever queries and keys are the same
  tokens in the same order (positions grow along a document); the fused kernels are then told
  (`is_causal`), so that cuDNN skips the upper triangle instead of reading it through the mask.
  `mask_BxLxS` None: nothing but that causal order (one segment, no window, no padding); cuDNN then
  gets no bias at all, and its backward computes no bias gradient.
  """
  b, l, h, dh = q_BxLxHxDh.shape
  s = k_BxSxKxDh.shape[1]
  if mask_BxLxS is None and not causal:
    raise ValueError("dot_product_attention: mask=None means causal-only attention; pass causal=True")
  impl = resolve_attention(impl, q_BxLxHxDh.dtype, dh, l, s, mask_BxLxS is not None)
  with jax.named_scope(f"attention_{impl}"):
    if impl in ("fused", "cudnn"):
      return jax.nn.dot_product_attention(
          q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=None if mask_BxLxS is None else mask_BxLxS[:, None],
          is_causal=causal, implementation="cudnn" if impl == "cudnn" else "xla")
    if mask_BxLxS is None:
      mask_BxLxS = causal_mask(l, s)
    k_heads = k_BxSxKxDh.shape[2]
    q_BxKxGxLxDh = q_BxLxHxDh.reshape(b, l, k_heads, h // k_heads, dh).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgld,bskd->bkgls", q_BxKxGxLxDh, k_BxSxKxDh,
                        preferred_element_type=jnp.float32) / math.sqrt(dh)
    out_BxKxGxLxDh = _attend(scores, mask_BxLxS, v_BxSxKxDh.transpose(0, 2, 1, 3))
    return out_BxKxGxLxDh.transpose(0, 3, 1, 2, 4).reshape(b, l, h, dh)


def cached_attention(q_BxLxHxDh, k_BxKxDhxS, v_BxKxSxDh, mask_BxLxS):
  """Grouped-query attention of new queries over the KV cache, in the cache's own layout.

  Keys are cached [B, K, Dh, S] and values [B, K, S, Dh], so that both products are
  plain (batch, kv head)-batched matmuls that read the cache in place: scores = q . K
  and out = p . V. With keys laid out [B, S, K, Dh] (or [.., S, Dh]), XLA:CPU's dot
  library repacked the whole cache at every decode step (profiled; figures in
  benchmarks/README.md).
  """
  b, l, h, dh = q_BxLxHxDh.shape
  k_heads = k_BxKxDhxS.shape[1]
  q_BxKxGxLxDh = q_BxLxHxDh.reshape(b, l, k_heads, h // k_heads, dh).transpose(0, 2, 3, 1, 4)
  scores = jnp.einsum("bkgld,bkds->bkgls", q_BxKxGxLxDh, k_BxKxDhxS,
                      preferred_element_type=jnp.float32) / math.sqrt(dh)
  out_BxKxGxLxDh = _attend(scores, mask_BxLxS, v_BxKxSxDh)
  return out_BxKxGxLxDh.transpose(0, 3, 1, 2, 4).reshape(b, l, h, dh)


class Attention(nnx.Module):
  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    self.q_proj = _param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), cfg)
    self.k_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg)
    self.v_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg)
    self.o_proj = _param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), cfg)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (h, dh), ("q_heads", "head_dim"), cfg, init="zeros")
      self.k_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), cfg, init="zeros")
      self.v_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), cfg, init="zeros")
    if cfg.qk_norm and cfg.qk_norm_per_head:
      # Qwen3 normalises each head's q (and k) on its own, with one scale for all heads.
      self.q_norm = _param(rngs, (dh,), ("head_dim",), cfg, init="ones")
      self.k_norm = _param(rngs, (dh,), ("head_dim",), cfg, init="ones")
    elif cfg.qk_norm:
      # OLMo-2/3 normalise the whole projected q (and k) vector, across heads.
      self.q_norm = _param(rngs, (h, dh), ("q_heads", "head_dim"), cfg, init="ones")
      self.k_norm = _param(rngs, (k, dh), ("kv_heads", "head_dim"), cfg, init="ones")

  def _qk_norm(self, x_BxLxNxDh, scale):
    x32 = x_BxLxNxDh.astype(jnp.float32)
    axes = (-1,) if self.cfg.qk_norm_per_head else (-2, -1)
    var = jnp.mean(x32 * x32, axis=axes, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale[...].astype(jnp.float32)).astype(x_BxLxNxDh.dtype)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, layer: LayerAttention, layer_cache=None, kv=None,
               ctx=None):
    """Self-attention over the new tokens, or (with `layer_cache`) over the KV cache.

    `layer` is this layer's RoPE and window (see `layer_attention`). `layer_cache` is
    (k_BxKxDhxS, v_BxKxSxDh); `kv` = (positions_BxS, segment_ids_BxS, cache_index): the
    new keys/values are written at `cache_index` and the queries attend to every cache
    slot their positions, segments (and window) allow.
    Returns (out_BxLxD, updated layer_cache or None).
    """
    cfg = self.cfg
    dtype = x_BxLxD.dtype
    q = project(self, "q_proj", "bld,dhk->blhk", x_BxLxD, ctx)
    k = project(self, "k_proj", "bld,dhk->blhk", x_BxLxD, ctx)
    v = project(self, "v_proj", "bld,dhk->blhk", x_BxLxD, ctx)
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dtype)
      k = k + self.k_bias[...].astype(dtype)
      v = v + self.v_bias[...].astype(dtype)
    if cfg.qk_norm:
      q = self._qk_norm(q, self.q_norm)
      k = self._qk_norm(k, self.k_norm)
    q = apply_rope(q, positions_BxL, layer.inv_freq, layer.rope_scale)
    k = apply_rope(k, positions_BxL, layer.inv_freq, layer.rope_scale)
    q = shd.constrain(q, ("batch", "length", "q_heads", "head_dim"))
    k = shd.constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = shd.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    if layer_cache is None:
      # Queries and keys are the same tokens in order: causal by index, which the fused kernels use.
      # `segment_ids_BxL` None (one segment, no padding) and no window leave nothing else to mask.
      if segment_ids_BxL is None and layer.window is None:
        mask = None
      else:
        segments = segment_ids_BxL if segment_ids_BxL is not None else jnp.ones_like(positions_BxL)
        mask = attention_mask(positions_BxL, segments, positions_BxL, segments, layer.window)
      out_BxLxHxDh = dot_product_attention(q, k, v, mask, cfg.attention, causal=True)
    else:
      kv_positions_BxS, kv_segments_BxS, cache_index = kv
      cache_k, cache_v = layer_cache  # [B, K, Dh, S] and [B, K, S, Dh]: see `cached_attention`
      cache_k = write_cache(cache_k, k.transpose(0, 2, 3, 1).astype(cache_k.dtype), cache_index, axis=3)
      cache_v = write_cache(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), cache_index, axis=2)
      layer_cache = (cache_k, cache_v)
      mask = attention_mask(positions_BxL, segment_ids_BxL, kv_positions_BxS, kv_segments_BxS, layer.window)
      impl = resolve_attention(cfg.attention, dtype, cfg.resolved_head_dim, q.shape[1], cache_k.shape[3], True)
      if impl == "xla":
        out_BxLxHxDh = cached_attention(q, cache_k.astype(dtype), cache_v.astype(dtype), mask)
      else:  # the fused kernels (prefill on GPU) take [B, S, K, Dh]
        # A prefill writing slot 0 of a cache as long as itself (the sampler's) is causal by index; a
        # write at a traced slot may follow earlier tokens, whose order the index does not give.
        causal = isinstance(cache_index, int) and cache_index == 0 and q.shape[1] == cache_k.shape[3]
        out_BxLxHxDh = dot_product_attention(q, cache_k.transpose(0, 3, 1, 2).astype(dtype),
                                             cache_v.transpose(0, 2, 1, 3).astype(dtype), mask, impl, causal=causal)
    return project(self, "o_proj", "blhk,hkd->bld", out_BxLxHxDh, ctx), layer_cache


class MLP(nnx.Module):
  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), cfg)
    self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), cfg)
    self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), cfg)

  def __call__(self, x_BxLxD, ctx=None):
    gate_BxLxF = project(self, "gate_proj", "bld,df->blf", x_BxLxD, ctx)
    up_BxLxF = project(self, "up_proj", "bld,df->blf", x_BxLxD, ctx)
    h_BxLxF = shd.constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
    return project(self, "down_proj", "blf,fd->bld", h_BxLxF, ctx)


class Block(nnx.Module):
  """One decoder layer. Pre-norm (Llama, Qwen) or post-norm (OLMo)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.post_norm = cfg.post_norm
    self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, layer: LayerAttention, layer_cache=None, kv=None,
               ctx=None):
    edit = ctx.edit if ctx is not None else None
    # What this block writes to the residual stream, ablated (when asked) at the position it writes.
    write = (lambda c: c) if edit is None else (lambda c: edit.ablate(c, ctx.index + 1))  # noqa: E731
    if self.post_norm:
      a, layer_cache = self.attn(x_BxLxD, positions_BxL, segment_ids_BxL, layer, layer_cache, kv, ctx)
      h = x_BxLxD + write(self.attn_norm(a))
      out = h + write(self.mlp_norm(self.mlp(h, ctx)))
    else:
      a, layer_cache = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL, layer, layer_cache, kv,
                                 ctx)
      h = x_BxLxD + write(a)
      out = h + write(self.mlp(self.mlp_norm(h), ctx))
    return shd.constrain(out, ("batch", "length", "embed_act")), layer_cache


def matmul_precision(cfg: TransformerConfig):
  """`jax.default_matmul_precision` for the model's matmuls while they are traced (their backward
  inherits it); "default" changes nothing."""
  if cfg.matmul_precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(cfg.matmul_precision)


def _remat_policy(name: str):
  return {
      "full": None,  # save nothing: recompute the whole block
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


class Transformer(nnx.Module):
  """Token ids in, next-token logits out."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
    self.layers = _stacked_blocks(cfg, rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, cache=None, cache_index=None,
               dropout_key=None, edit: ResidualEdit | None = None):
    """Logits [B, L, V]; with `cache` (see `init_cache`), returns (logits, updated cache)."""
    out = self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, cache=cache, cache_index=cache_index,
                      dropout_key=dropout_key, edit=edit)
    if cache is None:
      return self.logits(out)
    return self.logits(out[0]), out[1]

  def residuals(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, capture: Sequence[int],
                edit: ResidualEdit | None = None):
    """The residual stream at positions `capture` (see `ResidualEdit`: 0 the embeddings, p the stream
    entering block p, n_layers after the last block), [len(capture), B, L, D] in the compute dtype."""
    bad = [p for p in capture if not 0 <= p <= self.cfg.n_layers]
    if bad or not capture:
      raise ValueError(f"capture: residual positions must be in [0, {self.cfg.n_layers}], got {list(capture)}")
    with matmul_precision(self.cfg):
      return self._hidden(tokens_BxL, positions_BxL, segment_ids_BxL, None, None, None, edit, tuple(capture))[1]

  def hidden(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, cache=None, cache_index=None,
             dropout_key=None, edit: ResidualEdit | None = None):
    """Final-normed hidden states [B, L, D] (and the updated cache when `cache` is given).

    Split from `logits` so that a loss can unembed a few positions at a time and
    the [B, L, V] logits of a large vocabulary never exist at once.

    `dropout_key` switches on the dropout of attached LoRA adapters (training only); `edit` steers or
    ablates a direction of the residual stream (`ResidualEdit`).

    With a cache the new tokens are written at slot `cache_index` (a scalar shared by
    all rows) and attend to every earlier slot of their own row and segment; slots
    whose segment id is 0 (padding, or not yet written) are never attended.
    """
    with matmul_precision(self.cfg):
      out, _ = self._hidden(tokens_BxL, positions_BxL, segment_ids_BxL, cache, cache_index, dropout_key, edit)
    return out

  def _hidden(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache, cache_index, dropout_key, edit=None,
              capture=()):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    # Without a cache, segment ids left None reach the layers: one segment, so the attention needs
    # no mask beyond causality (see `Attention`). The cache records every slot's segment.
    if segment_ids_BxL is None and cache is not None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)
    # Gather rows from the whole table (as FSDP gathers any weight before use): the
    # SPMD partitioner cannot gather from a vocab- or width-split table efficiently.
    table_VxD = shd.constrain(self.embed[...], (None, None))
    x = jnp.take(table_VxD, tokens_BxL, axis=0).astype(dtype)
    x = shd.constrain(x, ("batch", "length", "embed_act"))
    if edit is not None:
      if edit.steer_P.shape != (cfg.n_layers + 1,) or edit.ablate_P.shape != (cfg.n_layers + 1,) or \
          edit.direction_D.shape != (cfg.d_model,):
        raise ValueError(f"a residual edit for another model (direction {edit.direction_D.shape}, "
                         f"{edit.steer_P.shape[0]} positions): this one has d_model={cfg.d_model} and "
                         f"{cfg.n_layers + 1} residual positions")
      x = edit.ablate(x, 0)
    layers_attn = layer_attention(cfg)
    kv = None
    if cache is not None:
      kv_positions = write_cache(cache["positions"], positions_BxL, cache_index, axis=1)
      kv_segments = write_cache(cache["segment_ids"], segment_ids_BxL, cache_index, axis=1)
      kv = (kv_positions, kv_segments, cache_index)
      layer_caches = (cache["k"], cache["v"])
    else:
      layer_caches = None
    x, layer_caches, captured = self._apply_layers(x, positions_BxL, segment_ids_BxL, layers_attn, layer_caches, kv,
                                                   dropout_key, edit, capture)
    if edit is not None:
      x = edit.steer(x, cfg.n_layers)
    if cfg.n_layers in capture:
      captured[cfg.n_layers] = x
    captured = jnp.stack([captured[p] for p in capture]) if capture else None
    x = self.final_norm(x)
    if cache is None:
      return x, captured
    k, v = layer_caches
    return (x, {"k": k, "v": v, "positions": kv[0], "segment_ids": kv[1]}), captured

  def logits(self, hidden_BxLxD, out_dtype=None):
    """Next-token logits [B, L, V] from final-normed hidden states (see `hidden`).

    `out_dtype` float32: the product accumulated and returned in float32 even when the model computes
    in bf16 (what a divergence between two models' distributions needs; rounding the logits to bf16
    first moves each by up to 2^-8 of its size).
    """
    dtype = jnp.dtype(self.cfg.dtype)
    out_dtype = jnp.dtype(out_dtype or dtype)
    with matmul_precision(self.cfg):
      if self.cfg.tie_embeddings:
        logits = jnp.einsum("bld,vd->blv", hidden_BxLxD, self.embed[...].astype(dtype),
                            preferred_element_type=out_dtype)
      else:
        logits = jnp.matmul(hidden_BxLxD, self.lm_head[...].astype(dtype), preferred_element_type=out_dtype)
    return shd.constrain(logits.astype(out_dtype), ("batch", "length", "vocab"))

  def _apply_layers(self, x, positions, segment_ids, layers_attn, layer_caches, kv, dropout_key, edit=None,
                    capture=()):
    """The blocks in order; `layers_attn` (stacked `LayerAttention`) is scanned data like the weights,
    so that one compiled block serves sliding and full layers alike. Returns (x, caches, {position:
    the stream entering that block} for the positions in `capture` below n_layers)."""
    graphdef, stacked_state = nnx.split(self.layers)
    inner = [p for p in capture if p < self.cfg.n_layers]

    def layer(x, layer_state, layer_attn, layer_cache, index):
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
      if edit is not None:
        x = edit.steer(x, index)
      block = nnx.merge(graphdef, layer_state)
      y, c = block(x, positions, segment_ids, layer_attn, layer_cache, kv, LayerContext(index, key, edit))
      return y, (c, x)  # x: the stream entering this block, as steered

    if self.cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=_remat_policy(self.cfg.remat))
    if self.cfg.scan_layers:
      # Only the captured positions are carried ([len(inner), B, L, D]), never every layer's stream.
      def body(carry, xs):
        x, kept = carry
        y, (c, entering) = layer(x, *xs)
        index = xs[-1]
        kept = tuple(jnp.where(index == p, entering, k) for p, k in zip(inner, kept))
        return (y, kept), c
      kept0 = tuple(jnp.zeros_like(x) for _ in inner)
      (x, kept), caches = jax.lax.scan(body, (x, kept0), (stacked_state, layers_attn, layer_caches,
                                                           jnp.arange(self.cfg.n_layers)))
      return x, caches, dict(zip(inner, kept))
    new_caches, captured = [], {}
    for i in range(self.cfg.n_layers):
      take = lambda a: a[i]  # noqa: E731
      x, (c, entering) = layer(x, jax.tree.map(take, stacked_state), jax.tree.map(take, layers_attn),
                               None if layer_caches is None else jax.tree.map(take, layer_caches), i)
      if i in inner:
        captured[i] = entering
      new_caches.append(c)
    if layer_caches is None:
      return x, None, captured
    return x, jax.tree.map(lambda *cs: jnp.stack(cs), *new_caches), captured


def init_cache(cfg: TransformerConfig, batch_size: int, max_length: int, dtype=None) -> dict:
  """An empty KV cache: keys [n_layers, B, K, Dh, S], values [n_layers, B, K, S, Dh], plus slot
  positions/segments [B, S].

  The key/value layouts are the ones attention reads in place (see `cached_attention`);
  `CACHE_LOGICAL_AXES` names their axes. Segment id 0 marks a slot as empty, so nothing
  attends to it until it is written.
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  k, dh = cfg.n_kv_heads, cfg.resolved_head_dim
  return {"k": jnp.zeros((cfg.n_layers, batch_size, k, dh, max_length), dtype),
          "v": jnp.zeros((cfg.n_layers, batch_size, k, max_length, dh), dtype),
          "positions": jnp.zeros((batch_size, max_length), jnp.int32),
          "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32)}


CACHE_LOGICAL_AXES = {
    "k": ("layers", "batch", "kv_heads", "head_dim", "length"),
    "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "positions": ("batch", "length"),
    "segment_ids": ("batch", "length"),
}


def _stacked_blocks(cfg: TransformerConfig, rngs: nnx.Rngs) -> Block:
  """n_layers Blocks stored as one Block whose parameters have a leading `layers` axis."""
  blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
  for _, variable in nnx.to_flat_state(stacked):
    variable.set_metadata("logical_axes", ("layers",) + tuple(variable.get_metadata()["logical_axes"]))
  return nnx.merge(graphdef, stacked)


# ----------------------------------------------------------------------------- pure-pytree helpers


def param_logical_axes(model: Transformer) -> dict:
  """Nested dict (same structure as `params_of(model)`) of logical-axis tuples."""
  state = nnx.state(model, nnx.Param)
  axes = jax.tree.map(lambda v: tuple(v.get_metadata()["logical_axes"]), state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
  return _to_pure_dict(axes)


def split_model(model: Transformer):
  """The graph (static) and the parameters as a plain nested dict of arrays."""
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, _to_pure_dict(state)


def _to_pure_dict(state) -> dict:
  # flax >= 0.12 moved this from a State method to a function.
  return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def abstract_model(cfg: TransformerConfig) -> Transformer:
  """The model with `jax.ShapeDtypeStruct` leaves: nothing is allocated."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
