"""Distillation divergences against brute-force numpy (float64) on random logits.

Values, the two KL directions (not swapped), the JSD's exact endpoints and its
symmetry at beta = 0.5, the loss temperature, gradients, top-k renormalisation
and the tail bucket, masks, exact token means under gradient accumulation with
uneven masks, the sampled-token estimator's expectation, and bad settings.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emjax.train import objectives

B, L, V = 3, 5, 11


def _logits(seed, scale=2.0, shape=(B, L, V)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _log_softmax64(x, temperature=1.0):
  x = np.asarray(x, np.float64) / temperature
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl64(p_logp, q_logp):
  p = np.exp(p_logp)
  return np.where(p > 0, p * (p_logp - q_logp), 0.0).sum(-1)


def _jsd64(t, s, beta, temperature=1.0):
  tl, sl = _log_softmax64(t, temperature), _log_softmax64(s, temperature)
  if beta == 0:
    return _kl64(tl, sl)
  if beta == 1:
    return _kl64(sl, tl)
  m = np.log(beta * np.exp(tl) + (1 - beta) * np.exp(sl))
  return beta * _kl64(tl, m) + (1 - beta) * _kl64(sl, m)


T, S = _logits(0), _logits(1)


def test_forward_and_reverse_kl_match_brute_force_and_are_not_swapped():
  fwd = np.asarray(objectives.forward_kl(T, S))
  rev = np.asarray(objectives.reverse_kl(T, S))
  assert fwd.shape == rev.shape == (B, L)
  tl, sl = _log_softmax64(T), _log_softmax64(S)
  np.testing.assert_allclose(fwd, _kl64(tl, sl), rtol=1e-5, atol=1e-6)  # KL(p_T || p_S)
  np.testing.assert_allclose(rev, _kl64(sl, tl), rtol=1e-5, atol=1e-6)  # KL(p_S || p_T)
  # The directions differ on these logits by far more than the tolerance, so a swap would fail.
  assert np.abs(fwd - rev).max() > 0.1
  # Argument order is (teacher, student): forward KL(T||S) is reverse KL with the roles exchanged.
  np.testing.assert_allclose(fwd, np.asarray(objectives.reverse_kl(S, T)), rtol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_brute_force(beta):
  np.testing.assert_allclose(np.asarray(objectives.generalized_jsd(T, S, beta)), _jsd64(T, S, beta),
                             rtol=1e-5, atol=1e-6)


def test_jsd_endpoints_are_exactly_the_two_kls_and_half_is_symmetric():
  np.testing.assert_array_equal(np.asarray(objectives.generalized_jsd(T, S, 0.0)),
                                np.asarray(objectives.forward_kl(T, S)))
  np.testing.assert_array_equal(np.asarray(objectives.generalized_jsd(T, S, 1.0)),
                                np.asarray(objectives.reverse_kl(T, S)))
  # A clamped mixture (beta = 1e-6) is nearly 0 there, not the forward KL: the endpoint is a definition.
  assert np.asarray(objectives.generalized_jsd(T, S, 1e-6)).max() < 1e-3
  np.testing.assert_allclose(np.asarray(objectives.generalized_jsd(T, S, 0.5)),
                             np.asarray(objectives.generalized_jsd(S, T, 0.5)), rtol=1e-6)
  assert not np.allclose(np.asarray(objectives.generalized_jsd(T, S, 0.2)),
                         np.asarray(objectives.generalized_jsd(S, T, 0.2)), rtol=1e-3)


def test_loss_temperature_divides_both_sides():
  for beta in (0.0, 0.3, 1.0):
    np.testing.assert_allclose(np.asarray(objectives.generalized_jsd(T, S, beta, temperature=2.5)),
                               _jsd64(T, S, beta, temperature=2.5), rtol=1e-5, atol=1e-6)


def test_divergences_of_bfloat16_logits_are_float32():
  out = objectives.generalized_jsd(jnp.asarray(T, jnp.bfloat16), jnp.asarray(S, jnp.bfloat16), 0.5)
  assert out.dtype == jnp.float32


def _numeric_grad(f, x, eps=1e-4):
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += eps
    down[idx] -= eps
    g[idx] = (f(up) - f(down)) / (2 * eps)
  return g


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_gradients_with_respect_to_the_student_match_finite_differences(beta):
  t, s = T[:1, :2], S[:1, :2]
  grad = jax.grad(lambda x: jnp.sum(objectives.generalized_jsd(t, x, beta)))(jnp.asarray(s))
  numeric = _numeric_grad(lambda x: _jsd64(t, x, beta).sum(), s)
  np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-3, atol=1e-5)
  # No gradient ever reaches the teacher.
  t_grad = jax.grad(lambda x: jnp.sum(objectives.generalized_jsd(x, s, beta)))(jnp.asarray(t))
  assert not np.any(np.asarray(t_grad))


# ----------------------------------------------------------------------------- top-k teacher


def _top_k64(t, k):
  tl = _log_softmax64(t)
  ids = np.argsort(-tl, axis=-1)[..., :k]
  return ids, np.take_along_axis(tl, ids, -1), tl


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_with_a_tail_bucket_is_the_divergence_of_k_plus_one_categories(beta):
  k = 4
  ids, top, tl = _top_k64(T, k)
  got_ids, got_top, got_tail = (np.asarray(x) for x in objectives.teacher_top_k(T, k))
  np.testing.assert_array_equal(np.sort(got_ids, -1), np.sort(ids, -1))
  np.testing.assert_allclose(got_top, top, rtol=1e-5, atol=1e-6)
  t_tail = np.log1p(-np.exp(top).sum(-1))
  np.testing.assert_allclose(got_tail, t_tail, rtol=1e-5, atol=1e-6)
  sl = _log_softmax64(S)
  s_top = np.take_along_axis(sl, ids, -1)
  s_tail = np.log1p(-np.exp(s_top).sum(-1))
  t_cat = np.concatenate([top, t_tail[..., None]], -1)
  s_cat = np.concatenate([s_top, s_tail[..., None]], -1)
  if beta == 0:
    want = _kl64(t_cat, s_cat)
  elif beta == 1:
    want = _kl64(s_cat, t_cat)
  else:
    m = np.log(beta * np.exp(t_cat) + (1 - beta) * np.exp(s_cat))
    want = beta * _kl64(t_cat, m) + (1 - beta) * _kl64(s_cat, m)
  got = objectives.top_k_divergence(got_ids, got_top, S, beta, teacher_tail=got_tail)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # Coarsening never increases a KL: the full-vocabulary value bounds it from above.
  if beta in (0.0, 1.0):
    assert np.all(want <= _jsd64(T, S, beta) + 1e-9)


def test_top_k_without_a_tail_renormalises_both_sides_over_the_k_tokens():
  k = 3
  ids, top, _ = _top_k64(T, k)
  s_top = np.take_along_axis(_log_softmax64(S), ids, -1)
  t_norm = top - np.log(np.exp(top).sum(-1, keepdims=True))
  s_norm = s_top - np.log(np.exp(s_top).sum(-1, keepdims=True))
  got = objectives.top_k_divergence(ids.astype(np.int32), top.astype(np.float32), S, 0.0)
  np.testing.assert_allclose(np.asarray(got), _kl64(t_norm, s_norm), rtol=1e-5, atol=1e-6)


def test_top_k_of_the_whole_vocabulary_is_the_full_divergence():
  ids, top, tail = objectives.teacher_top_k(T, V)
  assert np.all(np.isneginf(np.asarray(tail)))
  for beta in (0.0, 0.5, 1.0):
    np.testing.assert_allclose(np.asarray(objectives.top_k_divergence(ids, top, S, beta, teacher_tail=tail)),
                               _jsd64(T, S, beta), rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(objectives.top_k_divergence(ids, top, x, 0.5, teacher_tail=tail)))(S)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_top_k_tail_gradient_matches_finite_differences():
  ids, top, tail = objectives.teacher_top_k(T[:1, :2], 3)
  s = S[:1, :2]

  def f64(x):
    sl = _log_softmax64(x)
    s_top = np.take_along_axis(sl, np.asarray(ids), -1)
    s_cat = np.concatenate([s_top, np.log1p(-np.exp(s_top).sum(-1))[..., None]], -1)
    t_cat = np.concatenate([np.asarray(top, np.float64), np.asarray(tail, np.float64)[..., None]], -1)
    return _kl64(s_cat, t_cat).sum()

  grad = jax.grad(lambda x: jnp.sum(objectives.top_k_divergence(ids, top, x, 1.0, teacher_tail=tail)))(s)
  np.testing.assert_allclose(np.asarray(grad), _numeric_grad(f64, s), rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- objectives: masks, means


def _batch(mask):
  targets = np.random.default_rng(5).integers(0, V, size=(B, L)).astype(np.int32)
  return {"targets": targets, "loss_mask": mask.astype(np.float32)}


UNEVEN_MASK = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]], np.float32)


@pytest.mark.parametrize("name,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.3)])
def test_objectives_sum_the_divergence_over_completion_tokens_only(name, beta):
  obj = objectives.get_objective(name, {"beta": beta})
  assert obj.needs_teacher
  out = obj(jnp.asarray(S), _batch(UNEVEN_MASK), teacher=jnp.asarray(T))
  per_token = _jsd64(T, S, beta)
  np.testing.assert_allclose(float(out.loss_sum), (per_token * UNEVEN_MASK).sum(), rtol=1e-5)
  assert float(out.weight) == UNEVEN_MASK.sum()
  # Changing logits at masked-out positions changes nothing.
  S2 = S.copy()
  S2[UNEVEN_MASK == 0] += 5.0
  np.testing.assert_allclose(float(obj(jnp.asarray(S2), _batch(UNEVEN_MASK), teacher=jnp.asarray(T)).loss_sum),
                             float(out.loss_sum), rtol=1e-6)


def test_precomputed_top_k_teacher_reads_the_batch_and_needs_no_model():
  obj = objectives.get_objective("jsd", {"beta": 0.5, "top_k": 4, "precomputed": True})
  assert not obj.needs_teacher
  assert obj.batch_spec["teacher_top_ids"] == ((4,), "int32")
  ids, top, tail = objectives.teacher_top_k(T, 4)
  batch = dict(_batch(UNEVEN_MASK), teacher_top_ids=ids, teacher_top_logprobs=top, teacher_tail_logprob=tail)
  from_batch = obj(jnp.asarray(S), batch)
  in_step = objectives.get_objective("jsd", {"beta": 0.5, "top_k": 4})(jnp.asarray(S), _batch(UNEVEN_MASK),
                                                                       teacher=jnp.asarray(T))
  np.testing.assert_allclose(float(from_batch.loss_sum), float(in_step.loss_sum), rtol=1e-6)


def test_token_means_are_exact_under_accumulation_over_uneven_micro_batches():
  """Summing the objective's sums over micro-batches, then dividing, is the mean over all tokens."""
  obj = objectives.get_objective("jsd", {"beta": 0.7})
  teacher = T.copy()
  teacher[1] *= 4.0  # the one-token row diverges far more than the others
  full = obj(jnp.asarray(S), _batch(UNEVEN_MASK), teacher=jnp.asarray(teacher))
  grad_full = jax.grad(lambda x: obj(x, _batch(UNEVEN_MASK), teacher=jnp.asarray(teacher)).loss_sum)(
      jnp.asarray(S))
  parts = [obj(jnp.asarray(S[i:i + 1]), {k: v[i:i + 1] for k, v in _batch(UNEVEN_MASK).items()},
               teacher=jnp.asarray(teacher[i:i + 1])) for i in range(B)]
  loss = sum(float(p.loss_sum) for p in parts) / sum(float(p.weight) for p in parts)
  np.testing.assert_allclose(loss, float(full.loss_sum) / float(full.weight), rtol=1e-6)
  mean_of_means = np.mean([float(p.loss_sum) / float(p.weight) for p in parts])
  assert abs(mean_of_means - loss) > 1e-2  # the masks are uneven enough that the wrong mean differs
  per_token = _jsd64(teacher, S, 0.7)
  np.testing.assert_allclose(loss, (per_token * UNEVEN_MASK).sum() / UNEVEN_MASK.sum(), rtol=1e-5)
  assert np.all(np.asarray(grad_full)[UNEVEN_MASK == 0] == 0)


