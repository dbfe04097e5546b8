"""Batched sampling with a KV cache: one jitted prefill, one jitted decode loop.

A batch of prompts is left-padded to a static *bucket* length P, so every
prompt ends at slot P-1 and one scalar cache index serves all rows:

    slot     0 ........ P-2 | P-1               | P ......... P-2+cap
    holds    pad, prompt[:-1] | last prompt token | generated tokens, fed back
    written  by prefill       | by decode step 0  | by decode steps 1, 2, ...

Padding slots carry segment id 0 and are never attended; positions restart at
0 at each row's first real token, so a row's output does not depend on the
rest of the batch (the model's cache path, see `transformer.Transformer`).

* `prefill` (jitted) runs the prompts minus their last token into a fresh
  cache, optionally in sub-batches (`prefill_chunk`), and repeats each
  prompt's cache rows `n` times (one prefill per prompt, not per sample).
* `decode` (jitted, cache donated) is one `lax.while_loop`: feed the current
  token, sample the next, stop when every row is done or `max_new_tokens` (a
  runtime value <= the static cap) is reached. Nothing returns to the host
  until the loop ends.

The weights are an argument of both functions, never closed over: new weights
of the same shapes (after a training step) reuse the compiled code. What does
recompile: a new prompt bucket, batch size, `n`, the static cap, or switching a
sampling rule on/off (greedy, top-k, top-p, min-p, banned tokens: `SamplingRules`), or
giving a residual edit or not; the *values* of temperature/top-k/top-p/min-p, the seed,
the stop ids (up to a padded count), the banned ids, `max_new_tokens` and an edit's
direction, alphas and layers are runtime inputs.

Residual edits (`transformer.residual_edit`): steering (add alpha * ||h|| * d at a layer) and
directional ablation (project d out of every write to the residual stream) apply in prefill
and decode alike. `capture` reads the residual stream of whole sequences (prompt and answer)
at chosen layers, pooled on the devices (the last prompt token, the mean over the answer, or
every answer token), in fixed-size batches that reuse one compiled function per length bucket.

Banned tokens (`SamplingParams.banned_token_ids`, e.g. the tokens of banned words,
`emjax.data.banned.word_token_ids`) are never emitted: their logits are -inf before
greedy / temperature / top-k / top-p / min-p, so `sampled_logprobs` are under the
distribution without them, while `logprobs` stay the model's own (what it would
have given the token unbanned).

Randomness is per row: the key of (prompt, sample j) at decode step t is
fold_in(fold_in(fold_in(PRNGKey(seed), prompt_seed), j), t), so a sample
does not depend on which other prompts share its batch.

Speed notes (measured on CPU; see benchmarks/sampler.py): layers are unrolled
and weights/cache are handed over per layer (`prepare_weights`; see the
comment above it), sampling reductions avoid XLA:CPU's slow variadic argmax
reduce, top-k / top-p read the largest logits through `lax.top_k` instead of sorting the vocabulary
(`truncate_logits`), random draws are inverse-CDF (one uniform per row, not V Gumbels), the KV cache
is laid out the way decode attention reads it (`transformer.cached_attention`), and on
CPU the decode loop keeps XLA's YNNPACK library for dots only (`decode_compiler_options`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emjax import sharding as shd
from emjax.models import lora as lora_lib
from emjax.models import transformer

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
CAPTURE_POOLS = ("last_prompt", "answer_mean", "answer_tokens", "all_mean")


def make_buckets(max_prompt_length: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from `smallest` up to (and ending with) `max_prompt_length`."""
  if max_prompt_length < 1:
    raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
  buckets, b = [], smallest
  while b < max_prompt_length:
    buckets.append(b)
    b *= 2
  return tuple(buckets) + (max_prompt_length,)


# ----------------------------------------------------------------------------- sampling rules


