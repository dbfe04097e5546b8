"""Continuous batching (emjax.sample.continuous): the static sampler's answers, row for row, from a
few slots refilled as rows stop; compiled programs bounded; stop ids, limits and edits carried over."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from emjax.models import transformer as T
from emjax.sample import continuous as C
from emjax.sample import sampler as S

CFG = T.TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.1)
BUCKETS = (8, 16)
CAP = 12


@pytest.fixture(scope="module")
def params():
  return T.split_model(T.Transformer(CFG, rngs=nnx.Rngs(0)))[1]


@pytest.fixture(scope="module")
def static():
  return S.Sampler(CFG, prompt_buckets=BUCKETS, max_new_tokens_cap=CAP, top_logprobs=3)


def prompts(count, seed=1):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, CFG.vocab_size, size=int(rng.integers(1, 17))).tolist() for _ in range(count)]


def same(a: S.SampleOutput, b: S.SampleOutput, *, logprob_atol=1e-4):
  np.testing.assert_array_equal(a.lengths, b.lengths)
  np.testing.assert_array_equal(a.finish_reasons, b.finish_reasons)
  for i in range(a.tokens.shape[0]):
    for j in range(a.tokens.shape[1]):
      m = a.lengths[i, j]
      np.testing.assert_array_equal(a.tokens[i, j, :m], b.tokens[i, j, :m])
      np.testing.assert_allclose(a.logprobs[i, j, :m], b.logprobs[i, j, :m], atol=logprob_atol)
      np.testing.assert_allclose(a.sampled_logprobs[i, j, :m], b.sampled_logprobs[i, j, :m], atol=logprob_atol)
      np.testing.assert_array_equal(a.top_ids[i, j, :m], b.top_ids[i, j, :m])
      np.testing.assert_allclose(a.top_logprobs[i, j, :m], b.top_logprobs[i, j, :m], atol=logprob_atol)


@pytest.mark.parametrize("sampling", [
    S.SamplingParams(temperature=0.0, max_new_tokens=CAP, stop_token_ids=(3, 7)),
    S.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, stop_token_ids=(3, 7), n=2, seed=5),
], ids=["greedy", "sampled_n2"])
def test_the_answers_are_the_static_samplers_row_for_row(params, static, sampling):
  ps = prompts(13)
  ref = static.generate(params, ps, sampling)
  cont = C.ContinuousSampler(static, slots=4, chunk_steps=3)
  got = cont.generate(params, ps, sampling)
  assert (ref.finish_reasons == "stop").any() and (ref.lengths < sampling.max_new_tokens).any()  # rows stop early
  same(got, ref)


def test_a_prefill_of_several_prompts_waits_for_free_slots(params, static):
  """Prompts are prefilled `prefill_rows` at a time (the weights read once for several) and their rows
  wait for slots that free one by one: one prefill per 4 prompts of a bucket, and the static answers."""
  ps = prompts(13, seed=6)
  sampling = S.SamplingParams(temperature=1.0, max_new_tokens=CAP, stop_token_ids=(3, 7), n=2, seed=2)
  cont = C.ContinuousSampler(static, slots=4, chunk_steps=2, prefill_rows=4)
  got = cont.generate(params, ps, sampling)
  per_bucket = np.bincount([BUCKETS.index(static.bucket_for(len(p))) for p in ps])
  assert cont.stats["prefills"] == sum(-(-int(c) // 4) for c in per_bucket), (cont.stats, per_bucket)
  same(got, static.generate(params, ps, sampling))


def test_per_prompt_limits_end_each_row_at_its_own_length(params, static):
  ps = prompts(9, seed=4)
  limits = [1 + (i * 5) % CAP for i in range(9)]
  sampling = S.SamplingParams(temperature=0.0, max_new_tokens=CAP)
  ref = static.generate(params, ps, sampling, max_new_tokens_per_prompt=limits)
  got = C.ContinuousSampler(static, slots=4, chunk_steps=2).generate(params, ps, sampling,
                                                                     max_new_tokens_per_prompt=limits)
  same(got, ref)
  assert (ref.lengths[:, 0] <= limits).all() and (ref.lengths[:, 0] == limits).sum() >= 5
  with pytest.raises(ValueError, match="max_new_tokens_per_prompt"):
    static.generate(params, ps, sampling, max_new_tokens_per_prompt=[CAP + 1] * 9)


def test_compiled_programs_do_not_grow_with_the_run(params):
  static = S.Sampler(CFG, prompt_buckets=BUCKETS, max_new_tokens_cap=CAP)
  cont = C.ContinuousSampler(static, slots=4, chunk_steps=4)
  sampling = S.SamplingParams(temperature=0.0, max_new_tokens=CAP, stop_token_ids=(3,))
  for seed in range(2, 8):
    cont.generate(params, prompts(17, seed=seed), dataclasses.replace(sampling, max_new_tokens=4 + seed))
  counts = dict(cont.trace_counts)
  # A cache and a decode per cache width (the widest bucket of a call), a prefill and an insertion per
  # prompt bucket, however many prompts pass.
  assert counts["continuous_decode"] == counts["continuous_init"] <= len(BUCKETS)
  assert counts["prefill"] == len(BUCKETS) and counts["continuous_insert"] <= len(BUCKETS) ** 2
  cont.generate(params, prompts(17, seed=2), dataclasses.replace(sampling, max_new_tokens=6))
  assert dict(cont.trace_counts) == counts


def test_a_prompt_gets_the_same_bits_whatever_runs_beside_it(params, static):
  """What a resumed job needs: the prompts left over from a killed run get the answers, log-probs
  included, that the uninterrupted run gave them."""
  ps = prompts(11, seed=9)
  # top-p with fewer sort candidates than the vocabulary: some rows take the full sort, some not.
  sampling = S.SamplingParams(temperature=1.5, top_p=0.9, max_new_tokens=CAP, n=2, stop_token_ids=(3,))
  static = S.Sampler(CFG, prompt_buckets=BUCKETS, max_new_tokens_cap=CAP, sort_candidates=8)
  cont = C.ContinuousSampler(static, slots=6, chunk_steps=3, prefill_rows=2)
  seeds = list(range(100, 111))
  full = cont.generate(params, ps, sampling, prompt_seeds=seeds)
  # The n samples of a prompt share its prefill: fewer prefills than 2-row groups of 22 sample rows.
  assert cont.stats["prefills"] < 11, cont.stats
  part = dict(cont.stream(params, ps[7:], sampling, prompt_seeds=seeds[7:],
                          cache_bucket=max(static.bucket_for(len(p)) for p in ps)))
  part = S.SampleOutput(**{f: (None if getattr(part[0], f) is None else
                               np.concatenate([getattr(part[i], f) for i in range(len(ps) - 7)]))
                           for f in ("tokens", "lengths", "finish_reasons", "logprobs", "sampled_logprobs",
                                     "prompt_lengths", "top_ids", "top_logprobs")})
  np.testing.assert_array_equal(full.tokens[7:], part.tokens)
  np.testing.assert_array_equal(full.logprobs[7:], part.logprobs)
  np.testing.assert_array_equal(full.sampled_logprobs[7:], part.sampled_logprobs)


def test_a_prompt_joining_a_running_batch_gets_the_bits_it_gets_alone(params):
  """What the server relies on (`continuous.Batch`): a prompt added between decode chunks, beside rows
  already part-way through, is answered with the same bits as in a batch of its own."""
  sampling = S.SamplingParams(temperature=1.0, max_new_tokens=CAP, stop_token_ids=())
  static = S.Sampler(CFG, prompt_buckets=BUCKETS, max_new_tokens_cap=CAP)
  cont = C.ContinuousSampler(static, slots=4, chunk_steps=2, prefill_rows=1)
  ps = prompts(6, seed=4)
  busy = C.Batch(cont, params, sampling, cache_bucket=16)
  for i in range(3):
    busy.add(("early", i), ps[i], seed=i, limit=CAP)
  got = dict(busy.step())
  assert not got and not busy.idle  # the early rows are part-way through
  for i in range(3, 6):
    busy.add(i, ps[i], seed=i, limit=CAP - i)
  while not busy.idle:
    got.update(busy.step())
  assert set(got) == {("early", 0), ("early", 1), ("early", 2), 3, 4, 5}
  for i in range(3, 6):
    alone = C.Batch(cont, params, sampling, cache_bucket=16)
    alone.add("x", ps[i], seed=i, limit=CAP - i)
    ref = {}
    while not alone.idle:
      ref.update(alone.step())
    assert got[i].lengths[0, 0] == CAP - i
    np.testing.assert_array_equal(got[i].tokens, ref["x"].tokens)
    np.testing.assert_array_equal(got[i].logprobs, ref["x"].logprobs)
  twice = C.Batch(cont, params, sampling, cache_bucket=16)
  twice.add("x", ps[0], seed=0, limit=1)
  with pytest.raises(ValueError, match="already in this batch"):
    twice.add("x", ps[1], seed=1, limit=1)
  with pytest.raises(ValueError, match="does not fit"):
    C.Batch(cont, params, sampling, cache_bucket=8).add("y", [1] * 9, seed=0, limit=1)


def test_staged_prompts_keep_their_own_answers_through_cancels_reused_keys_and_mixed_buckets(params):
  """The server's use of a `Batch` with prefills of 4 prompts: prompts of two buckets arrive interleaved,
  one is cancelled and its key added again with another prompt, and a finished prompt's key is reused
  while the prefill that held it still feeds slots; each answer is the one its own prompt gets alone."""
  sampling = S.SamplingParams(temperature=1.0, max_new_tokens=CAP, stop_token_ids=(), n=2, seed=4)
  static = S.Sampler(CFG, prompt_buckets=BUCKETS, max_new_tokens_cap=CAP)
  cont = C.ContinuousSampler(static, slots=4, chunk_steps=2, prefill_rows=4)
  rng = np.random.default_rng(11)
  make = lambda size: rng.integers(1, CFG.vocab_size, size=size).tolist()  # noqa: E731
  asked = {}  # key -> (tokens, seed, limit) of the prompt the key holds last

  def add(batch, key, tokens, seed, limit):
    batch.add(key, tokens, seed=seed, limit=limit)
    asked[key] = (tokens, seed, limit)

  def alone(tokens, seed, limit):
    b = C.Batch(cont, params, sampling, cache_bucket=16)
    b.add("x", tokens, seed=seed, limit=limit)
    out = {}
    while not b.idle:
      out.update(b.step())
    return out["x"]

  batch = C.Batch(cont, params, sampling, cache_bucket=16)
  add(batch, "s0", make(5), 0, 1)  # done after one step: its key comes back while its prefill still feeds slots
  for i in range(1, 4):
    add(batch, f"s{i}", make(3 + i), i, CAP)
  got = dict(batch.step())
  assert set(got) == {"s0"} and batch.stage is not None and "s0" in batch.stage["rows"]
  add(batch, "s0", make(6), 10, 3)  # the same key, another prompt: prefilled anew, never the staged one
  add(batch, "l0", make(12), 11, 4)  # another bucket between prompts of the first
  add(batch, "s4", make(2), 12, 5)
  assert batch.cancel(lambda k: k == "s3") == 2
  add(batch, "s3", make(14), 13, 2)  # a cancelled key, added again with a longer prompt
  while not batch.idle:
    got.update(batch.step())
  assert set(got) == set(asked)
  assert not batch.cancelled and not batch.left
  for key, (tokens, seed, limit) in asked.items():
    ref = alone(tokens, seed, limit)
    np.testing.assert_array_equal(got[key].lengths, ref.lengths, err_msg=key)
    np.testing.assert_array_equal(got[key].tokens, ref.tokens, err_msg=key)
    np.testing.assert_array_equal(got[key].logprobs, ref.logprobs, err_msg=key)
  assert batch.stage is None  # freed once used up
  # A key cancelled and added again with another prompt while the prefill that held it still feeds slots.
  again = C.Batch(cont, params, sampling, cache_bucket=16)
  asked = {}
  for i in range(4):
    add(again, f"t{i}", make(2 + i), 20 + i, CAP)
  assert not again.step() and "t3" in again.stage["rows"]  # t0, t1 decode; t2, t3 wait in the stage
  assert again.cancel(lambda k: k == "t3") == 2
  add(again, "t3", make(7), 30, 6)
  got, prefills = {}, cont.stats["prefills"]
  while not again.idle:
    got.update(again.step())
  assert cont.stats["prefills"] == prefills + 1 and again.stage is None
  for key, (tokens, seed, limit) in asked.items():
    np.testing.assert_array_equal(got[key].tokens, alone(tokens, seed, limit).tokens, err_msg=key)
  # A prompt cancelled with one sample decoding and one waiting: never returned, and its key free again
  # once that row ends.
  odd = C.Batch(C.ContinuousSampler(static, slots=3, chunk_steps=2), params, sampling, cache_bucket=16)
  odd.add("q0", make(4), seed=0, limit=CAP)
  odd.add("q1", make(4), seed=1, limit=CAP)
  assert not odd.step() and len(odd.pending) == 1
  assert odd.cancel(lambda k: k == "q1") == 1 and odd.cancelled == {"q1"}
  with pytest.raises(ValueError, match="already in this batch"):
    odd.add("q1", make(4), seed=1, limit=CAP)
  done = {}
  while not odd.idle:
    done.update(odd.step())
  assert set(done) == {"q0"} and not odd.cancelled and not odd.left and not odd.partial


def test_prompts_come_out_in_the_static_samplers_order(params, static):
  ps = prompts(10, seed=3)
  order = [i for i, _ in C.ContinuousSampler(static, slots=3).stream(params, ps, max_new_tokens=CAP)]
  assert order == sorted(range(10), key=lambda i: (static.bucket_for(len(ps[i])), i))


def test_an_ablation_is_the_static_samplers_too(params, static):
  d = np.random.default_rng(0).normal(size=CFG.d_model)
  edit = T.residual_edit(CFG.n_layers, d / np.linalg.norm(d), ablate="all")
  ps = prompts(6, seed=7)
  sampling = S.SamplingParams(temperature=0.0, max_new_tokens=CAP)
  ref = static.generate(params, ps, sampling, edit=edit)
  got = C.ContinuousSampler(static, slots=2, chunk_steps=5).generate(params, ps, sampling, edit=edit)
  same(got, ref)
  plain = static.generate(params, ps, sampling)
  assert not np.array_equal(plain.tokens, got.tokens)


def test_bad_arguments_are_refused(params, static):
  with pytest.raises(ValueError, match="slots"):
    C.ContinuousSampler(static, slots=0)
  with pytest.raises(ValueError, match="prefill_rows"):
    C.ContinuousSampler(static, slots=2, prefill_rows=3)
  cont = C.ContinuousSampler(static, slots=2)
  with pytest.raises(ValueError, match="longer than the cache allows"):
    cont.generate(params, [[1] * 17], max_new_tokens=CAP)
  with pytest.raises(ValueError, match="empty"):
    cont.generate(params, [[]], max_new_tokens=CAP)
