"""LoRA / rsLoRA adapters: scale, zero start, layer selection, merge, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emjax.models import lora, transformer as T

CFG = T.TransformerConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48)


def adapted(lora_cfg, seed=0, model_cfg=CFG):
  model = T.Transformer(model_cfg, rngs=nnx.Rngs(seed))
  return lora.add_lora(model, lora_cfg, rngs=nnx.Rngs(seed + 1))


def randomize_b(model, seed=5):
  """Non-zero B matrices, so the adapters actually change the output."""
  graph, state = nnx.split(model)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 100))
  state = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.1 * jax.random.normal(next(keys), x.shape) if "lora_b" in str(path) else x, state)
  return nnx.merge(graph, state)


@pytest.mark.parametrize("rslora", [True, False])
def test_adapter_adds_alpha_over_sqrt_rank_times_ab_to_the_weight(rslora):
  """Measured from the forward pass: the rank-one product u v^T, written into the first column of A
  and the first row of B at rank r, must act as the base model with alpha/sqrt(r) u v^T (rsLoRA) or
  alpha/r u v^T (LoRA) added to every layer's down projection by hand. At ranks 4 and 16 the two
  conventions differ by 2x and 4x, so a wrong scale cannot pass."""
  alpha = 8.0
  rng = np.random.default_rng(0)
  u = rng.normal(size=CFG.d_ff).astype(np.float32)
  v = 0.3 * rng.normal(size=CFG.d_model).astype(np.float32)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, CFG.vocab_size)
  forward = jax.jit(lambda graph, params: nnx.merge(graph, params)(tokens), static_argnums=0)
  base_graph, base_params = T.split_model(T.Transformer(CFG, rngs=nnx.Rngs(0)))
  base_out = forward(base_graph, base_params)
  for rank in (4, 16):
    graph, params = T.split_model(adapted(lora.LoRAConfig(rank=rank, alpha=alpha, rslora=rslora, targets=("down",))))
    a = np.zeros((CFG.n_layers, CFG.d_ff, rank), np.float32)
    b = np.zeros((CFG.n_layers, rank, CFG.d_model), np.float32)
    a[:, :, 0], b[:, 0, :] = u, v
    params["layers"]["mlp"]["down_proj_lora"] = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
    with_adapter = forward(graph, params)

    by_hand = jax.tree.map(lambda x: x, base_params)
    scale = alpha / (np.sqrt(rank) if rslora else rank)
    by_hand["layers"]["mlp"]["down_proj"] = base_params["layers"]["mlp"]["down_proj"] + scale * np.outer(u, v)
    expected = forward(base_graph, by_hand)
    assert np.abs(np.asarray(expected - base_out)).max() > 0.05  # the edit is visible in the logits
    np.testing.assert_allclose(with_adapter, expected, atol=1e-4, err_msg=f"rank {rank}, rslora={rslora}")


def test_adapted_model_starts_equal_to_base_and_params_are_lora_params():
  cfg = lora.LoRAConfig(rank=4, alpha=8)
  base = T.Transformer(CFG, rngs=nnx.Rngs(0))
  model = adapted(cfg)
  tokens = jnp.arange(10)[None] % CFG.vocab_size
  np.testing.assert_allclose(model(tokens), base(tokens), atol=1e-6)
  adapters = nnx.state(model, lora.LoRAParam)
  names = {"/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(adapters)}
  assert len(names) == 2 * 7  # A and B for the seven projections
  assert all(v.shape[0] == CFG.n_layers for v in jax.tree.leaves(adapters))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_merged_adapter_equals_base_plus_adapter(scan_layers):
  model_cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  cfg = lora.LoRAConfig(rank=4, alpha=16, rslora=True, targets=("q", "k", "v", "o", "gate", "up", "down"))
  model = randomize_b(adapted(cfg, model_cfg=model_cfg))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, CFG.vocab_size)
  with_adapter = model(tokens)
  _, params = T.split_model(model)
  merged = lora.merge_lora(params, cfg)
  graph_base, _ = T.split_model(T.abstract_model(model_cfg))
  merged_out = nnx.merge(graph_base, merged)(tokens)
  np.testing.assert_allclose(merged_out, with_adapter, atol=1e-5)
  assert np.abs(np.asarray(with_adapter - T.Transformer(model_cfg, rngs=nnx.Rngs(0))(tokens))).max() > 1e-3


def test_single_layer_rank_one_down_projection():
  cfg = lora.LoRAConfig(rank=1, alpha=1, rslora=False, targets=("down",), layers=(1,))
  model = randomize_b(adapted(cfg))
  graph, params = T.split_model(model)
  tokens = jnp.arange(12)[None] % CFG.vocab_size

  def loss(p):
    return nnx.merge(graph, p)(tokens).sum()

  grads = jax.grad(loss)(params)["layers"]["mlp"]["down_proj_lora"]
  for name in ("lora_a", "lora_b"):
    per_layer = np.abs(np.asarray(grads[name])).reshape(CFG.n_layers, -1).sum(-1)
    assert per_layer[1] > 0 and per_layer[0] == 0 and per_layer[2] == 0, (name, per_layer)
  merged = lora.merge_lora(params, cfg)
  delta = np.asarray(merged["layers"]["mlp"]["down_proj"] - params["layers"]["mlp"]["down_proj"])
  assert np.abs(delta[1]).max() > 0 and np.abs(delta[0]).max() == 0 and np.abs(delta[2]).max() == 0
  assert np.linalg.matrix_rank(delta[1]) == 1


def test_dropout_only_with_a_key_and_deterministic_given_it():
  cfg = lora.LoRAConfig(rank=4, alpha=8, dropout=0.5, targets=("q", "up"))
  model = randomize_b(adapted(cfg))
  tokens = jnp.arange(8)[None] % CFG.vocab_size
  a = model(tokens, dropout_key=jax.random.PRNGKey(0))
  b = model(tokens, dropout_key=jax.random.PRNGKey(0))
  c = model(tokens, dropout_key=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a - c)).max() > 0
  assert np.abs(np.asarray(model(tokens) - a)).max() > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=("q", "qkv")), r"config.lora.targets: \['qkv'\] matches no projection"),
    (dict(layers=(5,)), r"config.lora.layers: \[5\] out of range"),
    (dict(rank=0), "config.lora.rank"),
])
def test_bad_lora_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    adapted(lora.LoRAConfig(**kwargs))
