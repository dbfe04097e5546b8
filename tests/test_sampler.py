"""The sampler: correctness against a full forward pass without cache, sampling rules, seeds,
compilation counts, bad input, sharding, and the resumable `sample` job.

Every reference is a plain forward pass of the same model over prompt + generated
tokens (right-padded, padding in segment 0): by causality, position t's logits there
are the next-token distribution given the first t tokens, so "each generated token is
the argmax of the full forward at its position" is exactly "greedy decoding with no
cache gives the same sequence".
"""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, subprocess_env
from emjax.models import transformer as T
from emjax.sample import sampler as S

# init_std 0.1: peaked next-token distributions, so greedy ties (a flip from float noise) are unlikely.
CFG = T.TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.1)
BUCKETS = (8, 16)
CAP = 12
REF_LEN = 32  # the reference forward pads every sequence to this length (one compilation)


def make_params(cfg=CFG, seed=0):
  return T.split_model(T.Transformer(cfg, rngs=nnx.Rngs(seed)))


@pytest.fixture(scope="module")
def model():
  graph, params = make_params()
  return graph, params


# Fewer sort candidates than the vocabulary (64), so that the rule tests below run both the
# lax.top_k path and its full-sort fallback (see `S.truncate_logits`).
SORT_CANDIDATES = 8


@pytest.fixture(scope="module")
def sampler():
  return S.Sampler(CFG, prompt_buckets=BUCKETS, max_new_tokens_cap=CAP, top_logprobs=3,
                   sort_candidates=SORT_CANDIDATES)


_REF_FNS = {}


def reference_logits(graph, params, sequences):
  """Full-forward logits [N, REF_LEN, V] of each token sequence alone (right padding, segment 0)."""
  key = id(graph)
  if key not in _REF_FNS:
    _REF_FNS[key] = jax.jit(lambda p, t, s: nnx.merge(graph, p)(t, None, s))
  tokens = np.zeros((len(sequences), REF_LEN), np.int32)
  segments = np.zeros((len(sequences), REF_LEN), np.int32)
  for i, seq in enumerate(sequences):
    tokens[i, :len(seq)] = seq
    segments[i, :len(seq)] = 1
  return np.asarray(_REF_FNS[key](params, tokens, segments), np.float64)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ragged_prompts(seed=1, lengths=(3, 11, 7, 1, 16), vocab=CFG.vocab_size):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


def check_against_reference(graph, params, prompts, out, sample_j=0, atol=1e-4):
  """Raw logprobs and top-k equal the full forward; returns the reference logprobs per row."""
  seqs = [p + out.tokens[i, sample_j, :out.lengths[i, sample_j]].tolist() for i, p in enumerate(prompts)]
  ref = log_softmax(reference_logits(graph, params, seqs))
  rows = []
  for i, p in enumerate(prompts):
    n = int(out.lengths[i, sample_j])
    lp_NxV = ref[i, len(p) - 1:len(p) - 1 + n]  # the distribution each generated token was drawn from
    got = out.tokens[i, sample_j, :n]
    np.testing.assert_allclose(out.logprobs[i, sample_j, :n], lp_NxV[np.arange(n), got], atol=atol)
    if out.top_ids is not None:
      k = out.top_ids.shape[-1]
      np.testing.assert_allclose(out.top_logprobs[i, sample_j, :n], -np.sort(-lp_NxV, -1)[:, :k], atol=atol)
    rows.append(lp_NxV)
  return rows


# ----------------------------------------------------------------------------- correctness


def test_greedy_equals_argmax_of_full_forward_for_ragged_batch(model, sampler):
  graph, params = model
  prompts = ragged_prompts()
  out = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=10)
  assert out.tokens.shape == (5, 1, 10)
  assert (out.lengths == 10).all() and (out.finish_reasons == "length").all()
  refs = check_against_reference(graph, params, prompts, out)
  for i, lp in enumerate(refs):
    np.testing.assert_array_equal(out.tokens[i, 0], lp.argmax(-1))
  np.testing.assert_array_equal(out.sampled_logprobs, 0.0)  # greedy: a point mass
  np.testing.assert_array_equal(out.top_ids[:, 0, :, 0], out.tokens[:, 0])


def test_greedy_at_batch_1_with_wide_heads():
  """Batch 1, 8 heads over 4 KV heads of width 64: shapes where XLA:CPU has miscompiled
  decode-attention formulations (jax 0.10.2) that the tiny configs above do not reach."""
  cfg = dataclasses.replace(CFG, d_model=512, n_heads=8, n_kv_heads=4, n_layers=1, init_std=0.05)
  graph, params = make_params(cfg)
  wide = S.Sampler(cfg, prompt_buckets=(16,), max_new_tokens_cap=6)
  prompt = ragged_prompts(seed=12, lengths=(13,))
  out = wide.generate(params, prompt, temperature=0.0, max_new_tokens=6)
  (lp,) = check_against_reference(graph, params, prompt, out)
  np.testing.assert_array_equal(out.tokens[0, 0], lp.argmax(-1))


