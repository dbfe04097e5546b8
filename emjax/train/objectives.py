"""Training objectives: pure functions of (logits, batch[, teacher logits]).

Every objective returns *sums* over the tokens its mask selects plus the mask's
total weight. The loop adds these up across sequence chunks, micro-batches and
devices and only then divides, so a loss is an exact token mean over the whole
global batch whatever the chunking, the gradient accumulation or the mesh. A new
training channel (SFT, forward/reverse KL, on-policy distillation) is a new
`Objective` here plus a batch source, never a new loop.

Because the sums decompose over positions, the loop never builds the [B, L, V]
logits of a whole sequence: it unembeds `train.loss_chunk_len` positions at a
time and calls the objective on each chunk (`logits` [B, C, V], every batch key
sliced to the same C positions, `teacher` the teacher's logits for them).

An objective declares the batch keys it reads beyond the model inputs
(`batch_spec`: name -> (trailing shape after [B, L], dtype)) and whether it needs a
teacher, so the batch the step is compiled for is not a fixed tuple.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from emjax.data import banned as banned_lib
from emjax.train import token_masks

# What the model itself reads from every batch; objectives add their own keys.
MODEL_INPUT_SPEC: dict[str, tuple[tuple[int, ...], str]] = {
    "inputs": ((), "int32"),
    "positions": ((), "int32"),
    "segment_ids": ((), "int32"),
}


class ObjectiveOutput(NamedTuple):
  loss_sum: jax.Array  # sum over selected tokens of the per-token loss
  weight: jax.Array  # sum of the mask: the number of tokens that count
  metrics: dict[str, jax.Array]  # extra per-token sums, reported divided by `weight`


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss: `fn(logits_BxCxV, batch_chunk, teacher=None) -> ObjectiveOutput` plus what it reads."""

  name: str
  fn: Callable[..., ObjectiveOutput]
  batch_spec: Mapping[str, tuple[tuple[int, ...], str]]
  needs_teacher: bool = False
  # "float32": `chunked_sums` unembeds (student and teacher) with float32 accumulation and output,
  # so that a divergence between two distributions never sees logits rounded to a bf16 model's dtype.
  logits_dtype: str | None = None
  # `prepare(batch) -> batch` adds keys derived from the whole sequence (e.g. a token mask's state
  # at each position) before `chunked_sums` slices it; `derived_keys` are the ones the chunks read.
  # Not batch inputs: the step computes them, so they are not in `full_batch_spec`.
  prepare: Callable[[Mapping[str, jax.Array]], dict] | None = None
  derived_keys: tuple[str, ...] = ()

  def __call__(self, logits, batch, teacher=None) -> ObjectiveOutput:
    return self.fn(logits, batch, teacher=teacher)

  def full_batch_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
    return {**MODEL_INPUT_SPEC, **self.batch_spec}


