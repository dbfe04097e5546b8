"""Training objectives: pure functions of (logits, batch[, teacher outputs]).

Every objective returns *sums* over the tokens its mask selects plus the mask's
total weight. The loop adds these up across micro-batches and devices and only
then divides, so a loss is an exact token mean over the whole global batch
whatever the gradient accumulation or the mesh. A new training channel (SFT,
forward/reverse KL, on-policy distillation) is a new function here plus a batch
source, never a new loop.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp


class ObjectiveOutput(NamedTuple):
  loss_sum: jax.Array  # sum over selected tokens of the per-token loss
  weight: jax.Array  # sum of the mask: the number of tokens that count
  metrics: dict[str, jax.Array]  # extra per-token sums, reported divided by `weight`


def token_log_probs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """log p(target) per position, computed in float32 whatever the logits' dtype."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return target_logit_BxL - log_z_BxL


def cross_entropy(logits_BxLxV: jax.Array, batch: Mapping[str, jax.Array], teacher=None) -> ObjectiveOutput:
  """Next-token cross-entropy on the tokens where `loss_mask` is set (pretraining, SFT)."""
  del teacher
  mask_BxL = batch["loss_mask"].astype(jnp.float32)
  nll_BxL = -token_log_probs(logits_BxLxV, batch["targets"])
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]).astype(jnp.float32)
  return ObjectiveOutput(
      loss_sum=jnp.sum(nll_BxL * mask_BxL),
      weight=jnp.sum(mask_BxL),
      metrics={"accuracy": jnp.sum(correct_BxL * mask_BxL)},
  )


Objective = Callable[..., ObjectiveOutput]

OBJECTIVES: dict[str, Objective] = {
    "ce": cross_entropy,
}


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"config.train.objective: unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
  return OBJECTIVES[name]