def _truncated_logprobs_reference(logits_V, temperature, top_k, top_p, min_p):
  """Independent numpy version of temperature -> top-k -> top-p -> min-p (ties kept)."""
  x = logits_V / temperature
  keep = np.ones_like(x, bool)
  if top_k:
    keep &= x >= np.sort(x)[::-1][top_k - 1]
  if top_p < 1:
    p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    p /= p.sum()
    order = np.argsort(-x, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    threshold = x[order][before < top_p].min()
    keep &= x >= threshold
  if min_p:
    p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    keep &= p >= min_p * p.max()
  z = np.where(keep, x, -np.inf)
  return z - np.log(np.exp(z - z.max()).sum()) - z.max()


@pytest.mark.parametrize("rule", [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
                                  dict(temperature=1.0, min_p=0.1),
                                  dict(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05)])
def test_sampled_tokens_logprobs_under_both_distributions(model, sampler, rule):
  graph, params = model
  prompts = ragged_prompts(seed=2)
  out = sampler.generate(params, prompts, max_new_tokens=CAP, n=2, seed=3, **rule)
  for j in range(2):
    refs = check_against_reference(graph, params, prompts, out, sample_j=j)
    seqs = [p + out.tokens[i, j, :out.lengths[i, j]].tolist() for i, p in enumerate(prompts)]
    logits = reference_logits(graph, params, seqs)
    for i, p in enumerate(prompts):
      for t in range(int(out.lengths[i, j])):
        want = _truncated_logprobs_reference(logits[i, len(p) - 1 + t], rule["temperature"], rule.get("top_k", 0),
                                             rule.get("top_p", 1.0), rule.get("min_p", 0.0))
        token = out.tokens[i, j, t]
        assert np.isfinite(want[token]), f"row {i} step {t}: token {token} is outside the truncated support"
        np.testing.assert_allclose(out.sampled_logprobs[i, j, t], want[token], atol=1e-4)
    assert len(refs) == len(prompts)


def test_truncate_logits_matches_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 50)).astype(np.float32) * 2
  logits[0, :3] = logits[0, 3]  # a tie at the top
  for top_k, top_p, min_p in [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (7, 0.5, 0.1), (1, 1.0, 0.0), (0, 1e-6, 0.0)]:
    rules = S.SamplingRules(top_k=top_k > 0, top_p=top_p < 1, min_p=min_p > 0)
    got = np.asarray(S.truncate_logits(jnp.asarray(logits), top_k, top_p, min_p, rules))
    for row in range(logits.shape[0]):
      want = _truncated_logprobs_reference(logits[row].astype(np.float64), 1.0, top_k, top_p, min_p)
      np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(want), err_msg=str((top_k, top_p, min_p)))


def _full_sort_truncate(x_BxV, top_k, top_p, rules):
  """The sampler's top-k -> top-p before its candidate path: a descending sort of the whole vocabulary."""
  vocab = x_BxV.shape[-1]
  sorted_BxV = -jnp.sort(-x_BxV, axis=-1)
  if rules.top_k:
    k = jnp.clip(top_k, 1, vocab)
    kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, k - 1, 1, axis=1)
    x_BxV = jnp.where(x_BxV < kth_Bx1, -jnp.inf, x_BxV)
    sorted_BxV = jnp.where(jnp.arange(vocab) < k, sorted_BxV, -jnp.inf)
  if rules.top_p:
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    x_BxV = jnp.where(x_BxV < threshold_Bx1, -jnp.inf, x_BxV)
  return x_BxV


def test_sort_candidates_sample_exactly_as_a_full_sort():
  """lax.top_k candidates, with the full-sort fallback, give the full sort's support bit for bit and
  so the same tokens for the same keys: top-k within and beyond the candidates, top-p whose nucleus
  fits in them (peaked rows) and whose does not (flat rows), and both together."""
  rng = np.random.default_rng(3)
  vocab, c = 1000, 32
  peaked = (rng.normal(size=(16, vocab)) * 4).astype(np.float32)
  flat = (rng.normal(size=(16, vocab)) * 0.3).astype(np.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 16)

  @jax.jit
  def mass_of_top_c(x):
    return jnp.sum(jax.nn.softmax(x, axis=-1) * (x >= jax.lax.top_k(x, c)[0][:, -1:]), axis=-1)

  @functools.partial(jax.jit, static_argnames=("rules",))
  def both_ways(x, top_k, top_p, rules):
    knobs = {"temperature": jnp.float32(1.0), "top_k": top_k, "top_p": top_p, "min_p": jnp.float32(0.0)}
    got = S.truncate_logits(x, top_k, top_p, 0.0, rules, candidates=c)
    want = _full_sort_truncate(x, top_k, top_p, rules)
    tokens = S.sample_logits(x, keys, knobs, rules, candidates=c)[0]
    return got, want, tokens, jax.vmap(S._categorical)(keys, want)  # pylint: disable=protected-access

  cases = [(peaked, 5, 1.0), (peaked, 200, 1.0), (peaked, 0, 0.9), (flat, 0, 0.9), (flat, 0, 0.02),
           (peaked, 20, 0.8), (flat, 20, 0.8), (flat, 100, 0.5)]
  paths = set()
  for x, top_k, top_p in cases:
    rules = S.SamplingRules(top_k=top_k > 0, top_p=top_p < 1)
    fast = top_k <= c if top_k else bool((mass_of_top_c(x) >= top_p + 1e-3).all())
    paths.add(fast)
    got, want, tokens, want_tokens = map(np.asarray, both_ways(x, jnp.int32(top_k), jnp.float32(top_p), rules))
    np.testing.assert_array_equal(got, want, err_msg=f"top_k={top_k} top_p={top_p}")
    assert np.isfinite(want).sum(-1).min() >= 1
    np.testing.assert_array_equal(tokens, want_tokens, err_msg=f"top_k={top_k} top_p={top_p}")
  assert paths == {True, False}, "the cases must reach both the candidate path and the fallback"


