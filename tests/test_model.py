"""The decoder: shapes, families, logical axes, packing isolation, scan == unrolled."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jaxpr_eqns
from emjax.models import transformer as T

BASE = T.TransformerConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48)
FAMILY_CONFIGS = {
    "llama": BASE,
    "llama3_rope": dataclasses.replace(BASE, rope_scaling_factor=8.0, rope_original_max_position=16),
    "qwen2": dataclasses.replace(BASE, family="qwen2", qkv_bias=True, tie_embeddings=True),
    "olmo2": dataclasses.replace(BASE, family="olmo2", qk_norm=True, post_norm=True),
    "qwen3": dataclasses.replace(BASE, family="qwen3", qk_norm=True, qk_norm_per_head=True),
    # A window of 3, shorter than the test sequences, in layers 0 and 2; YaRN in layer 1.
    "olmo3": dataclasses.replace(BASE, family="olmo3", qk_norm=True, post_norm=True, sliding_window=3,
                                 layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                                 rope_scaling_type="yarn", rope_scaling_factor=8.0, rope_original_max_position=16),
}


def make(cfg, seed=0):
  return T.Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_forward_shapes_and_param_count(name):
  cfg = FAMILY_CONFIGS[name]
  model = make(cfg)
  tokens = jnp.arange(2 * 7).reshape(2, 7) % cfg.vocab_size
  logits = model(tokens)
  assert logits.shape == (2, 7, cfg.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()
  _, params = T.split_model(model)
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_every_parameter_has_logical_axes_matching_its_rank(name):
  model = make(FAMILY_CONFIGS[name])
  _, params = T.split_model(model)
  axes = T.param_logical_axes(model)
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda t: isinstance(t, tuple)))
  assert len(flat_p) == len(flat_a)
  for path, value in flat_p:
    assert len(flat_a[path]) == value.ndim, (path, flat_a[path], value.shape)
    if path[0].key == "layers":
      assert flat_a[path][0] == "layers"


def test_scan_equals_unrolled_and_remat_does_not_change_values():
  cfg = FAMILY_CONFIGS["olmo3"]  # sliding and full layers: the per-layer window and RoPE are scanned data
  model = make(cfg)
  graph, params = T.split_model(model)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
  ref = model(tokens)
  for variant in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots_with_no_batch_dims"),
                  dict(attention="xla"), dict(attention="fused")):
    other_graph, _ = T.split_model(T.abstract_model(dataclasses.replace(cfg, **variant)))
    out = nnx.merge(other_graph, params)(tokens)
    np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=str(variant))


@pytest.mark.parametrize("attention", ["auto", "xla", "fused"])
def test_packed_documents_do_not_attend_across_segments(attention):
  cfg = dataclasses.replace(FAMILY_CONFIGS["qwen2"], attention=attention)
  model = make(cfg)
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(0, cfg.vocab_size, 5), rng.integers(0, cfg.vocab_size, 4)
  packed = np.concatenate([doc_a, doc_b, [0, 0]])[None]
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0]])
  segments = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
  out = model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
  alone_a = model(jnp.asarray(doc_a[None]))
  alone_b = model(jnp.asarray(doc_b[None]))
  np.testing.assert_allclose(out[0, :5], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:9], alone_b[0], atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()  # padding rows stay finite


def test_einsum_attention_matches_jax_fused_attention_in_values_and_gradients():
  b, l, h, k, dh = 3, 7, 4, 2, 8  # two query heads per key head
  rng = np.random.default_rng(3)
  q, key, v = (jnp.asarray(rng.normal(size=(b, l, n, dh)), jnp.float32) for n in (h, k, k))
  positions = jnp.asarray(np.tile(np.arange(l), (b, 1)))
  segments = jnp.asarray([[1] * 7, [1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0]])  # packed, padded
  mask = T.attention_mask(positions, segments, positions, segments)
  weights = jnp.asarray(rng.normal(size=(b, l, h, dh)), jnp.float32) * (segments > 0)[:, :, None, None]

  def loss(impl, q, key, v):
    return jnp.sum(T.dot_product_attention(q, key, v, mask, impl) * weights)

  ours, theirs = (T.dot_product_attention(q, key, v, mask, impl) for impl in ("xla", "fused"))
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(theirs)[real], atol=1e-5)
  assert not np.asarray(ours)[~real].any()  # a query that sees no key gets zeros
  grads = [jax.grad(loss, argnums=(1, 2, 3))(impl, q, key, v) for impl in ("xla", "fused")]
  for g_ours, g_theirs in zip(*grads):
    np.testing.assert_allclose(g_ours, g_theirs, atol=1e-5)


@pytest.mark.parametrize("attention", ["auto", "xla", "fused"])
def test_sliding_window_sees_exactly_the_last_window_positions(attention):
  """One sliding layer (window 3): the output at position p depends on the tokens at p-2..p and on no earlier
  one, and packed documents neither see each other nor carry the window across their boundary."""
  cfg = dataclasses.replace(BASE, n_layers=1, layer_types=("sliding_attention",), sliding_window=3,
                            attention=attention)
  model = make(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (1, 10))
  out = np.asarray(model(jnp.asarray(tokens)))

  def changed_at(i):
    other = tokens.copy()
    other[0, i] = (other[0, i] + 1) % cfg.vocab_size
    return np.abs(np.asarray(model(jnp.asarray(other))) - out)[0].max(-1)  # per position

  d = changed_at(4)
  np.testing.assert_array_equal(d[:4], 0.0)  # causal
  assert (d[4:7] > 1e-4).all()  # positions 4, 5, 6 see key 4
  np.testing.assert_allclose(d[7:], 0.0, atol=1e-6)  # 7 - 4 = 3 = the window: out of sight
  # The same weights without the window do see it.
  full = nnx.merge(T.split_model(T.abstract_model(dataclasses.replace(cfg, layer_types=(), sliding_window=0)))[0],
                   T.split_model(model)[1])
  assert (np.abs(np.asarray(full(jnp.asarray(tokens))) - out)[0, 3:].max(-1) > 1e-4).all()  # p >= 3
  # Packed: document b (positions from 0) is computed as if alone, its window within itself.
  doc_a, doc_b = tokens[0, :4], tokens[0, 4:]
  packed = np.concatenate([doc_a, doc_b])[None]
  positions = np.concatenate([np.arange(4), np.arange(6)])[None]
  segments = np.array([[1] * 4 + [2] * 6])
  out_packed = model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
  np.testing.assert_allclose(out_packed[0, 4:], model(jnp.asarray(doc_b[None]))[0], atol=1e-5)
  np.testing.assert_allclose(out_packed[0, :4], model(jnp.asarray(doc_a[None]))[0], atol=1e-5)
  # A sliding layer reads at most `window` keys: less attention in the FLOP count at long sequences.
  assert cfg.flops_per_token(512) < dataclasses.replace(cfg, layer_types=(), sliding_window=0).flops_per_token(512)
  assert cfg.flops_per_token(3) == dataclasses.replace(cfg, layer_types=(), sliding_window=0).flops_per_token(3)


def test_causality():
  cfg = FAMILY_CONFIGS["llama"]
  model = make(cfg)
  tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
  changed = tokens.at[0, 4].set(11)
  a, b = model(tokens), model(changed)
  np.testing.assert_allclose(a[0, :4], b[0, :4], atol=1e-6)
  assert np.abs(np.asarray(a[0, 4:] - b[0, 4:])).max() > 1e-4


def _hf_rotary(cfg):
  """transformers' own Llama rotary embedding for `cfg`: the reference emjax's checkpoints must match."""
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
  scaling = None
  if cfg.rope_scaling_factor:
    scaling = dict(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_position)
  hf_cfg = LlamaConfig(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                       head_dim=cfg.resolved_head_dim, rope_theta=cfg.rope_theta, rope_scaling=scaling,
                       max_position_embeddings=4096)
  return LlamaRotaryEmbedding(hf_cfg), apply_rotary_pos_emb


@pytest.mark.parametrize("name", ["llama", "llama3_rope"])
def test_rope_matches_transformers(name):
  """Frequencies (Llama-3 scaling included) and rotated q/k equal transformers' Llama rotary embedding,
  at positions far enough apart that every frequency turns through many periods."""
  import torch
  cfg = dataclasses.replace(FAMILY_CONFIGS[name], d_model=64, n_heads=4, n_kv_heads=4)  # head_dim 16
  rotary, apply_hf = _hf_rotary(cfg)
  inv = np.asarray(T.rope_inverse_frequencies(cfg))
  np.testing.assert_allclose(inv, rotary.inv_freq.numpy(), rtol=1e-6)
  if cfg.rope_scaling_factor:
    plain = np.asarray(T.rope_inverse_frequencies(dataclasses.replace(cfg, rope_scaling_factor=0.0)))
    assert not np.allclose(inv, plain)

  rng = np.random.default_rng(0)
  B, L, N, Dh = 2, 7, cfg.n_heads, cfg.resolved_head_dim
  q, k = (rng.normal(size=(B, L, N, Dh)).astype(np.float32) for _ in range(2))
  positions = np.stack([np.arange(L), rng.integers(0, 3000, L)]).astype(np.int32)
  cos, sin = rotary(torch.from_numpy(q), torch.from_numpy(positions).long())
  # transformers keeps heads before length: [B, N, L, Dh].
  q_hf, k_hf = apply_hf(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos, sin)
  for ours, theirs in ((q, q_hf), (k, k_hf)):
    out = np.asarray(T.apply_rope(jnp.asarray(ours), jnp.asarray(positions), jnp.asarray(inv)))
    # Angles of ~3000 radians in float32 are good to ~2e-4, whichever library takes their cos/sin.
    np.testing.assert_allclose(out, theirs.transpose(1, 2).numpy(), atol=1e-3)


def test_rope_scores_depend_only_on_relative_position():
  """q.k after RoPE is a function of the position difference alone (and rotations keep norms)."""
  inv = T.rope_inverse_frequencies(FAMILY_CONFIGS["llama3_rope"])
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, BASE.resolved_head_dim)).astype(np.float32)) for _ in range(2))

  def score(m, n):
    pos = lambda p: jnp.full((1, 1), p, jnp.int32)
    return float(jnp.sum(T.apply_rope(q, pos(m), inv) * T.apply_rope(k, pos(n), inv)))

  for m, n in ((5, 2), (0, 9), (40, 40)):
    for shift in (1, 17, 1000):
      np.testing.assert_allclose(score(m + shift, n + shift), score(m, n), atol=1e-4, err_msg=f"{m},{n}+{shift}")
  assert abs(score(5, 2) - score(6, 2)) > 1e-3  # and the difference does matter
  rotated = T.apply_rope(q, jnp.full((1, 1), 123, jnp.int32), inv)
  np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-5)


def test_model_output_is_invariant_to_shifting_every_position():
  """Attention sees positions only through RoPE's relative rotation (and the causal order), so adding a
  constant to every position changes nothing, while spreading the positions out does change the output."""
  cfg = FAMILY_CONFIGS["llama"]
  graph, params = T.split_model(make(cfg))
  model = jax.jit(lambda tokens, positions: nnx.merge(graph, params)(tokens, positions))  # compiled once
  tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 8), 0, cfg.vocab_size)
  positions = jnp.arange(8)[None]
  out = model(tokens, positions)
  np.testing.assert_allclose(model(tokens, positions + 300), out, atol=2e-5)
  assert np.abs(np.asarray(model(tokens, 2 * positions) - out)).max() > 1e-3


def test_bfloat16_compute_keeps_float32_params():
  cfg = dataclasses.replace(BASE, dtype="bfloat16")
  model = make(cfg)
  logits = model(jnp.ones((1, 4), jnp.int32))
  assert logits.dtype == jnp.bfloat16
  _, params = T.split_model(model)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("key,value,match", [
    ("family", "gpt2", "unknown model family 'gpt2'"),
    ("n_kv_heads", 3, "multiple of n_kv_heads"),
    ("remat", "sometimes", "unknown remat policy"),
    ("dtype", "float77", "unknown dtype"),
    ("layer_types", ("full_attention",), "has 1 entries for n_layers=3"),
    ("layer_types", ("full_attention", "local", "full_attention"), r"unknown layer type\(s\) \['local'\]"),
    ("layer_types", "sliding_attention", "must be a list"),
    ("sliding_window", 4, "no layer is 'sliding_attention'"),
    ("qk_norm_per_head", True, "needs qk_norm=True"),
    ("rope_scaling_type", "ntk", "unknown RoPE scaling 'ntk'"),
])
def test_bad_model_config_names_the_key(key, value, match):
  with pytest.raises(ValueError, match=match) as e:
    dataclasses.replace(BASE, **{key: value})
  assert f"config.model.{key}" in str(e.value)


def test_unknown_model_key_is_rejected():
  with pytest.raises(ValueError, match="unknown keys \\['n_layer'\\]"):
    T.TransformerConfig.from_config({"n_layer": 2})


def test_layer_types_from_json_become_a_tuple():
  """A config read back from JSON lists its layer types; the config stays hashable and equal to the original."""
  cfg = FAMILY_CONFIGS["olmo3"]
  again = T.TransformerConfig.from_config(dict(dataclasses.asdict(cfg), layer_types=list(cfg.layer_types)))
  assert again == cfg and hash(again) == hash(cfg)
  with pytest.raises(ValueError, match="config.model.sliding_window: layer_types has 'sliding_attention' layers"):
    dataclasses.replace(cfg, sliding_window=0)


@pytest.mark.parametrize("name", ["llama", "olmo2", "olmo3"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_prefill_then_decode_matches_full_forward(name, scan_layers):
  """Left-padded ragged prompts: prefill into the cache, then one token at a time (olmo3: through a window of 3,
  shorter than the prompts, over a cache that holds every earlier slot)."""
  cfg = dataclasses.replace(FAMILY_CONFIGS[name], scan_layers=scan_layers)
  model = make(cfg)
  rng = np.random.default_rng(3)
  full = rng.integers(3, cfg.vocab_size, (2, 9))
  pad = np.array([2, 0])  # row 0 is a shorter prompt, left-padded by 2
  prompt_len, total = 5, 9
  tokens = full.copy()
  tokens[0, :2] = 0
  segments = np.ones((2, total), np.int32)
  segments[0, :2] = 0
  positions = np.maximum(np.arange(total)[None] - pad[:, None], 0).astype(np.int32)
  cache = T.init_cache(cfg, 2, 12)
  logits_p, cache = model(jnp.asarray(tokens[:, :prompt_len]), jnp.asarray(positions[:, :prompt_len]),
                          jnp.asarray(segments[:, :prompt_len]), cache=cache, cache_index=0)
  step_logits = [logits_p]
  for t in range(prompt_len, total):
    lg, cache = model(jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]),
                      jnp.asarray(segments[:, t:t + 1]), cache=cache, cache_index=t)
    step_logits.append(lg)
  cached = np.concatenate([np.asarray(x) for x in step_logits], axis=1)
  for row in range(2):
    real = slice(pad[row], total)
    ref = model(jnp.asarray(tokens[row:row + 1, real]))[0]
    np.testing.assert_allclose(cached[row, real], ref, atol=2e-5)


# ----------------------------------------------------------------------------- attention kernels, precision




@pytest.fixture
def gpu_checks_stubbed(monkeypatch):
  """jax's cuDNN attention traced on this CPU: its checks for a CUDA build and a GPU say yes (Hopper,
  cuDNN 9.5). Nothing is lowered or run; the traced primitives carry what the kernel would be told."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90500)
  monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda capability: False)