@dataclasses.dataclass(frozen=True)
class SamplingRules:
  """The static part of a sampling configuration: which filters exist in the compiled code."""

  greedy: bool = False
  top_k: bool = False
  top_p: bool = False
  min_p: bool = False
  banned: bool = False  # a [V] mask of banned tokens is an input (see `SamplingParams.banned_token_ids`)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. temperature 0 = greedy; top_k 0, top_p 1 and min_p 0 disable those filters.

  Filters apply in the order temperature -> top-k -> top-p -> min-p (as in HF
  `generate`); ties at a threshold are all kept.
  """

  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  n: int = 1
  seed: int = 0
  stop_token_ids: tuple[int, ...] = ()
  # Never emitted (logits -inf before every other rule); () leaves the compiled decode as it was.
  banned_token_ids: tuple[int, ...] = ()

  @property
  def rules(self) -> SamplingRules:
    banned = bool(self.banned_token_ids)
    if self.temperature == 0:
      return SamplingRules(greedy=True, banned=banned)
    return SamplingRules(top_k=self.top_k > 0, top_p=self.top_p < 1.0, min_p=self.min_p > 0.0, banned=banned)

  def banned_mask(self, vocab_size: int) -> np.ndarray:
    """[V] bool: True at the banned ids."""
    mask_V = np.zeros((vocab_size,), bool)
    mask_V[np.asarray(self.banned_token_ids, np.int64)] = True
    return mask_V

  def validate(self, vocab_size: int, max_new_tokens_cap: int) -> None:
    def bad(msg):
      raise ValueError(f"sampling: {msg}")

    if self.n < 1:
      bad(f"n (samples per prompt) must be >= 1, got {self.n}")
    if not 1 <= self.max_new_tokens <= max_new_tokens_cap:
      bad(f"max_new_tokens must be in [1, {max_new_tokens_cap}] (the sampler's max_new_tokens_cap), "
          f"got {self.max_new_tokens}")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      bad(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      bad(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      bad(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
    if not 0.0 <= self.min_p < 1.0:
      bad(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
    for t in self.stop_token_ids:
      if not 0 <= int(t) < vocab_size:
        bad(f"stop token id {t} is not in the model's vocabulary [0, {vocab_size})")
    for t in self.banned_token_ids:
      if not 0 <= int(t) < vocab_size:
        bad(f"banned token id {t} is not in the model's vocabulary [0, {vocab_size})")
    if len(set(map(int, self.banned_token_ids))) >= vocab_size:
      bad(f"every token of the vocabulary ({vocab_size}) is banned: nothing is left to sample")


# How many of the largest logits top-k / top-p look at first (`lax.top_k`) before falling back to
# a sort of the whole vocabulary; see `truncate_logits`.
DEFAULT_CANDIDATES = 256

# A step whose candidates carry less than top_p + this much probability sorts the whole vocabulary:
# the margin keeps the candidate path's verdict from hanging on the last bits of a sum whose order
# differs from the full sort's.
_MASS_MARGIN = 1e-5


def truncate_logits(scaled_BxV: jax.Array, top_k, top_p, min_p, rules: SamplingRules,
                    candidates: int | None = DEFAULT_CANDIDATES) -> jax.Array:
  """Sets logits outside the top-k / top-p / min-p support to -inf (temperature already applied).

  top-k and top-p need the logits in descending order, but only as far as their support reaches.
  With `candidates` = C < V they read the C largest (`lax.top_k`) instead of sorting all V, which
  gives the same support whenever it lies within those C: top-k with k <= C, and top-p (after
  top-k, if any) when the C candidates carry at least top_p of the probability (p over the whole
  vocabulary, or over the top k). Otherwise, for the rows of that decode step that need it (the
  sort runs under `lax.cond` on the runtime values; each row keeps the path it needs), the whole
  vocabulary is sorted, so the result does not depend on C (up to the float rounding of top-p's
  normaliser, summed in another order, at a token whose mass lands exactly on top_p) nor on the
  other rows: C only decides how often the slow path is taken. None (or C >= V) always sorts.
  """
  x_BxV = scaled_BxV
  vocab = x_BxV.shape[-1]
  if rules.top_k or rules.top_p:
    c = vocab if candidates is None else max(1, min(int(candidates), vocab))
    full = lambda x: _top_k_top_p(x, -jnp.sort(-x, axis=-1), None, top_k, top_p, rules)  # noqa: E731
    if c == vocab:
      x_BxV = full(x_BxV)
    else:
      cand_BxC, _ = jax.lax.top_k(x_BxV, c)
      sum_Bx1 = None
      if rules.top_k:
        # top-p after top-k renormalises over top-k's support, which lies within the candidates.
        need_full_B = jnp.broadcast_to(top_k > c, x_BxV.shape[:1])
      else:
        # p of the candidates over the whole vocabulary: softmax's own max-shift and normaliser,
        # so the probabilities equal the full sort's. The max as a reduction, not as the slice
        # cand[:, :1]: XLA:CPU turns a top_k whose output is sliced twice back into a full sort.
        max_Bx1 = jnp.max(cand_BxC, axis=-1, keepdims=True)
        sum_Bx1 = jnp.sum(jnp.exp(x_BxV - max_Bx1), axis=-1, keepdims=True)
        cand_mass_B = jnp.sum(jnp.exp(cand_BxC - max_Bx1), axis=-1) / sum_Bx1[:, 0]
        need_full_B = cand_mass_B < top_p + _MASS_MARGIN
      fast = lambda x: _top_k_top_p(x, cand_BxC, sum_Bx1, top_k, top_p, rules)  # noqa: E731
      # A row takes the full sort only where it needs it, so what it draws never depends on the
      # other rows of the batch (their rounding would differ at a token whose mass lands on top_p).
      both = lambda x: jnp.where(need_full_B[:, None], full(x), fast(x))  # noqa: E731
      x_BxV = jax.lax.cond(jnp.any(need_full_B), both, fast, x_BxV)
  if rules.min_p:
    # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p): no softmax needed.
    max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
    x_BxV = jnp.where(x_BxV < max_Bx1 + jnp.log(min_p), -jnp.inf, x_BxV)
  return x_BxV


def _top_k_top_p(x_BxV, sorted_BxC, sum_Bx1, top_k, top_p, rules: SamplingRules):
  """top-k then top-p given the C largest logits in descending order (C = V: all of them).

  `sum_Bx1`: sum over the whole vocabulary of exp(x - max), the softmax normaliser of top-p
  without top-k when the C candidates are not the whole vocabulary (None: sum the candidates).
  """
  neg_inf = jnp.asarray(-jnp.inf, x_BxV.dtype)
  vocab, c = x_BxV.shape[-1], sorted_BxC.shape[-1]
  if rules.top_k:
    k = jnp.clip(top_k, 1, vocab)
    kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxC, jnp.minimum(k, c) - 1, 1, axis=1)
    x_BxV = jnp.where(x_BxV < kth_Bx1, neg_inf, x_BxV)
    sorted_BxC = jnp.where(jnp.arange(c) < k, sorted_BxC, neg_inf)
  if rules.top_p:
    if rules.top_k or sum_Bx1 is None:
      probs_BxC = jax.nn.softmax(sorted_BxC, axis=-1)
    else:
      probs_BxC = jnp.exp(sorted_BxC - jnp.max(sorted_BxC, axis=-1, keepdims=True)) / sum_Bx1
    mass_before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
    # Keep the smallest prefix whose mass reaches top_p (the first token always).
    keep_BxC = mass_before_BxC < top_p
    threshold_Bx1 = jnp.min(jnp.where(keep_BxC, sorted_BxC, jnp.inf), axis=-1, keepdims=True)
    x_BxV = jnp.where(x_BxV < threshold_Bx1, neg_inf, x_BxV)
  return x_BxV


def _categorical(key, logits_V):
  """Inverse-CDF draw: one uniform per row instead of V Gumbel variates (threefry is costly on CPU)."""
  cdf_V = jnp.cumsum(jax.nn.softmax(logits_V))
  u = 1.0 - jax.random.uniform(key, (), jnp.float32)  # (0, 1]: never selects a zero-probability token
  index = jnp.sum(cdf_V < u * cdf_V[-1])
  return jnp.minimum(index, logits_V.shape[-1] - 1).astype(jnp.int32)


def sample_logits(logits_BxV, keys_Bx2, knobs: Mapping[str, jax.Array], rules: SamplingRules,
                  candidates: int | None = DEFAULT_CANDIDATES):
  """(token_B, raw_logprob_B, sampled_logprob_B, raw_lse_B) for one step.

  raw = the model's distribution (temperature 1, untruncated); sampled = the
  distribution actually drawn from (0 under greedy: a point mass). `candidates`: see
  `truncate_logits` (the tokens drawn do not depend on it). With `rules.banned`,
  `knobs["banned"]` [V] bool marks tokens that are never drawn.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  max_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
  raw_lse_B = max_Bx1[:, 0] + jnp.log(jnp.sum(jnp.exp(logits_BxV - max_Bx1), axis=-1))
  # The raw log-probs stay the model's; only what is drawn from loses the banned tokens.
  allowed_BxV = logits_BxV
  if rules.banned:
    allowed_BxV = jnp.where(knobs["banned"][None, :], -jnp.inf, logits_BxV)
  if rules.greedy:
    # argmax as max + first index reaching it: two plain reductions (sharing the max with the
    # log-sum-exp) instead of XLA:CPU's slow variadic (value, index) reduce.
    top_Bx1 = jnp.max(allowed_BxV, axis=-1, keepdims=True) if rules.banned else max_Bx1
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_BxV.shape, 1)
    token_B = jnp.min(jnp.where(allowed_BxV == top_Bx1, vocab_ids, logits_BxV.shape[-1]), axis=-1)
    sampled_lp_B = jnp.zeros(token_B.shape, jnp.float32)
  else:
    scaled_BxV = truncate_logits(allowed_BxV / knobs["temperature"], knobs["top_k"], knobs["top_p"],
                                 knobs["min_p"], rules, candidates)
    token_B = jax.vmap(_categorical)(keys_Bx2, scaled_BxV)
    picked_B = jnp.take_along_axis(scaled_BxV, token_B[:, None], axis=-1)[:, 0]
    sampled_lp_B = picked_B - jax.nn.logsumexp(scaled_BxV, axis=-1)
  raw_lp_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0] - raw_lse_B
  return token_B, raw_lp_B, sampled_lp_B, raw_lse_B


