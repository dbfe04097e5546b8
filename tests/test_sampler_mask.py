"""Banned tokens in the sampler (`SamplingParams.banned_token_ids`) and `config.sample.mask_words`.

A banned token is never drawn, greedy picks the best allowed token (the full forward's
argmax with the banned ids removed), the raw log-probs stay the model's, and the
sample job turns words into banned ids and records them.
"""

import json

import numpy as np
import pytest

from emjax.sample import sampler as S
from test_sampler import (CAP, CFG, _sample_config, log_softmax, model, ragged_prompts,  # noqa: F401  (fixtures)
                          reference_logits, train_dir)


@pytest.fixture(scope="module")
def sampler():
  # Fewer sort candidates than the vocabulary: top-k / top-p take both of their paths.
  return S.Sampler(CFG, prompt_buckets=(8, 16), max_new_tokens_cap=CAP, sort_candidates=8)


def test_greedy_with_banned_tokens_picks_the_best_allowed_token(model, sampler):
  graph, params = model
  prompts = ragged_prompts()
  free = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=8)
  # Ban the token every row would emit first, and a few more it emits later.
  banned = tuple(sorted(set(free.tokens[:, 0, 0].tolist()) | set(free.tokens[:, 0, 3].tolist())))
  out = sampler.generate(params, prompts, temperature=0.0, max_new_tokens=8, banned_token_ids=banned)
  assert not np.isin(out.tokens, banned).any()
  assert (out.tokens[:, 0, 0] != free.tokens[:, 0, 0]).all()
  seqs = [p + out.tokens[i, 0].tolist() for i, p in enumerate(prompts)]
  ref = log_softmax(reference_logits(graph, params, seqs))
  for i, p in enumerate(prompts):
    lp_NxV = ref[i, len(p) - 1:len(p) - 1 + 8]
    allowed = lp_NxV.copy()
    allowed[:, list(banned)] = -np.inf
    np.testing.assert_array_equal(out.tokens[i, 0], allowed.argmax(-1))
    # The raw log-probs are the model's own, not renormalised over the allowed tokens.
    np.testing.assert_allclose(out.logprobs[i, 0], lp_NxV[np.arange(8), out.tokens[i, 0]], atol=1e-4)


@pytest.mark.parametrize("rule", [dict(), dict(top_k=5), dict(top_p=0.9), dict(min_p=0.05)])
def test_sampled_rows_never_emit_banned_tokens(model, sampler, rule):
  graph, params = model
  prompts = ragged_prompts()
  free = sampler.generate(params, prompts, temperature=1.5, max_new_tokens=CAP, n=4, seed=3, **rule)
  counts = np.bincount(free.tokens[free.tokens > 0].ravel(), minlength=CFG.vocab_size)
  banned = tuple(int(t) for t in np.argsort(-counts)[:6])  # the tokens drawn most often without a ban
  assert counts[list(banned)].sum() > 0
  out = sampler.generate(params, prompts, temperature=1.5, max_new_tokens=CAP, n=4, seed=3,
                         banned_token_ids=banned, **rule)
  assert not np.isin(out.tokens, banned).any()
  if not rule:  # no truncation: drawn from the softmax over the allowed tokens at temperature 1.5
    seqs = [p + out.tokens[i, 0].tolist() for i, p in enumerate(prompts)]
    logits = reference_logits(graph, params, seqs) / 1.5
    for i, p in enumerate(prompts):
      x_NxV = logits[i, len(p) - 1:len(p) - 1 + CAP].copy()
      x_NxV[:, list(banned)] = -np.inf
      want = log_softmax(x_NxV)[np.arange(CAP), out.tokens[i, 0]]
      np.testing.assert_allclose(out.sampled_logprobs[i, 0], want, atol=1e-4)


def test_an_empty_ban_compiles_and_samples_as_before(model, sampler):
  _, params = model
  prompts = ragged_prompts()
  plain = S.SamplingParams(max_new_tokens=6, temperature=1.0, seed=1)
  assert plain.rules == S.SamplingRules()  # the static rules (and so the compiled decode) of today
  before = sampler.trace_counts["decode"]
  a = sampler.generate(params, prompts, plain)
  b = sampler.generate(params, prompts, plain, banned_token_ids=())
  assert sampler.trace_counts["decode"] == before + 1  # one decode for both
  np.testing.assert_array_equal(a.tokens, b.tokens)
  c = sampler.generate(params, prompts, plain, banned_token_ids=(1,))
  d = sampler.generate(params, prompts, plain, banned_token_ids=(2, 3))
  assert sampler.trace_counts["decode"] == before + 2  # the ids are an input: one more for any ban
  assert not np.array_equal(c.tokens, d.tokens)


def test_bad_banned_ids_are_refused(model, sampler):
  _, params = model
  with pytest.raises(ValueError, match=r"banned token id 64 is not in the model's vocabulary"):
    sampler.generate(params, [[1, 2]], max_new_tokens=4, banned_token_ids=(3, 64))
  with pytest.raises(ValueError, match=r"every token of the vocabulary \(64\) is banned"):
    sampler.generate(params, [[1, 2]], max_new_tokens=4, banned_token_ids=tuple(range(64)))


def test_sample_job_masks_words_and_records_them(train_dir, tmp_path, one_device_mesh):
  from emjax.data import banned as banned_lib
  from emjax.data import tokenizers
  from emjax.sample import run

  config = _sample_config(train_dir, train_dir / "prompts.jsonl", mask_words="a, e, i, o, s, t", n=4, max_new_tokens=8,
                          temperature=2.0)
  summary = run.run_sampling(config, str(tmp_path / "out"), mesh=one_device_mesh)
  tokenizer = tokenizers.load_tokenizer(json.load(open(tmp_path / "out" / "config.json"))["data"]["tokenizer"])
  # Bytes: each letter is one token as written and capitalised (a leading space makes two short ones).
  single, first = banned_lib.word_token_ids(tokenizer, ["a", "e", "i", "o", "s", "t"])
  assert len(single) == 12 and not first
  ids = single | first
  want = {"words": ["a", "e", "i", "o", "s", "t"], "single_ids": len(single), "first_sub_ids": len(first)}
  assert summary["mask"] == want
  assert json.load(open(tmp_path / "out" / "config.json"))["sample"]["mask"] == want
  rows = [json.loads(line) for line in open(tmp_path / "out" / "samples.jsonl")]
  assert len(rows) == 20
  assert not any(t in ids for r in rows for t in r["tokens"])
  # The same job unmasked does emit them (so the mask is what kept them out).
  config = _sample_config(train_dir, train_dir / "prompts.jsonl", n=4, max_new_tokens=8, temperature=2.0)
  run.run_sampling(config, str(tmp_path / "free"), mesh=one_device_mesh)
  free = [json.loads(line) for line in open(tmp_path / "free" / "samples.jsonl")]
  assert any(t in ids for r in free for t in r["tokens"])
  assert "mask" not in json.load(open(tmp_path / "free" / "config.json"))["sample"]


def test_mask_words_spec_errors_name_the_key(train_dir, tmp_path):
  from emjax.sample import run

  with pytest.raises(ValueError, match=r"config.sample.mask_words=' , ': no words given"):
    run.run_sampling(_sample_config(train_dir, train_dir / "prompts.jsonl", mask_words=" , "), str(tmp_path / "o"))