def _grad_attention_calls(cfg, segments: bool, seq: int = 16):
  """(primitive name, params, name stack) of each attention call in the traced gradient of a model loss."""
  graph, params = T.split_model(T.abstract_model(cfg))

  def loss(p, tokens, segment_ids):
    return nnx.merge(graph, p)(tokens, None, segment_ids).astype(jnp.float32).sum()

  tokens = jax.ShapeDtypeStruct((2, seq), jnp.int32)
  jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=() if segments else (2,))(
      params, tokens, tokens if segments else None)
  return [(e.primitive.name, e.params, str(e.source_info.name_stack)) for e in jaxpr_eqns(jaxpr.jaxpr)
          if "dot_product_attention" in e.primitive.name or "attention_" in str(e.source_info.name_stack)]


BF16_GQA = dataclasses.replace(BASE, d_model=64, n_heads=4, n_kv_heads=2, dtype="bfloat16")  # head dim 16


def test_cudnn_attention_is_told_causal_and_one_segment_has_no_bias_or_bias_gradient(gpu_checks_stubbed):
  from jax._src.cudnn.fused_attention_stablehlo import MaskType
  cfg = dataclasses.replace(BF16_GQA, attention="cudnn")
  for segments, want_bias in ((False, False), (True, True)):
    kernels = [(name, p) for name, p, _ in _grad_attention_calls(cfg, segments)
               if name.startswith("dot_product_attention")]
    names = {name for name, _ in kernels}
    assert {"dot_product_attention_fwd_wrapper", "dot_product_attention_bwd_wrapper"} <= names, names
    for name, p in kernels:
      # The kernel skips the upper triangle only when told the mask is causal.
      assert p["mask_type"] == MaskType.CAUSAL, (segments, name, p["mask_type"])
      # (has_bias, has_dbias): one segment and no window: no [B, 1, T, S] bias read, no gradient of it
      # computed; with segment ids the segment mask is still a bias beside the causal flag.
      # (jax >= 0.12 computes no gradient of a bias that is a constant mask: has_dbias may be off with it.)
      has_bias, has_dbias = p["variadic_args"]
      assert has_bias == want_bias and has_dbias in (False, want_bias), (segments, name, p["variadic_args"])