def token_log_probs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """log p(target) per position, computed in float32 whatever the logits' dtype."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return target_logit_BxL - log_z_BxL


def _accuracy_sum(logits_BxLxV, targets_BxL, mask_BxL):
  """Positions whose target has the highest logit; a target tied with n others for the highest counts 1/(n+1).

  Not `argmax(logits) == target`: XLA:CPU runs argmax's variadic (value, index) reduce over the
  vocabulary without vectorising it, a large share of a small model's step, while a max, a count
  and the target's logit are plain reduces and a gather. The split tie is argmax's expectation under
  a random tie-break (bf16 logits tie often; a collapsed model with equal logits scores 1/V).
  Computed on the logits' own dtype: no float32 copy of the vocabulary axis for a metric.
  """
  logits_BxLxV = jax.lax.stop_gradient(logits_BxLxV)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  max_BxL = jnp.max(logits_BxLxV, axis=-1)
  n_max_BxL = jnp.sum((logits_BxLxV == max_BxL[..., None]).astype(jnp.float32), axis=-1)
  correct_BxL = (target_logit_BxL >= max_BxL).astype(jnp.float32) / n_max_BxL
  return jnp.sum(correct_BxL * mask_BxL)


def cross_entropy(logits_BxLxV: jax.Array, batch: Mapping[str, jax.Array], teacher=None) -> ObjectiveOutput:
  """Next-token cross-entropy on the tokens where `loss_mask` is set (pretraining, SFT)."""
  del teacher
  mask_BxL = batch["loss_mask"].astype(jnp.float32)
  nll_BxL = -token_log_probs(logits_BxLxV, batch["targets"])
  return ObjectiveOutput(
      loss_sum=jnp.sum(nll_BxL * mask_BxL),
      weight=jnp.sum(mask_BxL),
      metrics={"accuracy": _accuracy_sum(logits_BxLxV, batch["targets"], mask_BxL)},
  )


# ----------------------------------------------------------------------------- divergences
#
# Per-token divergences between a teacher's and a student's next-token distributions,
# summed over the vocabulary (or over the categories of a top-k teacher) in float32:
# [B, L, V] logits in, [B, L] out. `temperature` divides both sides' logits (the loss
# temperature; the temperature the student samples at is the sampler's, set apart).
# Conventions checked against brute force in tests/test_objectives.py:
#   forward_kl = KL(p_T || p_S)  (mass-covering; what SFT on teacher samples estimates)
#   reverse_kl = KL(p_S || p_T)  (mode-seeking; what on-policy distillation minimises)
#   generalized_jsd(beta) = beta KL(p_T || M) + (1 - beta) KL(p_S || M),  M = beta p_T + (1 - beta) p_S
# As beta -> 0 or 1 the mixture's value goes to 0 (M tends to p_S or p_T), while its
# gradient, divided by beta or 1 - beta, tends to forward or reverse KL's: so the two
# endpoints are *defined* as those divergences (GKD, Agarwal et al. 2024; TRL agrees),
# computed exactly rather than through a clamped mixture.


def _kl_from_log_probs(p_logp: jax.Array, q_logp: jax.Array) -> jax.Array:
  """sum_i p_i (log p_i - log q_i) over the last axis, 0 log 0 = 0 (and a finite gradient there)."""
  p = jnp.exp(p_logp)
  # Both sides made finite where p = 0, so that neither branch of the `where` carries inf or NaN
  # into the gradient (0 * inf) at tokens a masked vocabulary or a stored teacher gives -inf.
  safe_p_logp = jnp.where(p > 0, p_logp, 0.0)
  safe_q_logp = jnp.where(p > 0, q_logp, 0.0)
  return jnp.sum(jnp.where(p > 0, p * (safe_p_logp - safe_q_logp), 0.0), axis=-1)


def _jsd_from_log_probs(t_logp: jax.Array, s_logp: jax.Array, beta: float) -> jax.Array:
  beta = float(beta)
  if beta == 0.0:
    return _kl_from_log_probs(t_logp, s_logp)
  if beta == 1.0:
    return _kl_from_log_probs(s_logp, t_logp)
  # Where both sides give a token no mass, so does M; logaddexp(-inf, -inf) has a NaN gradient.
  neither = jnp.isneginf(t_logp) & jnp.isneginf(s_logp)
  m_logp = jnp.logaddexp(jnp.where(neither, 0.0, t_logp) + math.log(beta),
                         jnp.where(neither, 0.0, s_logp) + math.log1p(-beta))
  m_logp = jnp.where(neither, -jnp.inf, m_logp)
  return beta * _kl_from_log_probs(t_logp, m_logp) + (1.0 - beta) * _kl_from_log_probs(s_logp, m_logp)


def _scaled_log_softmax(logits: jax.Array, temperature: float) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32) / float(temperature), axis=-1)


def check_beta(beta: float, key: str = "beta") -> float:
  beta = float(beta)
  if not 0.0 <= beta <= 1.0:  # also refuses NaN
    raise ValueError(f"{key}={beta}: the JSD interpolation weight must be in [0, 1] "
                     "(0 = forward KL(teacher||student), 1 = reverse KL(student||teacher))")
  return beta


def check_temperature(temperature: float, key: str = "temperature") -> float:
  temperature = float(temperature)
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f"{key}={temperature}: a loss temperature must be a finite number > 0")
  return temperature


def forward_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """KL(p_T || p_S) per position, [B, L, V] -> [B, L]."""
  return generalized_jsd(teacher_logits, student_logits, 0.0, temperature)


def reverse_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """KL(p_S || p_T) per position, [B, L, V] -> [B, L]."""
  return generalized_jsd(teacher_logits, student_logits, 1.0, temperature)


def generalized_jsd(teacher_logits: jax.Array, student_logits: jax.Array, beta: float,
                    temperature: float = 1.0) -> jax.Array:
  """beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = beta p_T + (1 - beta) p_S; exact KLs at beta = 0 / 1."""
  check_beta(beta)
  check_temperature(temperature)
  t_logp = _scaled_log_softmax(jax.lax.stop_gradient(teacher_logits), temperature)
  s_logp = _scaled_log_softmax(student_logits, temperature)
  return _jsd_from_log_probs(t_logp, s_logp, beta)


def _tail_log_prob(logp_BxLxV: jax.Array, ids_BxLxK: jax.Array) -> jax.Array:
  """log of the mass outside the k ids, from the tokens outside them (no 1 - sum cancellation)."""
  b, l, _ = logp_BxLxV.shape
  rows = jnp.arange(b)[:, None, None]
  cols = jnp.arange(l)[None, :, None]
  outside = jnp.ones(logp_BxLxV.shape, bool).at[rows, cols, ids_BxLxK].set(False)
  return jax.nn.logsumexp(jnp.where(outside, logp_BxLxV, -jnp.inf), axis=-1)


def teacher_top_k(teacher_logits: jax.Array, k: int, temperature: float = 1.0) -> tuple[jax.Array, ...]:
  """The teacher's k most likely tokens: (ids [B, L, k], log-probs [B, L, k], tail log-prob [B, L]).

  Log-probabilities are under the full vocabulary at `temperature`; the tail holds
  the mass of every other token (-inf when k = V). This is what a precomputed
  teacher stores per position.
  """
  vocab = teacher_logits.shape[-1]
  if not 1 <= k <= vocab:
    raise ValueError(f"top_k={k}: must be in [1, vocab size {vocab}]")
  logp = _scaled_log_softmax(jax.lax.stop_gradient(teacher_logits), temperature)
  top_logp, ids = jax.lax.top_k(logp, k)
  tail = _tail_log_prob(logp, ids) if k < vocab else jnp.full(logp.shape[:-1], -jnp.inf)
  return ids.astype(jnp.int32), top_logp, tail


def top_k_divergence(teacher_ids: jax.Array, teacher_logprobs: jax.Array, student_logits: jax.Array,
                     beta: float, temperature: float = 1.0, teacher_tail: jax.Array | None = None) -> jax.Array:
  """The divergence (`beta` as in `generalized_jsd`) against a teacher known by its top k tokens.

  With `teacher_tail` (the log-mass of all other tokens) both distributions are
  coarsened to k + 1 categories, the k tokens and "everything else", so student
  mass outside the teacher's k tokens is penalised; the value is a lower bound of
  the full-vocabulary divergence and equals it when the tail is empty. Without
  it both distributions are restricted to the k tokens and renormalised there
  (student mass elsewhere is not seen). [B, L, k] teacher arrays, [B, L, V]
  student logits -> [B, L].
  """
  check_beta(beta)
  check_temperature(temperature)
  teacher_logprobs = jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32))
  s_logp = _scaled_log_softmax(student_logits, temperature)
  s_top = jnp.take_along_axis(s_logp, teacher_ids, axis=-1)
  if teacher_tail is None or teacher_ids.shape[-1] == student_logits.shape[-1]:  # k = V: nothing outside
    t_cat = jax.nn.log_softmax(teacher_logprobs, axis=-1)
    s_cat = jax.nn.log_softmax(s_top, axis=-1)
  else:
    t_cat = jnp.concatenate([teacher_logprobs, jax.lax.stop_gradient(teacher_tail)[..., None]], axis=-1)
    s_cat = jnp.concatenate([s_top, _tail_log_prob(s_logp, teacher_ids)[..., None]], axis=-1)
  return _jsd_from_log_probs(t_cat, s_cat, beta)


def sampled_reverse_kl_surrogate(teacher_logits: jax.Array, student_logits: jax.Array, targets: jax.Array,
                                 sample_logprobs: jax.Array, temperature: float = 1.0) -> tuple[jax.Array, ...]:
  """The sampled-token estimator of reverse KL on the student's own rollouts (tinker-cookbook's on-policy loss).

  Per sampled token x_t, drawn from q (the sampler's distribution; `sample_logprobs` = log q(x_t)):
  advantage A = -(log p_S(x_t) - log p_T(x_t)), both at the loss `temperature`, and the surrogate
  -ratio * A with the importance ratio p_S(x_t) / q(x_t); A and the ratio's denominator are
  constants. Its gradient, in expectation over x ~ q, is the gradient of KL(p_S || p_T) at that
  position for any q with full support: q may be the student at another sampling temperature or
  from before this step's update (tinker-cookbook takes log q in A, which is the same only when
  q = p_S). Returns (surrogate [B, L], ratio * (log p_S - log p_T) [B, L], whose mean over x ~ q is
  KL(p_S || p_T), ratio [B, L]).
  """
  check_temperature(temperature)
  t_lp = token_log_probs(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, targets)
  s_lp = token_log_probs(student_logits.astype(jnp.float32) / temperature, targets)
  sample_lp = jax.lax.stop_gradient(sample_logprobs.astype(jnp.float32))
  log_ratio = jax.lax.stop_gradient(s_lp - t_lp)
  ratio = jnp.exp(s_lp - sample_lp)
  return ratio * log_ratio, jax.lax.stop_gradient(ratio) * log_ratio, jax.lax.stop_gradient(ratio)


# ----------------------------------------------------------------------------- objectives


def _data_metrics(logits_BxLxV, batch, mask_BxL) -> dict[str, jax.Array]:
  """The student's cross-entropy to the sequence's own next tokens, and its accuracy, as metrics."""
  nll_BxL = -token_log_probs(logits_BxLxV, batch["targets"])
  return {"data_nll": jnp.sum(nll_BxL * mask_BxL),
          "accuracy": _accuracy_sum(logits_BxLxV, batch["targets"], mask_BxL)}


DISTILLATION = ("forward_kl", "reverse_kl", "jsd")


def _check_mask_objective(mask: str, objective: str) -> None:
  if mask and objective not in DISTILLATION:
    raise ValueError(f"config.train.distill.mask={mask!r} masks the full-vocabulary divergences "
                     f"({', '.join(DISTILLATION)}), not config.train.objective={objective!r}")


def distill_settings(distill, objective: str | None = None) -> dict:
  """`config.train.distill` checked: beta, temperature, top_k, tail, precomputed, mask, mask_words (see
  base_config); `objective`, when given, the `config.train.objective` they are for."""
  distill = dict(distill or {})
  top_k = int(distill.get("top_k", 0) or 0)
  if top_k < 0:
    raise ValueError(f"config.train.distill.top_k={top_k}: must be >= 0 (0 = the full vocabulary)")
  precomputed = bool(distill.get("precomputed", ""))  # a store's path (or True in tests)
  if precomputed and not top_k:
    raise ValueError(f"config.train.distill.precomputed={distill.get('precomputed')!r} reads a stored top-k teacher: "
                     "set config.train.distill.top_k to the k it was stored with")
  mask = token_masks.check_mode(distill.get("mask", ""))
  mask_words = distill.get("mask_words", "default") or "default"
  if mask == "words":
    banned_lib.parse_words(mask_words, "config.train.distill.mask_words")
  elif mask_words != "default":
    raise ValueError(f"config.train.distill.mask_words={mask_words!r} applies to config.train.distill.mask='words' "
                     f"(mask is {mask!r})")
  if mask and (top_k or precomputed):
    # A top-k teacher has already lost the mass outside its k tokens; masking it would renormalise
    # a distribution that no longer sums to the teacher's.
    raise ValueError(f"config.train.distill.mask={mask!r} masks the full-vocabulary divergence: "
                     "config.train.distill.top_k and .precomputed must be off")
  if mask and objective is not None:
    _check_mask_objective(mask, objective)
  return dict(mask=mask, mask_words=mask_words,beta=check_beta(distill.get("beta", 0.5), "config.train.distill.beta"),
              temperature=check_temperature(distill.get("temperature", 1.0), "config.train.distill.temperature"),
              top_k=top_k, tail=bool(distill.get("tail", True)), precomputed=precomputed)


def make_distillation(name: str, beta: float, distill=None, tokenizer=None, vocab_size: int | None = None) -> Objective:
  """A divergence to the teacher on the tokens where `loss_mask` is set (completion tokens).

  `beta` picks the divergence (0 forward KL, 1 reverse KL, else the generalized
  JSD; `config.train.distill.beta` sets it for 'jsd'). The teacher is the model in
  the step (`config.teacher`), whole-vocabulary or reduced to its top k tokens,
  or top-k log-probs stored with the batch (`distill.precomputed`).

  With `distill.mask` both distributions are masked at the banned tokens and renormalised over the
  rest before the divergence (emjax.train.token_masks, built from `tokenizer` over a `vocab_size`
  vocabulary), and the leak meter is reported: `banned_mass_teacher` (the teacher's mass there
  before masking), `banned_mass_teacher_masked` (on the distribution the divergence reads: 0),
  `banned_mass_student`, `banned_targets` (loss positions whose own next token is banned) and, for
  words, `banned_mass_first_sub` (the teacher's mass on first sub-tokens of multi-token words).
  """
  s = distill_settings(distill, name)
  beta = check_beta(beta, "config.train.distill.beta")
  temperature, top_k, tail = s["temperature"], s["top_k"], s["tail"]
  masker = None
  if s["mask"]:
    if tokenizer is None:
      raise ValueError(f"config.train.distill.mask={s['mask']!r} finds the banned tokens with the tokenizer "
                       "(config.data.tokenizer): none was given")
    masker = token_masks.build(tokenizer, vocab_size, s["mask"], s["mask_words"])

  def fn(logits_BxLxV, batch, teacher=None):
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    if masker is not None:
      if teacher is None:
        raise ValueError(f"config.train.objective={name!r} needs a teacher (config.teacher.path)")
      return _masked_distillation(masker, logits_BxLxV, batch, teacher, mask_BxL, beta, temperature)
    if s["precomputed"]:
      per_token = top_k_divergence(batch["teacher_top_ids"], batch["teacher_top_logprobs"], logits_BxLxV, beta,
                                   temperature, batch["teacher_tail_logprob"] if tail else None)
    elif teacher is None:
      raise ValueError(f"config.train.objective={name!r} needs a teacher (config.teacher.path)")
    elif top_k:
      ids, top_logp, tail_logp = teacher_top_k(teacher, top_k, temperature)
      per_token = top_k_divergence(ids, top_logp, logits_BxLxV, beta, temperature, tail_logp if tail else None)
    else:
      per_token = generalized_jsd(teacher, logits_BxLxV, beta, temperature)
    return ObjectiveOutput(loss_sum=jnp.sum(per_token * mask_BxL), weight=jnp.sum(mask_BxL),
                           metrics=_data_metrics(logits_BxLxV, batch, mask_BxL))

  spec = dict(_TOKEN_TARGETS)
  if s["precomputed"]:
    spec.update(teacher_top_ids=((top_k,), "int32"), teacher_top_logprobs=((top_k,), "float32"),
                teacher_tail_logprob=((), "float32"))
  prepare = None
  if masker is not None and masker.derived_keys:
    prepare = functools.partial(token_masks.prepare, masker)
  return Objective(name, fn, spec, needs_teacher=not s["precomputed"], logits_dtype="float32", prepare=prepare,
                   derived_keys=masker.derived_keys if masker is not None else ())


def _masked_distillation(masker, logits_BxLxV, batch, teacher, mask_BxL, beta, temperature) -> ObjectiveOutput:
  """The divergence between the teacher and the student both renormalised over the allowed tokens."""
  check_temperature(temperature)
  banned_BxLxV = token_masks.banned(masker, batch, mask_BxL.shape)
  t_logp = _scaled_log_softmax(jax.lax.stop_gradient(teacher), temperature)
  t_masked = token_masks.renormalise(t_logp, banned_BxLxV)
  # From the logits, not the full log-softmax: a banned logit then gets an exact zero gradient, where
  # the full normaliser's share would cancel only to rounding.
  s_masked = token_masks.renormalise(logits_BxLxV.astype(jnp.float32) / temperature, banned_BxLxV)
  per_token = _jsd_from_log_probs(t_masked, s_masked, beta)
  s_logp = _scaled_log_softmax(jax.lax.stop_gradient(logits_BxLxV), temperature)
  metrics = _data_metrics(logits_BxLxV, batch, mask_BxL)
  metrics.update(
      banned_mass_teacher=jnp.sum(token_masks.mass(t_logp, banned_BxLxV) * mask_BxL),
      # Measured on what the divergence read, not assumed: a mask that leaks shows here.
      banned_mass_teacher_masked=jnp.sum(token_masks.mass(t_masked, banned_BxLxV) * mask_BxL),
      banned_mass_student=jnp.sum(token_masks.mass(s_logp, banned_BxLxV) * mask_BxL),
      banned_targets=jnp.sum(jnp.take_along_axis(banned_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
                             * mask_BxL))
  if masker.first_sub_V is not None:
    metrics["banned_mass_first_sub"] = jnp.sum(token_masks.mass(t_logp, jnp.asarray(masker.first_sub_V)) * mask_BxL)
  return ObjectiveOutput(loss_sum=jnp.sum(per_token * mask_BxL), weight=jnp.sum(mask_BxL), metrics=metrics)


def make_sampled_reverse_kl(distill=None, tokenizer=None, vocab_size=None) -> Objective:
  """On-policy reverse KL through the sampled-token estimator (`sampled_reverse_kl_surrogate`).

  Reads `sample_logprobs` (the log-probability each completion token was sampled
  with) from the batch: an on-policy batch source provides it. The loss is the
  surrogate (its value is not a divergence); `reverse_kl_estimate` is the mean
  sampled estimate of KL(p_S || p_T) per token, `importance_ratio` the mean ratio.
  The sampler must sample the whole distribution (no top-k / top-p truncation: over
  part of the support the estimator is biased; emjax.train.on_policy refuses it).
  """
  s = distill_settings(distill, "sampled_reverse_kl")
  if s["top_k"] or s["precomputed"]:
    raise ValueError("config.train.objective='sampled_reverse_kl' scores the sampled tokens under the full "
                     "teacher: config.train.distill.top_k and .precomputed do not apply")

  def fn(logits_BxLxV, batch, teacher=None):
    if teacher is None:
      raise ValueError("config.train.objective='sampled_reverse_kl' needs a teacher (config.teacher.path)")
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    surrogate, estimate, ratio = sampled_reverse_kl_surrogate(teacher, logits_BxLxV, batch["targets"],
                                                               batch["sample_logprobs"], s["temperature"])
    metrics = _data_metrics(logits_BxLxV, batch, mask_BxL)
    metrics.update(reverse_kl_estimate=jnp.sum(estimate * mask_BxL), importance_ratio=jnp.sum(ratio * mask_BxL))
    return ObjectiveOutput(loss_sum=jnp.sum(surrogate * mask_BxL), weight=jnp.sum(mask_BxL), metrics=metrics)

  spec = dict(_TOKEN_TARGETS, sample_logprobs=((), "float32"))
  return Objective("sampled_reverse_kl", fn, spec, needs_teacher=True, logits_dtype="float32")


_TOKEN_TARGETS = {"targets": ((), "int32"), "loss_mask": ((), "float32")}

# name -> Objective, or a factory `f(config.train.distill, tokenizer, vocab_size) -> Objective` for
# objectives with settings (the tokenizer and vocabulary size for a token mask, else None).
OBJECTIVES: dict[str, Objective | Callable[..., Objective]] = {
    "ce": Objective("ce", cross_entropy, _TOKEN_TARGETS),
    "forward_kl": lambda distill, *mask_args: make_distillation("forward_kl", 0.0, distill, *mask_args),
    "reverse_kl": lambda distill, *mask_args: make_distillation("reverse_kl", 1.0, distill, *mask_args),
    "jsd": lambda distill, *mask_args: make_distillation("jsd", distill_settings(distill)["beta"], distill,
                                                         *mask_args),
    "sampled_reverse_kl": make_sampled_reverse_kl,
}


def get_objective(name: str, distill=None, tokenizer=None, vocab_size: int | None = None) -> Objective:
  """The objective `config.train.objective` names, built with `config.train.distill` where it has settings.

  `tokenizer` (and the model's `vocab_size`, default the tokenizer's) only for `distill.mask`.
  """
  if name not in OBJECTIVES:
    raise ValueError(f"config.train.objective: unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
  entry = OBJECTIVES[name]
  if isinstance(entry, Objective):
    _check_mask_objective(str(dict(distill or {}).get("mask", "") or ""), name)
    return entry
  return entry(distill, tokenizer, vocab_size)


def check_objective(name: str, distill=None) -> None:
  """What `get_objective` checks of `config.train.objective` and `.distill`, without the tokenizer a
  token mask is built from (config validation)."""
  distill = dict(distill or {})
  if distill.get("mask") and name in OBJECTIVES:
    distill_settings(distill, name)
    distill = {**distill, "mask": "", "mask_words": "default"}  # checked above; the Trainer builds it
  get_objective(name, distill)


def chunked_sums(objective: Objective, unembed: Callable[..., jax.Array], hidden_BxLxD: jax.Array,
                 batch: Mapping[str, jax.Array], chunk_len: int,
                 teacher_unembed: Callable[..., jax.Array] | None = None,
                 teacher_hidden_BxLxD: jax.Array | None = None, unroll: bool = False) -> ObjectiveOutput:
  """The objective's sums over all L positions, unembedding `chunk_len` positions at a time.

  Each chunk's logits (and the teacher's) are recomputed in the backward pass
  instead of stored, so the live logits are [B, chunk_len, V], never [B, L, V].
  `chunk_len <= 0` or `>= L` is one chunk (no scan). A last partial chunk is
  padded with positions whose batch entries (masks included) are zero. `unroll`: the chunks
  unrolled instead of scanned (the same sums). An objective with `logits_dtype` has both unembeds
  called as `unembed(hidden, logits_dtype)` (`Transformer.logits`' out_dtype).
  """
  seq_len = hidden_BxLxD.shape[1]
  if objective.prepare is not None:
    batch = objective.prepare(batch)
  keys = [*objective.batch_spec, *objective.derived_keys]
  sub_batch = {k: batch[k] for k in keys}
  with_teacher = teacher_hidden_BxLxD is not None

  extra = () if objective.logits_dtype is None else (jnp.dtype(objective.logits_dtype),)

  def one_chunk(h, b, ht):
    t_logits = teacher_unembed(ht, *extra) if with_teacher else None
    return objective(unembed(h, *extra), b, teacher=t_logits)

  if chunk_len <= 0 or chunk_len >= seq_len:
    return one_chunk(hidden_BxLxD, sub_batch, teacher_hidden_BxLxD)

  n_chunks = -(-seq_len // chunk_len)
  pad = n_chunks * chunk_len - seq_len

  def to_chunks(x):  # [B, L, ...] -> [n_chunks, B, C, ...]
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], n_chunks, chunk_len, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  xs = (to_chunks(hidden_BxLxD), {k: to_chunks(v) for k, v in sub_batch.items()},
        to_chunks(teacher_hidden_BxLxD) if with_teacher else None)
  body_fn = jax.checkpoint(one_chunk)
  first = jax.eval_shape(one_chunk, *jax.tree.map(lambda x: x[0], xs))
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

  def body(carry, chunk):
    out = body_fn(*chunk)
    return jax.tree.map(jnp.add, carry, out), None

  total, _ = jax.lax.scan(body, init, xs, unroll=unroll)
  return total