def _vocab_sorts_outside_branches(hlo_text: str, vocab: int) -> tuple[list[str], list[str]]:
  """(computations with a sort over a [.., vocab] array reachable from ENTRY without entering a
  conditional's branch, all computations with such a sort) in HLO text."""
  comps, calls, name = {}, {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name = ("ENTRY " if head.group(1) else "") + head.group(2)
      comps[name], calls[name] = [], []
      continue
    if name is None:
      continue
    comps[name].append(line)
    branch = re.search(r"branch_computations=\{([^}]*)\}", line)
    branches = set()
    if branch:
      branches = {b.strip().lstrip("%") for b in branch.group(1).split(",")}
    for m in re.finditer(r"(?:to_apply|calls|body|condition|true_computation|false_computation)=%?([\w.\-]+)", line):
      calls[name].append((m.group(1), m.group(0).startswith(("true_", "false_"))))
    calls[name].extend((b, True) for b in branches)
  vocab_sort = re.compile(r"\[(?:\d+,)*%d\][^ ]*\)? sort\(" % vocab)
  with_sort = [c for c, lines in comps.items() if any(vocab_sort.search(l) for l in lines)]
  entry = next(c for c in comps if c.startswith("ENTRY "))
  seen, todo = {entry}, [entry]
  while todo:
    for callee, is_branch in calls[todo.pop()]:
      if not is_branch and callee in comps and callee not in seen:
        seen.add(callee)
        todo.append(callee)
  return [c for c in with_sort if c in seen], with_sort


@pytest.mark.parametrize("rule", [dict(top_k=6, top_p=0.9), dict(top_p=0.9)])
def test_decode_step_sorts_the_vocabulary_only_in_the_fallback(model, sampler, rule):
  """The compiled decode loop under top-k / top-p takes lax.top_k; a sort of the whole vocabulary
  exists only inside the fallback branch of a conditional. The optimised HLO is read, since XLA may
  turn a top_k back into a sort (XLA:CPU does when the top_k's output is sliced twice)."""
  _, params = model
  captured = {}
  real = sampler.decode_fn

  def spy(*args, **kwargs):
    captured["args"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), args)
    captured["kwargs"] = kwargs
    return real(*args, **kwargs)

  sampler.decode_fn = spy
  try:
    sampler.generate(params, ragged_prompts(seed=2), temperature=0.9, max_new_tokens=4, **rule)
  finally:
    sampler.decode_fn = real
  hlo = real.lower(*captured["args"], **captured["kwargs"]).compile().as_text()
  outside, anywhere = _vocab_sorts_outside_branches(hlo, CFG.vocab_size)
  assert not outside, f"a full-vocabulary sort on the decode step's main path: {outside}"
  assert anywhere, "the fallback's sort should exist (the parser found none: is it still reading this HLO?)"
  assert '"TopK"' in hlo or re.search(rf"topk\(.*k={SORT_CANDIDATES}\b", hlo), "the candidates come from lax.top_k"


def test_sort_candidates_do_not_change_samples(model, sampler):
  """The same tokens and logprobs with sort candidates 8 (top-k path and fallback) and 0 (always sort)."""
  _, params = model
  always_sort = S.Sampler(CFG, prompt_buckets=BUCKETS, max_new_tokens_cap=CAP, sort_candidates=0)
  prompts = ragged_prompts(seed=13)
  for rule in (dict(temperature=0.9, top_k=6, top_p=0.9), dict(temperature=1.3, top_p=0.7)):
    a = sampler.generate(params, prompts, max_new_tokens=CAP, n=2, seed=4, **rule)
    b = always_sort.generate(params, prompts, max_new_tokens=CAP, n=2, seed=4, **rule)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.sampled_logprobs, b.sampled_logprobs)
  with pytest.raises(ValueError, match=r"sort_candidates must be >= 0"):
    S.Sampler(CFG, sort_candidates=-1)