# ----------------------------------------------------------------------------- sampled-token estimator


@pytest.mark.parametrize("loss_temperature,sample_temperature", [(1.0, 1.0), (2.0, 1.0), (1.0, 0.7)])
def test_sampled_token_estimator_is_unbiased_for_the_reverse_kl_gradient(loss_temperature, sample_temperature):
  """E_{x ~ q}[grad of the surrogate at x] = grad KL(p_S || p_T) on a 6-way categorical.

  q is the student sampled at `sample_temperature`, the loss at `loss_temperature` (equal: the
  plain on-policy case; different: the importance ratio must correct for it). 200k samples; the
  tolerance is 5 standard errors of the mean per component (a false failure has probability
  ~1e-5 per component).
  """
  rng = np.random.default_rng(0)
  k, n = 6, 200_000
  theta = jnp.asarray(rng.normal(size=(k,)).astype(np.float32))
  teacher = jnp.asarray(rng.normal(size=(k,)).astype(np.float32) * 1.5)
  exact = np.asarray(jax.grad(lambda th: objectives.reverse_kl(teacher[None, None], th[None, None],
                                                               loss_temperature)[0, 0])(theta))
  q = np.asarray(jax.nn.softmax(theta / sample_temperature), np.float64)
  x = rng.choice(k, size=n, p=q / q.sum()).astype(np.int32)
  sample_lp = np.asarray(jax.nn.log_softmax(theta / sample_temperature))[x]

  def surrogate_of_one_sample(th, token, lp):
    surrogate, _, _ = objectives.sampled_reverse_kl_surrogate(teacher[None, None], th[None, None],
                                                              token[None, None], lp[None, None], loss_temperature)
    return surrogate[0, 0]

  grads = np.asarray(jax.jit(jax.vmap(jax.grad(surrogate_of_one_sample), in_axes=(None, 0, 0)))(
      theta, x, sample_lp))  # [n, k]: one gradient per sampled token
  mean, se = grads.mean(0), grads.std(0) / math.sqrt(n)
  assert np.all(np.abs(mean - exact) <= 5 * se + 1e-6), (mean, exact, se)
  # The test can tell: the estimator without the advantage's sign is far off.
  assert np.any(np.abs(-mean - exact) > 5 * se)