class _FakeDevice:
  def __init__(self, platform, device_kind, compute_capability=None):
    self.platform, self.device_kind, self.compute_capability = platform, device_kind, compute_capability


@pytest.mark.parametrize("device, cfg_change, want", [
    (_FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0"), {}, "cudnn"),
    (_FakeDevice("gpu", "NVIDIA A100-SXM4-80GB", "8.0"), {}, "cudnn"),
    # float32: cuDNN's flash kernel takes bf16/fp16 only; jax's XLA lowering instead.
    (_FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0"), dict(dtype="float32"), "fused"),
    # head dim 192: past the 128 an A100 takes, within the 256 a Hopper takes.
    (_FakeDevice("gpu", "NVIDIA A100-SXM4-80GB", "8.0"), dict(head_dim=192), "fused"),
    (_FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0"), dict(head_dim=192), "cudnn"),
    (_FakeDevice("tpu", "TPU v5 lite"), {}, "fused"),
    (_FakeDevice("cpu", "cpu"), {}, "xla"),
])
def test_auto_attention_follows_the_platform_of_the_mesh_devices(gpu_checks_stubbed, monkeypatch, device,
                                                                 cfg_change, want):
  """`auto` is resolved from the device the model is traced for, not from jax.default_backend() (CPU here)."""
  monkeypatch.setattr(T, "attention_device", lambda: device)
  cfg = dataclasses.replace(BF16_GQA, attention="auto", **cfg_change)
  calls = _grad_attention_calls(cfg, segments=True)
  scopes = {scope.split("/")[-1] for _, _, scope in calls if "attention_" in scope}
  assert {s for s in scopes if s.startswith("attention_")} == {f"attention_{want}"}, scopes
  assert any(name.startswith("dot_product_attention") for name, _, _ in calls) == (want == "cudnn")


def test_attention_without_a_mask_equals_the_one_segment_mask():
  """mask=None (causal only) is the same attention as a one-segment causal mask, on every implementation."""
  b, l, h, k, dh = 2, 6, 4, 2, 8
  rng = np.random.default_rng(5)
  q, key, v = (jnp.asarray(rng.normal(size=(b, l, n, dh)), jnp.float32) for n in (h, k, k))
  positions = jnp.asarray(np.tile(np.arange(l), (b, 1)))
  mask = T.attention_mask(positions, jnp.ones_like(positions), positions, jnp.ones_like(positions))
  ref = T.dot_product_attention(q, key, v, mask, "xla")
  for impl in ("xla", "fused"):
    np.testing.assert_allclose(T.dot_product_attention(q, key, v, None, impl, causal=True), ref, atol=1e-5)
    np.testing.assert_allclose(T.dot_product_attention(q, key, v, mask, impl, causal=True), ref, atol=1e-5)


@pytest.mark.parametrize("precision, want", [("default", None), ("highest", ("HIGHEST", "HIGHEST"))])
def test_matmul_precision_reaches_every_matmul_forward_and_backward(precision, want):
  cfg = dataclasses.replace(BASE, matmul_precision=precision)
  graph, params = T.split_model(T.abstract_model(cfg))

  def loss(p, tokens):
    return nnx.merge(graph, p)(tokens).sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params, jax.ShapeDtypeStruct((2, 8), jnp.int32))
  dots = [e for e in jaxpr_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) > 20  # projections, attention, head, each forward and backward
  got = {None if e.params["precision"] is None else tuple(p.name for p in e.params["precision"]) for e in dots}
  assert got == {want}


def test_matmul_precision_is_checked():
  with pytest.raises(ValueError, match="config.model.matmul_precision: unknown precision 'tf32'"):
    dataclasses.replace(BASE, matmul_precision="tf32")


def test_cudnn_prefill_at_slot_zero_is_causal_and_a_write_at_a_traced_slot_is_not(gpu_checks_stubbed):
  """The sampler's prefill fills a cache as long as the prompt from slot 0: causal by index, so cuDNN is told.
  A write at a traced slot follows earlier cache entries, which the index order does not describe."""
  from jax._src.cudnn.fused_attention_stablehlo import MaskType
  cfg = dataclasses.replace(BF16_GQA, attention="cudnn")
  graph, params = T.split_model(T.abstract_model(cfg))
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)

  def mask_types(cache_len, index_traced):
    def prefill(p, tokens, index):
      cache = T.init_cache(cfg, 2, cache_len)
      ones = jnp.ones_like(tokens)
      return nnx.merge(graph, p)(tokens, jnp.cumsum(ones, 1) - 1, ones, cache=cache,
                                 cache_index=index if index_traced else 0)[0]
    jaxpr = jax.make_jaxpr(prefill)(params, tokens, jnp.int32(0))
    return {e.params["mask_type"] for e in jaxpr_eqns(jaxpr.jaxpr) if e.primitive.name.startswith("dot_product_attention")}

  assert mask_types(8, index_traced=False) == {MaskType.CAUSAL}
  assert mask_types(8, index_traced=True) == {MaskType.NO_MASK}
  assert mask_types(16, index_traced=False) == {MaskType.NO_MASK}  # a cache longer than the tokens written