def test_padding_invariance(model, sampler):
  """A prompt alone (its own, smaller bucket) and in a batch of other lengths: same tokens and logprobs."""
  _, params = model
  prompts = ragged_prompts(seed=4, lengths=(5, 14, 2, 9))
  for rule in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.95)):
    batch = sampler.generate(params, prompts, max_new_tokens=CAP, prompt_seeds=[10, 11, 12, 13], seed=5, **rule)
    for i in (0, 2):  # bucket 8 alone, bucket 16 in the batch
      alone = sampler.generate(params, [prompts[i]], max_new_tokens=CAP, prompt_seeds=[10 + i], seed=5, **rule)
      np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
      np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=1e-5)
      np.testing.assert_allclose(alone.sampled_logprobs[0], batch.sampled_logprobs[i], atol=1e-5)


def test_seeds_reproduce_and_differ(model, sampler):
  _, params = model
  prompts = ragged_prompts(seed=5, lengths=(4, 6))
  a = sampler.generate(params, prompts, temperature=1.0, max_new_tokens=CAP, n=3, seed=7)
  b = sampler.generate(params, prompts, temperature=1.0, max_new_tokens=CAP, n=3, seed=7)
  c = sampler.generate(params, prompts, temperature=1.0, max_new_tokens=CAP, n=3, seed=8)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).any()
  # The n samples of one prompt are different draws.
  assert all((a.tokens[i, 0] != a.tokens[i, 1]).any() for i in range(2))
  # Greedy: the n copies agree with each other and with n=1.
  g3 = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=CAP, n=3)
  g1 = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=CAP)
  np.testing.assert_array_equal(g3.tokens, np.repeat(g1.tokens, 3, axis=1))


def test_stop_tokens_end_rows(model, sampler):
  _, params = model
  prompts = ragged_prompts(seed=6, lengths=(3, 8, 12))
  free = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=CAP)
  stop = int(free.tokens[0, 0, 2])
  out = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=CAP, stop_token_ids=(stop, CFG.vocab_size - 1))
  for i in range(len(prompts)):
    row = free.tokens[i, 0].tolist()
    hits = [t for t, tok in enumerate(row) if tok in (stop, CFG.vocab_size - 1)]
    length = hits[0] + 1 if hits else CAP
    assert out.lengths[i, 0] == length
    assert out.finish_reasons[i, 0] == ("stop" if hits else "length")
    np.testing.assert_array_equal(out.tokens[i, 0, :length], row[:length])  # the stop token is included
    np.testing.assert_array_equal(out.tokens[i, 0, length:], 0)
  assert out.finish_reasons[0, 0] == "stop" and out.lengths[0, 0] <= 3


def test_token_frequencies_match_model_distribution():
  """First-token frequencies at temperature 1 (and under top-k) vs the model's probabilities.

  Tolerance: Pearson chi-square statistic below its 99.9% quantile (df = support - 1), on
  N = 4000 draws; deterministic given the seed.
  """
  from scipy import stats

  cfg = dataclasses.replace(CFG, vocab_size=16, init_std=0.3)
  graph, params = make_params(cfg, seed=1)
  small = S.Sampler(cfg, prompt_buckets=(4,), max_new_tokens_cap=1, sort_candidates=4)  # top_k=4: lax.top_k path
  prompt = [3, 1, 4]
  logits = reference_logits(graph, params, [prompt])[0, len(prompt) - 1]
  num = 4000
  for top_k in (0, 4):
    want = np.exp(_truncated_logprobs_reference(logits, 1.0, top_k, 1.0, 0.0))
    out = small.generate(params, [prompt], temperature=1.0, top_k=top_k, max_new_tokens=1, n=num, seed=11)
    counts = np.bincount(out.tokens[0, :, 0], minlength=cfg.vocab_size)
    support = want > 0
    assert counts[~support].sum() == 0
    expected = num * want[support]
    assert expected.min() > 5, "the chi-square approximation needs expected counts > 5"
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    assert chi2 < stats.chi2.ppf(0.999, df=support.sum() - 1), (top_k, chi2, counts, expected)
    np.testing.assert_allclose(out.sampled_logprobs[0, :, 0], np.log(want[out.tokens[0, :, 0]]), atol=1e-4)


# ----------------------------------------------------------------------------- compilation


def _jit_cache_size(fn):
  size = getattr(fn, "_cache_size", None)  # a private jax API: checked only where it exists
  return size() if callable(size) else None


def test_no_recompilation_for_new_lengths_weights_or_prompts(model, sampler):
  _, params = model
  prompts = ragged_prompts(seed=7, lengths=(9, 12, 16))
  sampler.generate(params, prompts, temperature=0.8, top_p=0.9, max_new_tokens=4, seed=0)
  counts = dict(sampler.trace_counts)
  sizes = [_jit_cache_size(f) for f in (sampler.prefill_fn, sampler.decode_fn, sampler.unstack_fn)]
  new_params = jax.tree.map(lambda x: x * 1.01 + 0.001, params)  # a training step: same shapes, new values
  other = ragged_prompts(seed=8, lengths=(10, 13, 15))  # same bucket (16) and batch size
  out = sampler.generate(new_params, other, temperature=0.6, top_p=0.5, max_new_tokens=CAP, seed=9,
                         stop_token_ids=(1, 2, 3))
  out2 = sampler.generate(params, prompts, temperature=1.2, top_p=0.99, max_new_tokens=7, seed=1)
  assert out.tokens.shape[-1] == CAP and out2.tokens.shape[-1] == 7
  assert dict(sampler.trace_counts) == counts
  assert [_jit_cache_size(f) for f in (sampler.prefill_fn, sampler.decode_fn, sampler.unstack_fn)] == sizes
  # The counters do see a real change of shape (a batch size used nowhere else).
  sampler.generate(params, [[1, 2]], temperature=0.8, top_p=0.9, max_new_tokens=4, pad_batch_to=7)
  assert sampler.trace_counts["prefill"] == counts["prefill"] + 1
  assert sampler.trace_counts["decode"] == counts["decode"] + 1


