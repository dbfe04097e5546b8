"""Train state, optimizers and learning-rate schedules.

The train state is a plain pytree (a dict) so that jit, orbax and optax all see
the same thing:

  step      int32 scalar, optimizer steps taken
  params    trainable parameters (nested dict of arrays, NNX names)
  frozen    parameters that are used but not trained (empty for pretraining;
            the base weights under LoRA); never in the optimizer state
  opt_state optax state for `params`
  rng       raw uint32 PRNG key

The model's graph (`graphdef`) is split off once and never travels with the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from emjax import sharding as shd
from emjax.models import transformer

OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine / linear decay to `lr * end_lr_fraction` at `steps`."""
  lr, warmup, steps = float(train_cfg.lr), int(train_cfg.warmup_steps), int(train_cfg.steps)
  end = lr * float(train_cfg.end_lr_fraction)
  name = train_cfg.schedule
  if name not in SCHEDULES:
    raise ValueError(f"config.train.schedule: unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
  warmup = min(warmup, steps)
  decay_steps = max(steps - warmup, 1)
  warm = optax.linear_schedule(0.0 if warmup else lr, lr, max(warmup, 1))
  if name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif name == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  return optax.join_schedules([warm, decay], [warmup])


def _decay_mask(params):
  # Weight decay on weight matrices only: norm scales and biases are left alone
  # (decided by name: stacked layers make a norm scale 2-D, so ndim can't tell).
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not any(word in name for word in ("norm", "bias", "scale"))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  name = train_cfg.optimizer
  if name == "adamw":
    opt = optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                      weight_decay=train_cfg.weight_decay, mask=_decay_mask)
  elif name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(train_cfg.weight_decay, mask=_decay_mask),
                      optax.sgd(schedule, momentum=train_cfg.momentum or None))
  elif name == "adafactor":
    opt = optax.adafactor(schedule, weight_decay_rate=train_cfg.weight_decay or None,
                          weight_decay_mask=_decay_mask)
  else:
    raise ValueError(f"config.train.optimizer: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), opt)
  return opt


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Everything static about the train state: graph, shapes and shardings."""

  graphdef: Any
  abstract: dict  # pytree of ShapeDtypeStruct (with shardings)
  shardings: dict  # pytree of NamedSharding, same structure as `abstract`
  param_axes: dict


def build_layout(model_cfg: transformer.TransformerConfig, tx: optax.GradientTransformation, mesh: Mesh) -> StateLayout:
  """Shapes and shardings of the whole train state, from abstract shapes alone."""
  graphdef, abstract_params = transformer.split_model(transformer.abstract_model(model_cfg))
  abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abstract_params)
  param_axes = transformer.param_logical_axes(transformer.abstract_model(model_cfg))
  param_sh = shd.tree_shardings(param_axes, abstract_params, mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  rep = shd.replicated(mesh)
  # Optimizer leaves shaped like their parameter share its sharding; factored
  # (Adafactor) statistics and counters are replicated.
  opt_sh = optax.tree_utils.tree_map_params(
      tx, lambda x, p, sh: sh if x.shape == p.shape else rep,
      abstract_opt, abstract_params, param_sh, transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, (NamedSharding, jax.ShapeDtypeStruct)))
  shardings = {"step": rep, "params": param_sh, "frozen": {}, "opt_state": opt_sh, "rng": rep}
  abstract = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": abstract_params,
      "frozen": {},
      "opt_state": abstract_opt,
      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return StateLayout(graphdef=graphdef, abstract=abstract, shardings=shardings, param_axes=param_axes)


def init_state(model_cfg: transformer.TransformerConfig, tx: optax.GradientTransformation,
               layout: StateLayout, seed: int) -> dict:
  """Initialise parameters and optimizer state directly in their shardings (jit out_shardings)."""

  def init(key):
    param_key, state_key = jax.random.split(key)
    model = transformer.Transformer(model_cfg, rngs=nnx.Rngs(params=param_key))
    _, params = transformer.split_model(model)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": {},
            "opt_state": tx.init(params), "rng": state_key}

  return jax.jit(init, out_shardings=layout.shardings)(jax.random.PRNGKey(seed))
