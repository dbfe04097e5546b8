"""Train state, optimizers and learning-rate schedules.

The train state is a plain pytree (a dict) so that jit, orbax and optax all see
the same thing:

  step      int32 scalar, optimizer steps taken
  params    trainable parameters (nested dict of arrays, NNX names): every
            weight, or only the LoRA adapters
  opt_state optax state for `params`
  rng       raw uint32 PRNG key

Frozen parameters (the base weights under LoRA) are a second pytree passed to
the step beside the state: used, never trained, never in the optimizer state,
not checkpointed (they are reloaded from `config.init`). The model's graph
(`graphdef`) is split off once and never travels with either.
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
from emjax import weights as weights_lib
from emjax.models import lora as lora_lib
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


def build_model(model_cfg: transformer.TransformerConfig, lora_cfg: "lora_lib.LoRAConfig | None",
                key, base_params: dict | None = None, base_graphdef=None) -> transformer.Transformer:
  """The model to train: random or given base weights, plus LoRA adapters when configured."""
  base_key, lora_key = jax.random.split(key)
  if base_params is None:
    model = transformer.Transformer(model_cfg, rngs=nnx.Rngs(params=base_key))
  else:
    model = nnx.merge(base_graphdef, base_params)
  if lora_cfg is not None:
    lora_lib.add_lora(model, lora_cfg, rngs=nnx.Rngs(params=lora_key))
  return model


# The LoRA tree helpers live in models/lora.py (weight loading uses them without train/).
split_trainable = lora_lib.split_trainable
adapter_abstract = lora_lib.adapter_abstract
merge_trees = lora_lib.merge_trees
_select = lora_lib.select_like


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Everything static about the train state: graph, shapes and shardings.

  `abstract`/`shardings` describe the checkpointed train state; `frozen_*` the
  frozen parameters, which are passed to the step separately, never donated,
  never in the optimizer and never checkpointed (they come from `config.init`).
  """

  graphdef: Any
  abstract: dict  # pytree of ShapeDtypeStruct (with shardings)
  shardings: dict  # pytree of NamedSharding, same structure as `abstract`
  frozen_abstract: dict
  frozen_shardings: dict
  base_graphdef: Any  # the model without adapters (to load base weights into)
  base_abstract: dict  # its parameters


def _shape_only(tree):
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), tree)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def build_layout(model_cfg: transformer.TransformerConfig, tx: optax.GradientTransformation, mesh: Mesh,
                 lora_cfg=None, base_dtype: str = "") -> StateLayout:
  """Shapes and shardings of the whole train state, from abstract shapes alone.

  `base_dtype` (LoRA only) is the dtype the frozen base weights are held in
  ('' = `model_cfg.param_dtype`); the adapters keep `param_dtype`.
  """
  abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, lora_cfg, jax.random.PRNGKey(0)))
  graphdef, trainable, frozen = split_trainable(abstract_model, lora_cfg)
  axes = transformer.param_logical_axes(abstract_model)
  trainable, frozen = _shape_only(trainable), _shape_only(frozen)
  if lora_cfg is not None and base_dtype:
    frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(base_dtype)), frozen)
  all_sh = shd.tree_shardings(axes, merge_trees(frozen, trainable), mesh)
  param_sh = _select(all_sh, trainable)
  frozen_sh = _select(all_sh, frozen)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  rep = shd.replicated(mesh)
  # Optimizer leaves shaped like their parameter share its sharding; factored
  # (Adafactor) statistics and counters are replicated.
  opt_sh = optax.tree_utils.tree_map_params(
      tx, lambda x, p, sh: sh if x.shape == p.shape else rep,
      abstract_opt, trainable, param_sh, transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, (NamedSharding, jax.ShapeDtypeStruct)))
  shardings = {"step": rep, "params": param_sh, "opt_state": opt_sh, "rng": rep}
  abstract = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": trainable,
      "opt_state": abstract_opt,
      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  base_graphdef, base_params = transformer.split_model(transformer.abstract_model(model_cfg))
  base_params = _shape_only(base_params)
  if lora_cfg is not None and base_dtype:
    base_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(base_dtype)), base_params)
  base_axes = transformer.param_logical_axes(transformer.abstract_model(model_cfg))
  base_abstract = _with_shardings(base_params, shd.tree_shardings(base_axes, base_params, mesh))
  return StateLayout(graphdef=graphdef, abstract=_with_shardings(abstract, shardings), shardings=shardings,
                     frozen_abstract=_with_shardings(frozen, frozen_sh), frozen_shardings=frozen_sh,
                     base_graphdef=base_graphdef, base_abstract=base_abstract)


def init_state(model_cfg: transformer.TransformerConfig, tx: optax.GradientTransformation,
               layout: StateLayout, seed: int, lora_cfg=None, base_params: dict | None = None,
               adapters: dict | None = None) -> tuple[dict, dict]:
  """(train state, frozen params), created directly in their shardings (jit out_shardings).

  `base_params` (e.g. a pretrained checkpoint's) replace the random base weights; `adapters`
  (laid out as the state's `params`, e.g. a PEFT adapter's) replace the fresh LoRA adapters.
  They are consumed: each leaf is cast to the layout's dtype on its own, then the
  whole tree is donated to the initialisation, so a base never exists twice
  (a frozen or trainable leaf is the loaded buffer itself where dtype and
  sharding already match). Do not use `base_params` after this call.
  """

  def init(key, base, given_adapters):
    model_key, state_key = jax.random.split(key)
    model = build_model(model_cfg, lora_cfg, model_key, base, layout.base_graphdef)
    _, trainable, frozen = split_trainable(model, lora_cfg)
    if given_adapters is not None:
      trainable = given_adapters
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable),
             "rng": state_key}
    return state, frozen

  if base_params is not None:
    base_params = weights_lib.cast_like(base_params, layout.base_abstract)
  fn = jax.jit(init, out_shardings=(layout.shardings, layout.frozen_shardings),
               donate_argnums=(1,) if base_params is not None else ())
  if adapters is not None and jax.tree.structure(adapters) != jax.tree.structure(layout.abstract["params"]):
    raise ValueError("init_state: the adapters given do not match config.lora's")
  return fn(jax.random.PRNGKey(seed), base_params, adapters)