# ----------------------------------------------------------------------------- bad input


def test_decode_compiler_options_probe_and_fall_back(monkeypatch):
  """The CPU decode option is used where this XLA accepts it, and dropped (not fatal) where it does not."""
  real = dict(S._CPU_DECODE_OPTIONS)  # pylint: disable=protected-access
  monkeypatch.setattr(S, "_cpu_options_supported", None)
  assert S.decode_compiler_options(None) == real  # jax 0.10.2 and 0.12 both have it
  monkeypatch.setattr(S, "_CPU_DECODE_OPTIONS", {"xla_cpu_no_such_option": "1"})
  monkeypatch.setattr(S, "_cpu_options_supported", None)
  assert S.decode_compiler_options(None) == {}


def test_bad_inputs_raise_clear_errors(model, sampler):
  _, params = model
  ok = [[1, 2, 3]]
  cases = [
      (dict(prompts=[[1, 2], []]), r"prompt 1 is empty"),
      (dict(prompts=[list(range(17))]), r"17 tokens is longer than the cache allows.*largest prompt bucket.*16"),
      (dict(stop_token_ids=(CFG.vocab_size,)), r"stop token id 64 is not in the model's vocabulary \[0, 64\)"),
      (dict(stop_token_ids=(-1,)), r"stop token id -1"),
      (dict(n=0), r"n \(samples per prompt\) must be >= 1, got 0"),
      (dict(max_new_tokens=CAP + 1), r"max_new_tokens must be in \[1, 12\]"),
      (dict(max_new_tokens=0), r"max_new_tokens must be in"),
      (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
      (dict(temperature=-1.0), r"temperature must be"),
      (dict(prompts=[[1, 64]]), r"prompt 0 has token ids outside the vocabulary"),
      (dict(prompts=[]), r"no prompts"),
  ]
  for kwargs, message in cases:
    prompts = kwargs.pop("prompts", ok)
    with pytest.raises(ValueError, match=message):
      sampler.generate(params, prompts, **{"max_new_tokens": 4, **kwargs})
  with pytest.raises(ValueError, match=r"prefill_chunk=3 must be a multiple of the data-parallel size"):
    mesh = _mesh((2, 2, 2))
    S.Sampler(CFG, mesh=mesh, prefill_chunk=3)


# ----------------------------------------------------------------------------- layouts and sharding


def _mesh(shape):
  from emjax import sharding
  n = int(np.prod(shape))
  return sharding.make_mesh(dict(data=shape[0], fsdp=shape[1], tensor=shape[2]), devices=jax.devices()[:n])


def test_chunked_prefill_and_scanned_layers_match(model, sampler):
  _, params = model
  prompts = ragged_prompts(seed=9, lengths=(4, 15, 8, 1, 11))
  ref = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=CAP, n=2)
  other = S.Sampler(CFG, prompt_buckets=BUCKETS, max_new_tokens_cap=CAP, prefill_chunk=2, unroll_layers=False)
  out = other.generate(params, prompts, temperature=0.0, max_new_tokens=CAP, n=2)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_sharded_2x2x2_mesh_matches_one_device(model, sampler):
  """Batch over data x fsdp, KV heads over tensor, chunked prefill: same greedy tokens as one device."""
  _, params = model
  prompts = ragged_prompts(seed=10, lengths=(4, 15, 8, 1, 11))
  ref = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=CAP)
  mesh = _mesh((2, 2, 2))
  sharded = S.Sampler(CFG, mesh=mesh, prompt_buckets=BUCKETS, max_new_tokens_cap=CAP, prefill_chunk=4)
  weights = sharded.prepare_weights(sharded.shard_params(params))
  assert weights["layers"][0]["attn"]["k_proj"].sharding.spec[1] == "tensor"  # KV heads over tensor
  out = sharded.generate(weights, prompts, temperature=0.0, max_new_tokens=CAP)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)


# ----------------------------------------------------------------------------- the sample job