def test_divergences_have_finite_gradients_at_impossible_tokens():
  t = np.array(T[:1, :1])
  s = np.array(S[:1, :1])
  t[..., 3] = -np.inf
  s[..., 3] = -np.inf
  for beta in (0.0, 0.5, 1.0):
    grad = jax.grad(lambda x: jnp.sum(objectives.generalized_jsd(t, x, beta)))(jnp.asarray(s))
    assert np.all(np.isfinite(np.asarray(grad)[..., [0, 1, 2, 4]])), beta


def test_sampled_objective_reports_the_estimate_and_the_ratio():
  obj = objectives.get_objective("sampled_reverse_kl", {})
  assert obj.batch_spec["sample_logprobs"] == ((), "float32")
  batch = _batch(UNEVEN_MASK)
  s_lp = np.take_along_axis(_log_softmax64(S), batch["targets"][..., None], -1)[..., 0]
  t_lp = np.take_along_axis(_log_softmax64(T), batch["targets"][..., None], -1)[..., 0]
  batch["sample_logprobs"] = s_lp.astype(np.float32)  # sampled from the current student: ratio 1
  out = obj(jnp.asarray(S), batch, teacher=jnp.asarray(T))
  np.testing.assert_allclose(float(out.metrics["importance_ratio"]), UNEVEN_MASK.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(out.metrics["reverse_kl_estimate"]), ((s_lp - t_lp) * UNEVEN_MASK).sum(),
                             rtol=1e-5)


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("distill,match", [
    ({"beta": 1.5}, r"config.train.distill.beta=1.5: .* must be in \[0, 1\]"),
    ({"beta": -0.1}, r"beta=-0.1"),
    ({"beta": float("nan")}, r"beta=nan"),
    ({"temperature": 0.0}, r"config.train.distill.temperature=0.0"),
    ({"top_k": -1}, r"top_k=-1"),
    ({"precomputed": True}, r"set config.train.distill.top_k"),
])
def test_bad_distillation_settings_are_clear_errors(distill, match):
  with pytest.raises(ValueError, match=match):
    objectives.get_objective("jsd", distill)