# ----------------------------------------------------------------------------- outputs


@dataclasses.dataclass
class SampleOutput:
  """Host arrays for Np prompts x n samples x T = max_new_tokens steps.

  `tokens` include the stop token when a row finished on one ('stop'); slots
  after `lengths` are 0. `logprobs` are under the raw model distribution,
  `sampled_logprobs` under the distribution sampled from. `top_ids` /
  `top_logprobs` (raw log-probabilities, descending) exist when the sampler
  was built with `top_logprobs` > 0.
  """

  tokens: np.ndarray  # [Np, n, T] int32
  lengths: np.ndarray  # [Np, n] int32
  finish_reasons: np.ndarray  # [Np, n] str: 'stop' | 'length'
  logprobs: np.ndarray  # [Np, n, T] float32
  sampled_logprobs: np.ndarray  # [Np, n, T] float32
  prompt_lengths: np.ndarray  # [Np]
  top_ids: np.ndarray | None = None  # [Np, n, T, k]
  top_logprobs: np.ndarray | None = None  # [Np, n, T, k]

  def sample(self, i: int, j: int = 0) -> dict[str, Any]:
    """Sample j of prompt i, trimmed to its length, as plain Python values."""
    n = int(self.lengths[i, j])
    out = {"tokens": self.tokens[i, j, :n].tolist(), "logprobs": self.logprobs[i, j, :n].tolist(),
           "sampled_logprobs": self.sampled_logprobs[i, j, :n].tolist(),
           "finish_reason": str(self.finish_reasons[i, j])}
    if self.top_ids is not None:
      out["top_ids"] = self.top_ids[i, j, :n].tolist()
      out["top_logprobs"] = self.top_logprobs[i, j, :n].tolist()
    return out


# ----------------------------------------------------------------------------- the sampler