def _sample_config(tmp_path, prompts_path, **sample):
  import importlib.util

  spec = importlib.util.spec_from_file_location("sample_config", os.path.join(ROOT, "configs", "sample.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.prompts = str(prompts_path)
  c.sample.update(checkpoint=str(tmp_path / "train"), max_new_tokens=6, batch_size=2, max_prompt_length=32,
                  temperature=1.0, n=2)
  c.sample.update(**sample)
  c.lock()
  return c


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
  """A training workdir as `emjax.train` leaves it: config.json + an orbax checkpoint (byte tokenizer)."""
  from emjax import config as config_lib
  from emjax.train import checkpoint as ckpt_lib
  from emjax.train import settings

  root = tmp_path_factory.mktemp("sample_job")
  train = settings.base_config()
  train.model.update(vocab_size=288, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.1)
  os.makedirs(root / "train")
  config_lib.write_config(train, str(root / "train"))
  _, params = make_params(T.TransformerConfig.from_config(train.model))
  ckpt = ckpt_lib.Checkpointer(str(root / "train" / "checkpoints"), keep=2, async_save=False)
  ckpt.save(5, {"step": jnp.int32(5), "params": params, "opt_state": {"mu": params}}, {"position": 0})
  ckpt.close()
  with open(root / "prompts.jsonl", "w") as f:
    for i, text in enumerate(["hello", "2+2=", "the dog sees", "x", "sort: 3 1 2"]):
      f.write(json.dumps({"id": i if i % 2 else f"p{i}", "prompt": text}) + "\n")
  return root


def _read_rows(path):
  with open(path) as f:
    return sorted((json.dumps(r["id"]), r["sample"], json.dumps(r)) for r in map(json.loads, f))


def test_sample_job_writes_resumes_and_repairs(train_dir, tmp_path, one_device_mesh):
  from emjax.sample import run

  config = _sample_config(train_dir, train_dir / "prompts.jsonl")
  out_dir = tmp_path / "out"
  summary = run.run_sampling(config, str(out_dir), mesh=one_device_mesh)
  assert summary["sampled"] == 5 and summary["checkpoint_step"] == 5
  path = out_dir / "samples.jsonl"
  full = _read_rows(path)
  assert len(full) == 10
  row = json.loads(full[0][2])
  assert set(row) >= {"id", "sample", "text", "tokens", "logprobs", "sampled_logprobs", "finish_reason"}
  assert len(row["tokens"]) == len(row["logprobs"]) <= 6
  # Rerun: nothing left to do.
  assert run.run_sampling(config, str(out_dir), mesh=one_device_mesh)["sampled"] == 0
  # A kill mid-write: the last prompt's second sample lost and a line cut in half.
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.writelines(lines[:-3] + [lines[-3][:25]])
  summary = run.run_sampling(config, str(out_dir), mesh=one_device_mesh)
  assert summary["already_written"] == 3 and summary["sampled"] == 2
  assert _read_rows(path) == full  # the same samples as the uninterrupted run
  assert os.path.exists(str(path) + ".incomplete")
  assert json.loads((out_dir / "COMPLETED").read_text())["sampled"] == 2 and not (out_dir / "FAILED").exists()


def test_sample_job_resumes_only_under_the_settings_and_weights_that_wrote_its_samples(train_dir, tmp_path,
                                                                                      one_device_mesh):
  from emjax import workdir as workdir_lib
  from emjax.sample import run

  out_dir = tmp_path / "out"
  run.run_sampling(_sample_config(train_dir, train_dir / "prompts.jsonl"), str(out_dir), mesh=one_device_mesh)
  before = (out_dir / "samples.jsonl").read_bytes()
  hotter = _sample_config(train_dir, train_dir / "prompts.jsonl")
  with hotter.unlocked():
    hotter.sample.temperature = 0.3
  with pytest.raises(workdir_lib.SettingsMismatch, match=r"sample.temperature: .* -> 0.3"):
    run.run_sampling(hotter, str(out_dir), mesh=one_device_mesh)
  # A newer checkpoint under 'the latest step': the samples of step 5 are not continued with step 7's.
  import shutil
  shutil.copytree(train_dir / "train" / "checkpoints" / "5", train_dir / "train" / "checkpoints" / "7")
  try:
    with pytest.raises(workdir_lib.SettingsMismatch, match=r"weights.step: 5 -> 7"):
      run.run_sampling(_sample_config(train_dir, train_dir / "prompts.jsonl"), str(out_dir), mesh=one_device_mesh)
  finally:
    shutil.rmtree(train_dir / "train" / "checkpoints" / "7")
  assert (out_dir / "samples.jsonl").read_bytes() == before and (out_dir / "COMPLETED").exists()


def test_sample_job_steers_or_ablates_a_direction_from_a_file(train_dir, tmp_path, one_device_mesh):
  from emjax import workdir as workdir_lib
  from emjax.sample import run

  d = np.random.default_rng(0).normal(size=32).astype(np.float32)
  np.save(tmp_path / "d.npy", d)
  np.savez(tmp_path / "dirs.npz", cell=d, other=np.ones(5, np.float32))
  prompts = train_dir / "prompts.jsonl"

  def sample(name, **edit):
    c = _sample_config(train_dir, prompts, temperature=0.0, n=1, edit=dict(dict(direction="", steer="", ablate=""),
                                                                           **edit))
    run.run_sampling(c, str(tmp_path / name), mesh=one_device_mesh)
    with open(tmp_path / name / "samples.jsonl") as f:
      return {json.dumps(r["id"]): (r["tokens"], r["logprobs"][0]) for r in map(json.loads, f)}

  plain = sample("plain")
  assert sample("zero", direction=str(tmp_path / "d.npy"), steer="1:0.0") == plain  # alpha 0: the plain sampler
  steered = sample("steered", direction=str(tmp_path / "d.npy"), steer="1:8.0")
  assert steered != plain
  ablated = sample("ablated", direction=f"{tmp_path / 'dirs.npz'}:cell", ablate="all")
  # The ablation acts: the first token's log-prob moves (its tokens may or may not).
  assert max(abs(ablated[k][1] - plain[k][1]) for k in plain) > 1e-3
  settings = json.loads((tmp_path / "ablated" / "settings.json").read_text())
  assert settings["sample"]["edit"]["ablate"] == "all" and len(settings["sample"]["edit"]["direction_sha256"]) == 16
  assert "edit" not in json.loads((tmp_path / "plain" / "settings.json").read_text())["sample"]
  # Samples written under one edit are not continued under another.
  with pytest.raises(workdir_lib.SettingsMismatch, match=r"sample.edit.steer: '1:8.0' -> '1:2.0'"):
    sample("steered", direction=str(tmp_path / "d.npy"), steer="1:2.0")
  for edit, error, match in [
      (dict(direction=f"{tmp_path / 'dirs.npz'}:other", ablate="all"), ValueError, r"shape \(5,\); this model's .* d_model=32"),
      (dict(direction=f"{tmp_path / 'dirs.npz'}", ablate="all"), ValueError, r"an .npz file needs a name"),
      (dict(direction=f"{tmp_path / 'dirs.npz'}:nope", ablate="all"), ValueError, r"holds \['cell', 'other'\], not 'nope'"),
      (dict(direction=str(tmp_path / "none.npy"), ablate="all"), FileNotFoundError, r"none.npy'?: no such file"),
      (dict(direction=str(tmp_path / "d.npy"), steer="1=2"), ValueError, r"each item is 'position:alpha'"),
      (dict(direction=str(tmp_path / "d.npy"), steer="9:1.0"), ValueError, r"positions \[9\] are outside \[0, 2\]"),
      (dict(direction=str(tmp_path / "d.npy")), ValueError, r"neither config.sample.edit.steer nor .ablate"),
      (dict(ablate="all"), ValueError, r"steer/ablate need config.sample.edit.direction")]:
    with pytest.raises(error, match=match):
      sample("bad", **edit)
  assert not (tmp_path / "bad").exists()


def test_sample_job_reads_a_run_and_prompts_in_a_bucket(train_dir, tmp_path, one_device_mesh, monkeypatch):
  """config.sample.checkpoint and config.prompts in gs:// are read through emjax.paths (a fake bucket):
  the same samples and settings as from their local copies, and nothing written beside the workdir."""
  import shutil
  from fake_gcs import fake_gcs
  from emjax import workdir as workdir_lib
  from emjax.sample import run

  run.run_sampling(_sample_config(train_dir, train_dir / "prompts.jsonl"), str(tmp_path / "local"),
                   mesh=one_device_mesh)
  bucket = tmp_path / "gcs" / "bucket"
  shutil.copytree(train_dir / "train", bucket / "run")
  for step in os.listdir(bucket / "run" / "checkpoints"):  # in a bucket orbax marks a finalised step so
    (bucket / "run" / "checkpoints" / step / "commit_success.txt").write_text("")
  shutil.copy(train_dir / "prompts.jsonl", bucket / "prompts.jsonl")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # a local os.* call on "gs://bucket/..." would land here as gs:/bucket/...
  monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "scratch"))
  with fake_gcs(str(tmp_path / "gcs")):
    config = _sample_config(train_dir, "gs://bucket/prompts.jsonl", checkpoint="gs://bucket/run")
    summary = run.run_sampling(config, str(tmp_path / "remote"), mesh=one_device_mesh)
    assert run.resolve_source(config).directory == "gs://bucket/run"
    # The run's own bucket workdir, staged as the sample job is, is refused as a local one is.
    with pytest.raises(ValueError, match="must not be the checkpoint's own workdir"):
      with workdir_lib.staged("gs://bucket/run") as wd:
        run.run_sampling(config, wd, mesh=one_device_mesh)
    assert not (bucket / "run" / "settings.json").exists()
  assert summary["checkpoint_step"] == 5 and summary["sampled"] == 5
  assert _read_rows(tmp_path / "remote" / "samples.jsonl") == _read_rows(tmp_path / "local" / "samples.jsonl")
  settings = lambda d: json.loads((tmp_path / d / "settings.json").read_text())  # noqa: E731
  assert settings("remote")["prompts"] == settings("local")["prompts"]  # the same file's digest
  assert settings("remote")["weights"] == dict(settings("local")["weights"], path="gs://bucket/run")
  assert os.listdir(cwd) == []