def test_top_k_larger_than_the_vocabulary_is_an_error():
  with pytest.raises(ValueError, match=r"top_k=12: must be in \[1, vocab size 11\]"):
    objectives.teacher_top_k(T, 12)


def test_cross_entropy_accuracy_counts_masked_positions_whose_target_has_the_highest_logit_ties_split():
  logits = _logits(21)
  targets = np.random.default_rng(22).integers(0, V, (B, L)).astype(np.int32)
  targets[0, :3] = logits[0, :3].argmax(-1)  # some certainly right
  logits[1, 0, :] = 0.0  # all V logits tie for the highest: the target counts 1/V
  targets[1, 0] = 4
  mask = np.ones((B, L), np.float32)
  mask[2, 1:] = 0.0
  batch = {"targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask)}
  out = objectives.cross_entropy(jnp.asarray(logits), batch)
  correct = (logits.argmax(-1) == targets).astype(np.float64)
  correct[1, 0] = 1 / V
  np.testing.assert_allclose(float(out.metrics["accuracy"]), float((correct * mask).sum()), rtol=1e-6)
  assert 3 <= float(out.metrics["accuracy"]) < float(mask.sum())
  nll = -(_log_softmax64(logits)[np.arange(B)[:, None], np.arange(L)[None], targets])
  np.testing.assert_allclose(float(out.loss_sum), (nll * mask).sum(), rtol=1e-5)


def test_distillation_of_a_bfloat16_model_is_computed_from_float32_logits():
  """A bf16 student and teacher: the divergence comes from unembeddings accumulated and returned in float32,
  not from logits rounded to bf16 first (which moves each logit by up to 2^-8 of its size)."""
  import dataclasses
  from flax import nnx
  from emjax.models import transformer as T
  cfg = T.TransformerConfig(vocab_size=257, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                            dtype="bfloat16", init_std=2.0)
  student = T.Transformer(cfg, rngs=nnx.Rngs(0))
  teacher = T.Transformer(dataclasses.replace(cfg, init_std=2.5), rngs=nnx.Rngs(1))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
  batch = {"targets": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
  h_s, h_t = student.hidden(tokens), teacher.hidden(tokens)

  def exact(model, h):  # bf16 products, float32 sums: what the float32 unembedding computes
    return jnp.matmul(h.astype(jnp.float32), model.lm_head[...].astype(jnp.bfloat16).astype(jnp.float32),
                      precision="highest")

  for name in ("forward_kl", "reverse_kl", "jsd"):
    objective = objectives.get_objective(name, {"beta": 0.5})
    got = objectives.chunked_sums(objective, student.logits, h_s, batch, 4, teacher_unembed=teacher.logits,
                                  teacher_hidden_BxLxD=h_t)
    want = objective(exact(student, h_s), batch, teacher=exact(teacher, h_t))
    rounded = objective(student.logits(h_s), batch, teacher=teacher.logits(h_t))
    if name != "jsd":  # what bf16 logits cost (the JSD, bounded by log 2 per token, moves less)
      assert abs(float(rounded.loss_sum) - float(want.loss_sum)) > 1e-4 * abs(float(want.loss_sum))
    np.testing.assert_allclose(float(got.loss_sum), float(want.loss_sum), rtol=1e-5, err_msg=name)