class Sampler:
  """Compiled prefill + decode for one model architecture; weights are passed to every call.

  Args:
    model_cfg: the architecture (the weights' shapes must match it).
    mesh: the device mesh (batch over data/fsdp, KV heads over tensor); None = default device.
    prompt_buckets: static prompt lengths; a prompt is left-padded to the smallest bucket that
      holds it. The largest bucket is the longest prompt accepted.
    max_new_tokens_cap: static size of the output buffers; `max_new_tokens` may be anything up to it
      without recompiling. The cache holds bucket - 1 + cap slots.
    prefill_chunk: prefill in sub-batches of this many prompts (0 = the whole batch at once), to
      bound prefill activation memory for large batches of long prompts.
    top_logprobs: also return the k most likely tokens and their raw log-probs at each step (0 = off).
    unroll_layers: decode with the layers unrolled instead of `lax.scan`ned (same weights; less
      per-step loop overhead, longer compile).
    cache_dtype: KV cache dtype (default: the model's compute dtype).
    lora: sample a LoRA model with its adapters applied (not merged): the weights passed are
      the base and the adapters as one tree (`lora.merge_trees(frozen, adapters)`), so a student
      whose adapters change every step is sampled without merging or recompiling.
    sort_candidates: top-k / top-p first look at this many largest logits (`lax.top_k`) and sort
      the whole vocabulary only at a step where their support does not fit in them (top_k above
      it, or a top-p nucleus wider than it); the samples are the same for any value (see
      `truncate_logits`), it only sets how often a step takes the slow path. 0 = always sort.
  """

  def __init__(self, model_cfg: transformer.TransformerConfig, *, mesh: Mesh | None = None,
               prompt_buckets: Sequence[int] = DEFAULT_BUCKETS, max_new_tokens_cap: int = 256,
               prefill_chunk: int = 0, top_logprobs: int = 0, unroll_layers: bool = True,
               cache_dtype: Any = None, sort_candidates: int = DEFAULT_CANDIDATES,
               lora: lora_lib.LoRAConfig | None = None):
    buckets = tuple(sorted({int(b) for b in prompt_buckets}))
    if not buckets or buckets[0] < 1:
      raise ValueError(f"prompt_buckets must be positive lengths, got {tuple(prompt_buckets)}")
    if max_new_tokens_cap < 1:
      raise ValueError(f"max_new_tokens_cap must be >= 1, got {max_new_tokens_cap}")
    if prefill_chunk < 0:
      raise ValueError(f"prefill_chunk must be >= 0 (0 = no chunking), got {prefill_chunk}")
    if not 0 <= top_logprobs <= model_cfg.vocab_size:
      raise ValueError(f"top_logprobs must be in [0, vocab_size={model_cfg.vocab_size}], got {top_logprobs}")
    if sort_candidates < 0:
      raise ValueError(f"sort_candidates must be >= 0 (0 = always sort the vocabulary), got {sort_candidates}")
    self.sort_candidates = int(sort_candidates) or None
    self.unroll_layers = bool(unroll_layers)
    self.model_cfg = dataclasses.replace(model_cfg, scan_layers=not unroll_layers, remat="none")
    self.mesh = mesh if mesh is not None and mesh.size > 1 else None
    self.data_parallel = shd.data_parallel_size(self.mesh) if self.mesh is not None else 1
    if prefill_chunk and prefill_chunk % self.data_parallel:
      raise ValueError(f"prefill_chunk={prefill_chunk} must be a multiple of the data-parallel size "
                       f"(mesh.data*mesh.fsdp={self.data_parallel})")
    self.buckets = buckets
    self.max_new_tokens_cap = int(max_new_tokens_cap)
    self.prefill_chunk = int(prefill_chunk)
    self.top_logprobs = int(top_logprobs)
    self.cache_dtype = jnp.dtype(cache_dtype or self.model_cfg.dtype)
    self.lora = lora
    self.graphdef, _ = transformer.split_model(lora_lib.abstract_model(self.model_cfg, lora))
    # One query per row: fused attention kernels (cuDNN) bring nothing, the einsum path is the one
    # to tune. Same parameters, so the same weights feed both graphs.
    decode_cfg = dataclasses.replace(self.model_cfg, attention="xla")
    self.decode_graphdef, _ = transformer.split_model(lora_lib.abstract_model(decode_cfg, lora))
    self._param_axes = transformer.param_logical_axes(lora_lib.abstract_model(self.model_cfg, lora))
    # Incremented inside the traced functions, so they count traces (= compilations).
    self.trace_counts: collections.Counter = collections.Counter()
    self.unstack_fn = jax.jit(self._unstack_weights)
    self.prefill_fn = jax.jit(self._prefill, static_argnames=("n",))
    self.decode_fn = jax.jit(self._decode, static_argnames=("rules",), donate_argnames=("cache",),
                             compiler_options=decode_compiler_options(self.mesh))
    self.capture_fn = jax.jit(self._capture, static_argnames=("positions", "pool"))

  # --------------------------------------------------------------------------- weights and cache layout
  #
  # With unrolled layers the compiled functions take the layer weights as a list (one dict per
  # layer) and carry the KV cache as per-layer lists, and restack both inside the innermost traced
  # body just before the model (which slices layer i out of stacked arrays) sees them: XLA then
  # folds slice(stack(...)) away. Handing it stacked arrays instead makes it copy every layer's
  # weights (and cache) out of the stack at every decode step, which on CPU costs more than the
  # matmuls themselves.

  def shard_params(self, params: dict) -> dict:
    """Puts a (stacked) params tree on the mesh with the training layout (no-op without a mesh)."""
    if self.mesh is None:
      return params
    shardings = shd.tree_shardings(lora_lib.select_like(self._param_axes, params), params, self.mesh)
    return jax.device_put(params, shardings)

  def prepare_weights(self, params: dict) -> dict:
    """`params` (stacked, as trained) in the layout the compiled functions take.

    Unrolled: a copy with `layers` split into a list of per-layer dicts (one weight copy; do it
    once per set of weights when sampling repeatedly). Scanned: `params` itself.
    """
    if not self.unroll_layers or isinstance(params["layers"], (list, tuple)):
      return params
    return self.unstack_fn(params)

  def _unstack_weights(self, params: dict) -> dict:
    self.trace_counts["unstack"] += 1
    layers = []
    # `params` may be a part of the model's tree (e.g. a LoRA student's adapters alone).
    layer_axes = lora_lib.select_like(self._param_axes["layers"], params["layers"])
    with shd.activation_sharding(self.mesh):
      for i in range(self.model_cfg.n_layers):
        layer = jax.tree.map(lambda a: a[i], params["layers"])  # noqa: B023
        # Each layer keeps its stacked layout minus the `layers` axis (a prefix tree of axes).
        layer = jax.tree.map(lambda x, axes: shd.constrain(x, axes[1:]), layer, layer_axes)
        layers.append(layer)
    return dict(params, layers=layers)

  def _model(self, weights: dict, graphdef=None):
    """The model over `weights`; call inside the innermost traced body (see above)."""
    if self.unroll_layers:
      weights = dict(weights, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *weights["layers"]))
    return nnx.merge(self.graphdef if graphdef is None else graphdef, weights)

  def _stack_cache(self, cache: dict) -> dict:
    if not self.unroll_layers:
      return cache
    return dict(cache, k=jnp.stack(cache["k"]), v=jnp.stack(cache["v"]))

  def _unstack_cache(self, cache: dict) -> dict:
    if not self.unroll_layers:
      return cache
    n = self.model_cfg.n_layers
    return dict(cache, k=[cache["k"][i] for i in range(n)], v=[cache["v"][i] for i in range(n)])

  def _put_batch(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, shd.batch_sharding(self.mesh, x.ndim))

  def _put_replicated(self, x) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(np.asarray(x), shd.replicated(self.mesh))

  def _constrain_cache(self, cache: dict) -> dict:
    if self.mesh is None:
      return cache
    out = {}
    for name, value in cache.items():
      axes = transformer.CACHE_LOGICAL_AXES[name]
      if isinstance(value, (list, tuple)):  # per-layer list: drop the `layers` axis
        out[name] = [shd.constrain(x, axes[1:]) for x in value]
      else:
        out[name] = shd.constrain(value, axes)
    return out

  def cache_length(self, bucket: int) -> int:
    return bucket - 1 + self.max_new_tokens_cap

  def bucket_for(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise ValueError(f"a prompt of {length} tokens is longer than the cache allows: the largest prompt "
                     f"bucket (max prompt length) is {self.buckets[-1]}")

  # --------------------------------------------------------------------------- jitted functions

  def _prefill(self, weights, tokens_BpxP, lengths_Bp, edit=None, *, n: int):
    """Cache for Bp*n rows (prompt-major) holding each prompt except its last token."""
    self.trace_counts["prefill"] += 1
    cfg = self.model_cfg
    num_prompts, bucket = tokens_BpxP.shape
    rows, cache_len, lp = num_prompts * n, self.cache_length(bucket), bucket - 1
    slots_P = jnp.arange(bucket, dtype=jnp.int32)
    pad_Bp = bucket - lengths_Bp
    positions_BpxP = jnp.maximum(slots_P[None] - pad_Bp[:, None], 0)
    segments_BpxP = (slots_P[None] >= pad_Bp[:, None]).astype(jnp.int32)
    with shd.activation_sharding(self.mesh):
      if lp == 0:  # bucket 1: nothing to prefill, the single token is fed by decode
        cache = transformer.init_cache(cfg, rows, cache_len, self.cache_dtype)
        return self._constrain_cache(self._unstack_cache(cache))

      def run(tok, pos, seg):
        small = transformer.init_cache(cfg, tok.shape[0], lp, self.cache_dtype)
        _, small = self._model(weights)(tok, pos, seg, cache=small, cache_index=0, edit=edit)  # logits: dropped
        return small["k"], small["v"]

      inputs = (tokens_BpxP[:, :lp], positions_BpxP[:, :lp], segments_BpxP[:, :lp])
      chunk = self.prefill_chunk
      if not chunk or chunk >= num_prompts:
        k, v = run(*inputs)
      else:
        # Chunk i takes rows {d*Bp/dp + i*c/dp + r}: every chunk spans all data shards, so each
        # device prefills its own rows and nothing moves between devices.
        dp, num_chunks = self.data_parallel, num_prompts // chunk

        def to_chunks(x_BpxL):
          x = x_BpxL.reshape(dp, num_chunks, chunk // dp, lp).transpose(1, 0, 2, 3)
          return x.reshape(num_chunks, chunk, lp)

        k_c, v_c = jax.lax.map(lambda xs: run(*xs), tuple(to_chunks(x) for x in inputs))

        def from_chunks(c_NxLyrxCx___):  # chunk-major rows back to the batch order
          rest = c_NxLyrxCx___.shape[3:]
          x = c_NxLyrxCx___.reshape(num_chunks, cfg.n_layers, dp, chunk // dp, *rest)
          x = x.transpose(1, 2, 0, 3, *range(4, x.ndim))
          return x.reshape(cfg.n_layers, num_prompts, *rest)

        k, v = from_chunks(k_c), from_chunks(v_c)

      # One prefill per prompt; its n samples share a copy of its cache rows. The decode slots
      # after the prompt start empty (segment id 0).
      def widen(x_BpxLx___, axis):
        x = jnp.repeat(x_BpxLx___, n, axis=0) if n > 1 else x_BpxLx___
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, cache_len - lp)
        return jnp.pad(x, pad)

      def per_layer(x_LyrxBpx___, name):
        axis = transformer.CACHE_LOGICAL_AXES[name].index("length") - 1  # without the layers axis
        return [widen(x_LyrxBpx___[i].astype(self.cache_dtype), axis) for i in range(cfg.n_layers)]

      cache_k, cache_v = per_layer(k, "k"), per_layer(v, "v")
      if not self.unroll_layers:
        cache_k, cache_v = jnp.stack(cache_k), jnp.stack(cache_v)
      cache = {"k": cache_k, "v": cache_v, "positions": widen(positions_BpxP[:, :lp], 1),
               "segment_ids": widen(segments_BpxP[:, :lp], 1)}
      return self._constrain_cache(cache)

  def _decode(self, weights, cache, last_tokens_B, prompt_lengths_B, active_B, prompt_seeds_B, sample_ids_B,
              stop_ids_S, knobs, limits_B, edit=None, *, rules: SamplingRules):
    """The decode loop (row r stops at `limits_B[r]` new tokens at most); returns (outputs dict, cache)."""
    self.trace_counts["decode"] += 1
    fold = jax.vmap(jax.random.fold_in, (0, 0))
    base_key = jax.random.PRNGKey(knobs["seed"])
    row_keys_Bx2 = fold(fold(jnp.broadcast_to(base_key, (*prompt_seeds_B.shape, *base_key.shape)),
                             prompt_seeds_B), sample_ids_B)
    rows, cache_len = cache["positions"].shape
    cap, k_top = self.max_new_tokens_cap, self.top_logprobs
    first_slot = cache_len - cap  # = bucket - 1: the slot of the last prompt token
    max_new = knobs["max_new_tokens"]
    batch = lambda x: shd.constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
    with shd.activation_sharding(self.mesh):
      ones_Bx1 = jnp.ones((rows, 1), jnp.int32)
      outputs = {"tokens": jnp.zeros((rows, cap), jnp.int32),
                 "logprobs": jnp.zeros((rows, cap), jnp.float32),
                 "sampled_logprobs": jnp.zeros((rows, cap), jnp.float32)}
      if k_top:
        outputs["top_ids"] = jnp.zeros((rows, cap, k_top), jnp.int32)
        outputs["top_logprobs"] = jnp.zeros((rows, cap, k_top), jnp.float32)
      outputs = jax.tree.map(batch, outputs)
      done_B = ~active_B
      carry = dict(step=jnp.zeros((), jnp.int32), token=last_tokens_B, done=done_B,
                   stopped=jnp.zeros_like(done_B), length=jnp.zeros((rows,), jnp.int32),
                   outputs=outputs, cache=cache)

      def cond(c):
        return (c["step"] < max_new) & ~jnp.all(c["done"])

      def body(c):
        step = c["step"]
        positions_Bx1 = (prompt_lengths_B - 1 + step)[:, None]
        model = self._model(weights, self.decode_graphdef)
        logits_Bx1xV, cache = model(c["token"][:, None], positions_Bx1, ones_Bx1,
                                    cache=self._stack_cache(c["cache"]), cache_index=first_slot + step, edit=edit)
        cache = self._unstack_cache(cache)
        logits_BxV = logits_Bx1xV[:, 0].astype(jnp.float32)
        keys_Bx2 = jax.vmap(jax.random.fold_in, (0, None))(row_keys_Bx2, step)
        token_B, raw_lp_B, sampled_lp_B, lse_B = sample_logits(logits_BxV, keys_Bx2, knobs, rules,
                                                               self.sort_candidates)
        live_B = ~c["done"]
        token_B = jnp.where(live_B, token_B, 0)
        out = dict(c["outputs"])
        write = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, step, axis=1)  # noqa: E731
        out["tokens"] = write(out["tokens"], token_B)
        out["logprobs"] = write(out["logprobs"], jnp.where(live_B, raw_lp_B, 0.0))
        out["sampled_logprobs"] = write(out["sampled_logprobs"], jnp.where(live_B, sampled_lp_B, 0.0))
        if k_top:
          top_vals_BxK, top_ids_BxK = jax.lax.top_k(logits_BxV, k_top)
          out["top_ids"] = write(out["top_ids"], top_ids_BxK)
          out["top_logprobs"] = write(out["top_logprobs"], top_vals_BxK - lse_B[:, None])
        hit_stop_B = live_B & jnp.any(token_B[:, None] == stop_ids_S[None, :], axis=-1)
        done_B = c["done"] | hit_stop_B | (step + 1 >= jnp.minimum(limits_B, max_new))
        return dict(step=step + 1, token=token_B, done=done_B, stopped=c["stopped"] | hit_stop_B,
                    length=jnp.where(live_B, step + 1, c["length"]),
                    outputs=jax.tree.map(batch, out), cache=self._constrain_cache(cache))

      final = jax.lax.while_loop(cond, body, carry)
    outputs = dict(final["outputs"], lengths=final["length"], stopped=final["stopped"])
    return outputs, final["cache"]

  def _capture(self, weights, tokens_BxL, prompt_lengths_B, lengths_B, edit=None, *, positions: tuple[int, ...],
               pool: str):
    """Residuals at `positions` of right-padded whole sequences, pooled per row: [B, C, D] float32
    (pool 'last_prompt', 'answer_mean' or 'all_mean') or [B, C, L, D] ('answer_tokens')."""
    self.trace_counts["capture"] += 1
    slots_L = jnp.arange(tokens_BxL.shape[1], dtype=jnp.int32)
    real_BxL = slots_L[None] < lengths_B[:, None]
    positions_BxL = jnp.where(real_BxL, slots_L[None], 0)
    with shd.activation_sharding(self.mesh):
      res_CxBxLxD = self._model(weights).residuals(tokens_BxL, positions_BxL, real_BxL.astype(jnp.int32),
                                                   capture=positions, edit=edit).astype(jnp.float32)
      if pool == "last_prompt":
        take_B = jnp.clip(prompt_lengths_B - 1, 0, None)
        out = jnp.take_along_axis(res_CxBxLxD, take_B[None, :, None, None], axis=2)[:, :, 0]
        return out.transpose(1, 0, 2)
      answer_BxL = real_BxL & (slots_L[None] >= prompt_lengths_B[:, None])
      if pool in ("answer_mean", "all_mean"):
        w_BxL = (answer_BxL if pool == "answer_mean" else real_BxL).astype(jnp.float32)
        total = jnp.einsum("cbld,bl->bcd", res_CxBxLxD, w_BxL)
        return total / jnp.maximum(w_BxL.sum(axis=1), 1.0)[:, None, None]
      return jnp.where(answer_BxL[None, :, :, None], res_CxBxLxD, 0.0).transpose(1, 0, 2, 3)

  # --------------------------------------------------------------------------- host API

  def capture(self, params: dict, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], *,
              positions: Sequence[int], pool: str = "answer_mean", batch_size: int = 8,
              edit: transformer.ResidualEdit | None = None) -> list[np.ndarray]:
    """The residual stream of each sequence (its prompt's tokens then its answer's) at residual
    `positions` (`transformer.ResidualEdit`: 0 the embeddings, p the stream entering block p), one
    array per sequence in the input order: [C, D] for pool 'last_prompt' (the prompt's last token,
    whose residual the answer's first token is read from) or 'answer_mean' (the mean over the
    answer's tokens) or 'all_mean' (the mean over every token, prompt and answer: the paper authors'
    pooling), [A, C, D] for 'answer_tokens' (each of its A answer tokens). Float32.

    Batches are right-padded to `batch_size` rows and a length bucket (powers of two up to the
    sampler's longest prompt bucket plus its output cap), so one compiled function serves every batch
    of a bucket. `edit`: the activations under steering or ablation.
    """
    if pool not in CAPTURE_POOLS:
      raise ValueError(f"pool: one of {CAPTURE_POOLS}, got {pool!r}")
    positions = tuple(int(p) for p in positions)
    if len(sequences) != len(prompt_lengths):
      raise ValueError(f"{len(sequences)} sequences but {len(prompt_lengths)} prompt lengths")
    longest = self.buckets[-1] + self.max_new_tokens_cap
    buckets = make_buckets(longest)
    rows = -(-max(int(batch_size), 1) // self.data_parallel) * self.data_parallel
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
      if not 1 <= int(p) <= len(seq):
        raise ValueError(f"sequence {i}: prompt length {p} is outside [1, {len(seq)}] (its length)")
      if pool in ("answer_mean", "answer_tokens") and int(p) == len(seq):
        raise ValueError(f"sequence {i}: pool={pool!r} needs answer tokens after its prompt, it has none")
      if len(seq) > longest:
        raise ValueError(f"sequence {i} has {len(seq)} tokens, more than this sampler holds ({longest}: its "
                         "longest prompt bucket plus max_new_tokens_cap)")
    if edit is not None:
      edit = transformer.ResidualEdit(*(self._put_replicated(np.asarray(x, np.float32)) for x in edit))
    weights = self.prepare_weights(params)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a bucket
    out: list[np.ndarray | None] = [None] * len(sequences)
    for start in range(0, len(order), rows):
      idx = order[start:start + rows]
      length = next(b for b in buckets if b >= max(len(sequences[i]) for i in idx))
      tokens_BxL = np.zeros((rows, length), np.int32)
      prompt_B, total_B = np.ones((rows,), np.int32), np.ones((rows,), np.int32)
      for r, i in enumerate(idx):
        tokens_BxL[r, :len(sequences[i])] = sequences[i]
        prompt_B[r], total_B[r] = int(prompt_lengths[i]), len(sequences[i])
      got = jax.device_get(self.capture_fn(weights, self._put_batch(tokens_BxL), self._put_batch(prompt_B),
                                           self._put_batch(total_B), edit, positions=positions, pool=pool))
      for r, i in enumerate(idx):
        if pool == "answer_tokens":
          out[i] = np.asarray(got[r][:, prompt_B[r]:total_B[r]]).transpose(1, 0, 2)
        else:
          out[i] = np.asarray(got[r])
    return out  # type: ignore[return-value]

  def sample_on_device(self, weights: dict, tokens_BpxP, lengths_Bp, seeds_Bp, sampling: SamplingParams, *,
                       active_Bp=None, edit: transformer.ResidualEdit | None = None,
                       limits_Bp=None) -> dict[str, jax.Array]:
    """Prefill + decode of already left-padded prompts; the outputs stay on the devices.

    `tokens_BpxP` [Bp, P] with P one of the prompt buckets, `lengths_Bp` the prompts' lengths,
    `seeds_Bp` their random streams, `weights` from `prepare_weights`. Rows are prompt-major
    (Bp * n). Returns `tokens`, `logprobs`, `sampled_logprobs` [rows, cap], `lengths`,
    `stopped` [rows] (and `top_ids` / `top_logprobs` when asked for) as global arrays sharded
    over the batch: what an on-policy batch is built from without a trip through the host.
    Every process passes the same (global) prompts. `edit` steers or ablates a direction of the
    residual stream in prefill and decode alike (`transformer.residual_edit`; its values are runtime
    inputs: a new alpha, direction or layer reuses the compiled code). `limits_Bp`: each prompt's own
    most new tokens (at most `sampling.max_new_tokens`; None = that for every prompt).
    """
    n = sampling.n
    tokens_BpxP, lengths_Bp = np.asarray(tokens_BpxP, np.int32), np.asarray(lengths_Bp, np.int32)
    num_prompts = tokens_BpxP.shape[0]
    if active_Bp is None:
      active_Bp = np.ones((num_prompts,), bool)
    if limits_Bp is None:
      limits_Bp = np.full((num_prompts,), sampling.max_new_tokens, np.int32)
    stop_ids_S, knobs = decode_inputs(sampling, self.model_cfg.vocab_size)
    per_row = lambda x_Bp: self._put_batch(np.repeat(x_Bp, n))  # noqa: E731  (prompt-major rows)
    if edit is not None:
      if edit.steer_P.shape != (self.model_cfg.n_layers + 1,) or edit.direction_D.shape != (self.model_cfg.d_model,):
        raise ValueError(f"edit: made for another model (direction {edit.direction_D.shape}, positions "
                         f"{edit.steer_P.shape}); this one has d_model={self.model_cfg.d_model} and "
                         f"{self.model_cfg.n_layers + 1} residual positions")
      edit = transformer.ResidualEdit(*(self._put_replicated(np.asarray(x, np.float32)) for x in edit))
    cache = self.prefill_fn(weights, self._put_batch(tokens_BpxP), self._put_batch(lengths_Bp), edit, n=n)
    outputs, _ = self.decode_fn(
        weights, cache, per_row(tokens_BpxP[:, -1]), per_row(lengths_Bp), per_row(np.asarray(active_Bp)),
        per_row(np.asarray(seeds_Bp, np.uint32)),
        self._put_batch(np.tile(np.arange(n, dtype=np.uint32), num_prompts)), self._put_replicated(stop_ids_S),
        {k: self._put_replicated(v) for k, v in knobs.items()}, per_row(np.asarray(limits_Bp, np.int32)), edit,
        rules=sampling.rules)
    return outputs

  def check_inputs(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                   prompt_seeds: Sequence[int] | None) -> list[list[int]]:
    """The prompts as lists of ints, after refusing what no batch can sample (empty prompts, ids
    outside the vocabulary, prompts longer than the largest bucket, bad sampling settings)."""
    sampling.validate(self.model_cfg.vocab_size, self.max_new_tokens_cap)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
      raise ValueError("generate: no prompts given")
    vocab = self.model_cfg.vocab_size
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (e.g. BOS)")
      bad = [t for t in p if not 0 <= t < vocab]
      if bad:
        raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
      self.bucket_for(len(p))
    if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
      raise ValueError(f"prompt_seeds has {len(prompt_seeds)} entries for {len(prompts)} prompts")
    return prompts

  def generate(self, params: dict, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
               *, prompt_seeds: Sequence[int] | None = None, pad_batch_to: int = 0,
               edit: transformer.ResidualEdit | None = None, max_new_tokens_per_prompt: Sequence[int] | None = None,
               **overrides) -> SampleOutput:
    """Samples `sampling.n` continuations of each prompt (lists of token ids) with `params`.

    All prompts go in one batch, left-padded to the bucket of the longest. `prompt_seeds`
    (default: the prompt's index) key each prompt's random stream; give stable ones (e.g. a hash of
    a prompt id) to get the same samples whatever the batching. `pad_batch_to` pads the batch with
    dummy prompts to a fixed size so that smaller batches reuse the compiled code. Keyword
    `overrides` replace fields of `sampling` (e.g. `temperature=0.0`). `edit`: steering or
    directional ablation (`sample_on_device`). `max_new_tokens_per_prompt`: each prompt's own limit
    (at most `sampling.max_new_tokens`, the outputs' width).

    `params` may be the trained (stacked) tree, re-laid out on every call, or the result of
    `prepare_weights(params)`, which saves that copy when sampling repeatedly with the same weights.
    """
    sampling = dataclasses.replace(sampling or SamplingParams(), **overrides)
    prompts = self.check_inputs(prompts, sampling, prompt_seeds)
    num_real, n = len(prompts), sampling.n
    bucket = self.bucket_for(max(len(p) for p in prompts))

    # Batch size: at least pad_batch_to, then a multiple of the data-parallel size and the chunk.
    num_prompts = max(num_real, pad_batch_to)
    multiple = self.data_parallel
    if self.prefill_chunk and num_prompts > self.prefill_chunk:
      multiple = math.lcm(multiple, self.prefill_chunk)
    num_prompts = -(-num_prompts // multiple) * multiple
    # Dummy prompts (one token, id 0) fill the batch; they start finished.
    tokens_BpxP = np.zeros((num_prompts, bucket), np.int32)
    lengths_Bp = np.ones((num_prompts,), np.int32)
    for i, p in enumerate(prompts):
      tokens_BpxP[i, bucket - len(p):] = p
      lengths_Bp[i] = len(p)
    seeds_Bp = np.zeros((num_prompts,), np.uint32)
    seeds_Bp[:num_real] = np.asarray(prompt_seeds if prompt_seeds is not None else np.arange(num_real),
                                     dtype=np.int64) % 2**32
    active_Bp = np.arange(num_prompts) < num_real
    limits_Bp = np.full((num_prompts,), sampling.max_new_tokens, np.int32)
    if max_new_tokens_per_prompt is not None:
      limits_Bp[:num_real] = check_limits(max_new_tokens_per_prompt, num_real, sampling.max_new_tokens)

    outputs = self.sample_on_device(self.prepare_weights(params), tokens_BpxP, lengths_Bp, seeds_Bp, sampling,
                                    active_Bp=active_Bp, edit=edit, limits_Bp=limits_Bp)
    host = jax.device_get(outputs)
    steps = sampling.max_new_tokens

    def per_prompt(x):
      return np.asarray(x).reshape(num_prompts, n, *np.shape(x)[1:])[:num_real]

    lengths = per_prompt(host["lengths"])
    return SampleOutput(
        tokens=per_prompt(host["tokens"])[:, :, :steps],
        lengths=lengths,
        finish_reasons=np.where(per_prompt(host["stopped"]), FINISH_STOP, FINISH_LENGTH),
        logprobs=per_prompt(host["logprobs"])[:, :, :steps],
        sampled_logprobs=per_prompt(host["sampled_logprobs"])[:, :, :steps],
        prompt_lengths=lengths_Bp[:num_real].copy(),
        top_ids=per_prompt(host["top_ids"])[:, :, :steps] if self.top_logprobs else None,
        top_logprobs=per_prompt(host["top_logprobs"])[:, :, :steps] if self.top_logprobs else None,
    )


def decode_inputs(sampling: SamplingParams, vocab_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(stop ids padded to a few sizes, the decode's runtime knobs) of `sampling`."""
  stop_ids_S = np.full((_padded_count(len(sampling.stop_token_ids)),), -1, np.int32)
  stop_ids_S[:len(sampling.stop_token_ids)] = sampling.stop_token_ids
  knobs = {"seed": np.uint32(sampling.seed % 2**32), "max_new_tokens": np.int32(sampling.max_new_tokens),
           "temperature": np.float32(sampling.temperature or 1.0), "top_k": np.int32(sampling.top_k),
           "top_p": np.float32(sampling.top_p), "min_p": np.float32(sampling.min_p)}
  if sampling.banned_token_ids:  # absent otherwise: the decode compiled without a ban is unchanged
    knobs["banned"] = sampling.banned_mask(vocab_size)
  return stop_ids_S, knobs


def check_limits(limits: Sequence[int], count: int, most: int) -> np.ndarray:
  """Per-prompt new-token limits as an array, each in [1, `most`]."""
  out = np.asarray(limits, np.int64)
  if out.shape != (count,) or np.any(out < 1) or np.any(out > most):
    raise ValueError(f"max_new_tokens_per_prompt: {count} limits, each in [1, max_new_tokens={most}], got "
                     f"{list(out.reshape(-1)[:5])}{' ...' if out.size > 5 else ''} (shape {out.shape})")
  return out.astype(np.int32)


# XLA:CPU hands dots, and by default also reductions and elementwise ops, to the YNNPACK library.
# For the decode step's tiny reductions (RMS norms, softmax, log-sum-exp over one token per row)
# each library call costs more than the work: keeping only dots there made a batch-32 decode step
# of benchmarks/sampler.py 35 -> 27 ms (jax 0.10.2). Prefill (whole prompts) is faster with the
# default (35 vs 70 ms for one 128-token prompt), so only the decode gets it; set per compiled
# function, never process-wide.
_CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
_cpu_options_supported: bool | None = None


def decode_compiler_options(mesh: Mesh | None) -> dict:
  """XLA options for the decode loop: `_CPU_DECODE_OPTIONS` on CPU if this XLA has them, else none."""
  global _cpu_options_supported
  devices = mesh.devices.flat if mesh is not None else jax.devices()
  if next(iter(devices)).platform != "cpu":
    return {}
  if _cpu_options_supported is None:
    try:  # the option is experimental: an XLA without it rejects it at compile time
      jax.jit(lambda x: x + 1, compiler_options=_CPU_DECODE_OPTIONS).lower(np.zeros(2, np.float32)).compile()
      _cpu_options_supported = True
    except Exception:  # pylint: disable=broad-except
      _cpu_options_supported = False
  return dict(_CPU_DECODE_OPTIONS) if _cpu_options_supported else {}


def _padded_count(k: int) -> int:
  """Stop-id array length: a power of two >= 4, so that most stop-id sets share one compilation."""
  size = 4
  while size < k:
    size *= 2
  return size