def test_sample_job_rejects_bad_input_before_writing(train_dir, tmp_path):
  from emjax.sample import run

  prompts = tmp_path / "bad.jsonl"
  prompts.write_text('{"id": 1, "prompt": "fine"}\n{"id": 2, "prompt": ""}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2 \(id 2\): the prompt is empty"):
    run.run_sampling(_sample_config(train_dir, prompts), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "samples.jsonl")
  prompts.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
  with pytest.raises(ValueError, match=r"duplicate prompt id 1"):
    run.run_sampling(_sample_config(train_dir, prompts), str(tmp_path / "out"))
  prompts.write_text('{"id": 1, "prompt": "' + "y" * 40 + '"}\n')
  with pytest.raises(ValueError, match=r"41 tokens, more than the largest prompt bucket \(32"):
    run.run_sampling(_sample_config(train_dir, prompts), str(tmp_path / "out"))
  prompts.write_text('{"id": 1, "prompt": "a"}\n')
  with pytest.raises(ValueError, match=r"stop token id 999"):
    run.run_sampling(_sample_config(train_dir, prompts, stop_token_ids=(999,)), str(tmp_path / "out"))
  with pytest.raises(ValueError, match=r"config.sample.n must be >= 1"):
    run.run_sampling(_sample_config(train_dir, prompts, n=0), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match=r"config.sample.checkpoint=.*does not exist"):
    run.run_sampling(_sample_config(train_dir, prompts, checkpoint=str(tmp_path / "nope")), str(tmp_path / "out"))
  config = _sample_config(train_dir, prompts)
  with config.unlocked():
    config.model.d_model = 48
  with pytest.raises(ValueError, match=r"config.model.d_model=48 disagrees with the checkpoint's 32"):
    run.run_sampling(config, str(tmp_path / "out"))
  with pytest.raises(ValueError, match=r"config.sample.hf and config.sample.checkpoint are both set"):
    run.run_sampling(_sample_config(train_dir, prompts, hf=str(tmp_path)), str(tmp_path / "out"))
  config = _sample_config(train_dir, prompts, checkpoint="", hf=str(tmp_path / "some_hf_dir"))
  with config.unlocked():
    config.model.n_layers = 3
  with pytest.raises(ValueError, match=r"config.model.n_layers is set, but with config.sample.hf the architecture"):
    run.run_sampling(config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "samples.jsonl")


def test_chat_template_prompts(tmp_path):
  from tokenizers import Tokenizer as RawTokenizer
  from tokenizers import models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from emjax.data import tokenizers
  from emjax.sample import run

  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "hi", "there", "[UNK]"])}
  raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  hf.save_pretrained(tmp_path / "tok")
  tok = tokenizers.load_tokenizer({"kind": "hf", "path": str(tmp_path / "tok")})
  prompts = tmp_path / "chat.jsonl"
  prompts.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi there"}]}) + "\n"
                     + json.dumps({"id": "b", "prompt": "hi"}) + "\n")
  sc = _sample_config_dict(chat_template=True)
  got = run.read_prompts(str(prompts), tok, sc, 32)
  assert [p.tokens for p in got] == [[3, 5, 6, 4], [3, 5, 4]]
  with pytest.raises(ValueError, match=r"chat.jsonl:1 \(id 'a'\): has 'messages' but config.sample.chat_template"):
    run.read_prompts(str(prompts), tok, _sample_config_dict(chat_template=False), 32)
  with pytest.raises(ValueError, match=r"needs a Hugging Face tokenizer"):
    run.read_prompts(str(prompts), tokenizers.ByteTokenizer(), sc, 32)


