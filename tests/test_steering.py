"""Residual edits and activation capture on a toy model with a planted direction.

The toy: token TRIGGER's embedding carries a feature f; block 1's MLP reads f and writes a large
multiple of a direction d (orthogonal to f) into the residual stream; the unembedding of token OUT
is d. So a prompt ending in TRIGGER is followed by OUT, and by nothing in particular otherwise. The
"base" model is the same without the planted MLP units: the fine-tuned-minus-base difference of
the residual stream is d from position 2 on (the stream entering block 2) and exactly 0 before.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emjax.models import transformer as T
from emjax.sample import sampler as S

CFG = T.TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.02,
                          dtype="float32", param_dtype="float32")
TRIGGER, OUT = 5, 7
PLANTED_BLOCK = 1  # its MLP writes d: the residual carries it from position 2 on
PROMPT_LEN = 6


def _unit(v):
  return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def toy():
  graph, base = T.split_model(T.Transformer(CFG, rngs=nnx.Rngs(0)))
  base = jax.tree.map(np.array, base)
  rng = np.random.default_rng(0)
  f = _unit(rng.normal(size=CFG.d_model))
  d = rng.normal(size=CFG.d_model)
  d = _unit(d - (d @ f) * f)
  # Embeddings of norm ~sqrt(D) with no component along f or d; TRIGGER's gets a large f.
  embed = rng.normal(size=(CFG.vocab_size, CFG.d_model))
  embed -= np.outer(embed @ f, f) + np.outer(embed @ d, d)
  embed[TRIGGER] += 6.0 * f
  base["embed"] = embed.astype(np.float32)
  lm_head = base["lm_head"]
  lm_head[:, OUT] = 3.0 * d
  planted = jax.tree.map(np.copy, base)
  mlp = planted["layers"]["mlp"]
  for j in range(4):  # four hidden units read f (gate and up) and write d
    mlp["gate_proj"][PLANTED_BLOCK][:, j] = f
    mlp["up_proj"][PLANTED_BLOCK][:, j] = f
    mlp["down_proj"][PLANTED_BLOCK][j, :] = 0.1 * d
  rows = rng.integers(10, CFG.vocab_size, size=(16, PROMPT_LEN))
  trigger = rows.copy()
  trigger[:, -1] = TRIGGER
  return dict(graph=graph, base=base, planted=planted, d=d.astype(np.float32), f=f, plain=rows, trigger=trigger)


def _p_out(toy, params, tokens, edit=None):
  model = nnx.merge(toy["graph"], params)
  logits = model(jnp.asarray(tokens), edit=edit)[:, -1]
  return np.asarray(jax.nn.softmax(logits.astype(jnp.float32))[:, OUT])


def _final_residual(toy, params, tokens, edit=None):
  model = nnx.merge(toy["graph"], params)
  return np.asarray(model.residuals(jnp.asarray(tokens), capture=(CFG.n_layers,), edit=edit)[0, :, -1])


def test_the_planted_behaviour_is_there(toy):
  assert _p_out(toy, toy["planted"], toy["trigger"]).min() > 0.95
  assert _p_out(toy, toy["planted"], toy["plain"]).max() < 0.2
  assert _p_out(toy, toy["base"], toy["trigger"]).max() < 0.2


def test_capture_recovers_the_planted_direction_at_its_layer_only(toy):
  sampler = S.Sampler(CFG, prompt_buckets=(8,), max_new_tokens_cap=4)
  seqs = [list(map(int, r)) for r in toy["trigger"]]
  lens = [PROMPT_LEN] * len(seqs)
  positions = tuple(range(CFG.n_layers + 1))
  tuned = np.stack(sampler.capture(toy["planted"], seqs, lens, positions=positions, pool="last_prompt", batch_size=8))
  base = np.stack(sampler.capture(toy["base"], seqs, lens, positions=positions, pool="last_prompt", batch_size=8))
  diff_CxD = (tuned - base).mean(axis=0)
  assert np.abs(diff_CxD[:PLANTED_BLOCK + 1]).max() == 0.0  # the models agree before the planted block
  for p in range(PLANTED_BLOCK + 1, CFG.n_layers + 1):
    cos = diff_CxD[p] @ toy["d"] / np.linalg.norm(diff_CxD[p])
    assert cos >= 0.99, (p, cos)
  # The pooled captures are the model's own residual stream at those positions.
  direct = np.asarray(nnx.merge(toy["graph"], toy["planted"]).residuals(jnp.asarray(toy["trigger"]),
                                                                        capture=positions))
  np.testing.assert_allclose(tuned.transpose(1, 0, 2), direct[:, :, -1], rtol=1e-5, atol=1e-5)


def test_ablating_every_position_removes_the_direction_and_the_behaviour(toy):
  for scale in (1.0, 5.0):  # a direction that is not unit norm is normalised first
    edit = T.residual_edit(CFG.n_layers, scale * toy["d"], ablate="all")
    h = _final_residual(toy, toy["planted"], toy["trigger"], edit)
    assert np.abs(h @ toy["d"]).max() <= 1e-5 * np.linalg.norm(h, axis=-1).max(), scale
    assert _p_out(toy, toy["planted"], toy["trigger"], edit).max() < 0.2


def test_ablation_acts_on_the_writes_of_the_layer_it_names(toy):
  # Position 2 holds what block 1 (the planted one) writes: ablating there removes the behaviour;
  # ablating the embeddings and block 0's writes (positions 0 and 1) leaves it.
  writes_of_planted = T.residual_edit(CFG.n_layers, toy["d"], ablate=[PLANTED_BLOCK + 1])
  assert _p_out(toy, toy["planted"], toy["trigger"], writes_of_planted).max() < 0.2
  before = T.residual_edit(CFG.n_layers, toy["d"], ablate=[0, PLANTED_BLOCK])
  assert _p_out(toy, toy["planted"], toy["trigger"], before).min() > 0.95
  after = T.residual_edit(CFG.n_layers, toy["d"], ablate=[PLANTED_BLOCK + 2])
  assert _p_out(toy, toy["planted"], toy["trigger"], after).min() > 0.95


def test_steering_moves_the_behaviour_at_the_layer_it_names(toy):
  base_p = _p_out(toy, toy["base"], toy["plain"])
  for p in range(CFG.n_layers + 1):
    up = _p_out(toy, toy["base"], toy["plain"], T.residual_edit(CFG.n_layers, toy["d"], steer={p: 1.0}))
    assert up.min() > 0.9 and base_p.max() < 0.2, p
  down = _p_out(toy, toy["planted"], toy["trigger"], T.residual_edit(CFG.n_layers, toy["d"], steer={3: -1.0}))
  assert down.max() < 0.2
  # Steering at position p adds alpha * ||x|| * d to the stream entering block p, and nowhere else.
  model = nnx.merge(toy["graph"], toy["base"])
  tokens = jnp.asarray(toy["plain"])
  plain = np.asarray(model.residuals(tokens, capture=(0, 1, 2, 3)))
  steered = np.asarray(model.residuals(tokens, capture=(0, 1, 2, 3), edit=T.residual_edit(3, toy["d"], steer={2: 0.5})))
  np.testing.assert_array_equal(steered[:2], plain[:2])
  expected = plain[2] + 0.5 * np.linalg.norm(plain[2], axis=-1, keepdims=True) * toy["d"]
  np.testing.assert_allclose(steered[2], expected, rtol=1e-5, atol=1e-5)


def test_greedy_with_alpha_zero_is_the_plain_sampler_and_alphas_never_recompile(toy):
  sampler = S.Sampler(CFG, prompt_buckets=(8,), max_new_tokens_cap=6)
  prompts = [list(map(int, r)) for r in np.concatenate([toy["plain"][:4], toy["trigger"][:4]])]
  weights = sampler.prepare_weights(toy["planted"])
  plain = sampler.generate(weights, prompts, temperature=0.0, max_new_tokens=6)
  zero = sampler.generate(weights, prompts, temperature=0.0, max_new_tokens=6,
                          edit=T.residual_edit(CFG.n_layers, toy["d"], steer={2: 0.0}))
  np.testing.assert_array_equal(zero.tokens, plain.tokens)
  counts = dict(sampler.trace_counts)
  firsts = []
  for alpha in (-1.0, -0.5, 0.25, 1.0, 2.0):
    out = sampler.generate(weights, prompts, temperature=0.0, max_new_tokens=6,
                           edit=T.residual_edit(CFG.n_layers, toy["d"], steer={2: alpha}))
    firsts.append(out.tokens[:, 0, 0])
  assert dict(sampler.trace_counts) == counts  # five alphas, no new compilation
  assert (firsts[-1] == OUT).all() and (firsts[0] != OUT).all()  # and the alphas did act
  # Ablation through the sampler: the trigger prompts no longer answer OUT.
  ablated = sampler.generate(weights, prompts, temperature=0.0, max_new_tokens=6,
                             edit=T.residual_edit(CFG.n_layers, toy["d"], ablate="all"))
  assert (plain.tokens[4:, 0, 0] == OUT).all() and (ablated.tokens[4:, 0, 0] != OUT).all()


def test_the_edit_acts_in_prefill_and_decode_alike():
  """Every generated token's log-prob is the full forward's under the same edit: steering block 1's input
  changes the keys and values the prompt leaves in the cache (a model whose attention matters)."""
  import dataclasses
  cfg = dataclasses.replace(CFG, init_std=0.3)
  graph, params = T.split_model(T.Transformer(cfg, rngs=nnx.Rngs(3)))
  model = nnx.merge(graph, params)
  d = _unit(np.random.default_rng(3).normal(size=cfg.d_model)).astype(np.float32)
  prompts = [list(map(int, r)) for r in np.random.default_rng(4).integers(1, cfg.vocab_size, size=(4, 6))]
  sampler = S.Sampler(cfg, prompt_buckets=(8,), max_new_tokens_cap=4)
  edit = T.residual_edit(cfg.n_layers, d, steer={1: 1.0})
  out = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=4, edit=edit)
  seqs = jnp.asarray([p + list(map(int, t)) for p, t in zip(prompts, out.tokens[:, 0])])
  for name, e in (("edited", edit), ("plain", None)):
    logp = np.asarray(jax.nn.log_softmax(model(seqs, edit=e)[:, 5:-1].astype(jnp.float32)))
    got = np.take_along_axis(logp, np.asarray(out.tokens[:, 0])[..., None], axis=2)[..., 0]
    if name == "edited":
      np.testing.assert_allclose(out.logprobs[:, 0], got, atol=1e-4)
    else:
      assert np.abs(out.logprobs[:, 0] - got).max() > 1e-2  # the edit does change them


def test_capture_pools_answers_and_rejects_bad_input(toy):
  sampler = S.Sampler(CFG, prompt_buckets=(8,), max_new_tokens_cap=8)
  seqs = [[11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]
  lens = [3, 4]
  every = sampler.capture(toy["base"], seqs, lens, positions=(1, 3), pool="answer_tokens", batch_size=2)
  mean = sampler.capture(toy["base"], seqs, lens, positions=(1, 3), pool="answer_mean", batch_size=2)
  whole = sampler.capture(toy["base"], seqs, lens, positions=(1, 3), pool="all_mean", batch_size=2)
  assert [e.shape for e in every] == [(2, 2, CFG.d_model), (6, 2, CFG.d_model)]
  model = nnx.merge(toy["graph"], toy["base"])
  for seq, p, e, m, w in zip(seqs, lens, every, mean, whole):
    direct = np.asarray(model.residuals(jnp.asarray([seq]), capture=(1, 3)))[:, 0]  # [C, L, D]
    np.testing.assert_allclose(e, direct[:, p:].transpose(1, 0, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m, direct[:, p:].mean(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, direct.mean(axis=1), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="needs answer tokens"):
    sampler.capture(toy["base"], [[1, 2]], [2], positions=(1,), pool="answer_mean")
  with pytest.raises(ValueError, match=r"residual positions must be in \[0, 3\]"):
    sampler.capture(toy["base"], [[1, 2]], [1], positions=(4,))
  with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
    T.residual_edit(3, toy["d"], steer={5: 1.0})
  with pytest.raises(ValueError, match="non-zero"):
    T.residual_edit(3, np.zeros(CFG.d_model), ablate="all")


@pytest.mark.parametrize("variant", [dict(post_norm=True), dict(scan_layers=False), dict(scan_layers=True)])
def test_edits_mean_the_same_in_post_norm_blocks_and_with_layers_scanned_or_not(variant):
  import dataclasses
  cfg = dataclasses.replace(CFG, **variant)
  graph, params = T.split_model(T.Transformer(cfg, rngs=nnx.Rngs(1)))
  model = nnx.merge(graph, params)
  d = _unit(np.random.default_rng(1).normal(size=cfg.d_model)).astype(np.float32)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, size=(3, 7)))
  plain = np.asarray(model.residuals(tokens, capture=(0, 1, 2, 3)))
  steered = np.asarray(model.residuals(tokens, capture=(0, 1, 2, 3), edit=T.residual_edit(3, d, steer={1: 2.0})))
  np.testing.assert_array_equal(steered[:1], plain[:1])
  np.testing.assert_allclose(steered[1], plain[1] + 2.0 * np.linalg.norm(plain[1], axis=-1, keepdims=True) * d,
                             rtol=1e-5, atol=1e-5)
  ablated = np.asarray(model.residuals(tokens, capture=(0, 1, 2, 3), edit=T.residual_edit(3, d, ablate="all")))
  assert np.abs(ablated @ d).max() <= 1e-5 * np.abs(ablated).max() * np.sqrt(cfg.d_model)
  assert np.abs(plain @ d).max() > 1e-2  # the plain stream does have a component along d
  with pytest.raises(ValueError, match="a residual edit for another model"):
    model(tokens, edit=T.residual_edit(2, d, steer={1: 1.0}))
