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
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

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
  # argmax on the logits' own dtype: no float32 copy of the vocabulary axis for a metric.
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
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


def forward_kl(logits_BxLxV: jax.Array, batch: Mapping[str, jax.Array], teacher=None) -> ObjectiveOutput:
  """KL(teacher || student) per position where `loss_mask` is set (distillation on full distributions).

  `teacher` is the teacher's logits on the same positions; both sides are taken
  in float32. The cross-entropy to the data's next token is reported as a metric.
  """
  if teacher is None:
    raise ValueError("config.train.objective='forward_kl' needs a teacher (config.teacher.path)")
  mask_BxL = batch["loss_mask"].astype(jnp.float32)
  student_logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  teacher_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher).astype(jnp.float32), axis=-1)
  kl_BxL = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
  nll_BxL = -jnp.take_along_axis(student_logp, batch["targets"][..., None], axis=-1)[..., 0]
  return ObjectiveOutput(
      loss_sum=jnp.sum(kl_BxL * mask_BxL),
      weight=jnp.sum(mask_BxL),
      metrics={"data_nll": jnp.sum(nll_BxL * mask_BxL),
               "accuracy": _accuracy_sum(logits_BxLxV, batch["targets"], mask_BxL)},
  )


_TOKEN_TARGETS = {"targets": ((), "int32"), "loss_mask": ((), "float32")}

OBJECTIVES: dict[str, Objective] = {
    "ce": Objective("ce", cross_entropy, _TOKEN_TARGETS),
    "forward_kl": Objective("forward_kl", forward_kl, _TOKEN_TARGETS, needs_teacher=True),
}


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"config.train.objective: unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
  return OBJECTIVES[name]


def chunked_sums(objective: Objective, unembed: Callable[[jax.Array], jax.Array], hidden_BxLxD: jax.Array,
                 batch: Mapping[str, jax.Array], chunk_len: int,
                 teacher_unembed: Callable[[jax.Array], jax.Array] | None = None,
                 teacher_hidden_BxLxD: jax.Array | None = None) -> ObjectiveOutput:
  """The objective's sums over all L positions, unembedding `chunk_len` positions at a time.

  Each chunk's logits (and the teacher's) are recomputed in the backward pass
  instead of stored, so the live logits are [B, chunk_len, V], never [B, L, V].
  `chunk_len <= 0` or `>= L` is one chunk (no scan). A last partial chunk is
  padded with positions whose batch entries (masks included) are zero.
  """
  seq_len = hidden_BxLxD.shape[1]
  keys = [k for k in objective.batch_spec]
  sub_batch = {k: batch[k] for k in keys}
  with_teacher = teacher_hidden_BxLxD is not None

  def one_chunk(h, b, ht):
    t_logits = teacher_unembed(ht) if with_teacher else None
    return objective(unembed(h), b, teacher=t_logits)

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

  total, _ = jax.lax.scan(body, init, xs)
  return total