def _sample_config_dict(**overrides):
  import ml_collections
  return ml_collections.ConfigDict(dict(dict(chat_template=False, add_bos=True), **overrides))


def test_cli_sample_job(train_dir, tmp_path):
  """`python -m emjax.main --config=configs/sample.py ...` with CLI overrides, including a tuple."""
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "emjax.main", "--config=configs/sample.py:smoke", f"--workdir={out}", "--noprogress",
         f"--config.prompts={train_dir / 'prompts.jsonl'}", f"--config.sample.checkpoint={train_dir / 'train'}",
         "--config.sample.temperature=0", "--config.sample.max_new_tokens=5", "--config.sample.stop_token_ids=(2,3)",
         "--config.sample.max_prompt_length=32"]
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(out / "samples.jsonl")]
  assert len(rows) == 5 and all(r["sample"] == 0 and len(r["tokens"]) <= 5 for r in rows)
  assert all(r["sampled_logprobs"] == [0.0] * len(r["tokens"]) for r in rows)  # greedy


def test_the_sample_job_writes_the_same_answers_with_static_and_continuous_batching(train_dir, tmp_path,
                                                                                   one_device_mesh):
  from emjax.sample import run

  got = {}
  for batching in ("continuous", "static"):
    config = _sample_config(train_dir, train_dir / "prompts.jsonl", batching=batching, temperature=0.0)
    run.run_sampling(config, str(tmp_path / batching), mesh=one_device_mesh)
    rows = [json.loads(line) for line in open(tmp_path / batching / "samples.jsonl")]
    got[batching] = [(r["id"], r["sample"], r["tokens"]) for r in rows]  # in the file's order
  assert len(got["static"]) == 10 and got["continuous"] == got["static"]
