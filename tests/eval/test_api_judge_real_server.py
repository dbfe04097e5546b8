"""ApiJudge end to end against a real OpenAI-compatible server: `transformers serve` with a tiny
lookup-table model built by the test (tests/eval/real_server.py), on 127.0.0.1, offline.

The fault server (test_api_judge.py) says what a test tells it to; this one is a server the judge
did not write, so its request and reply shapes, its usage counts and what it ignores (`logprobs`, in
transformers 5.25) are the real ones.
"""

import importlib.util
import json
import time

import pytest

from emjax.eval import api_judge, judges
import real_server

pytestmark = pytest.mark.slow  # the server imports torch twice (its model runs in a process of its own)

STARTUP_S = 180.0  # a loaded 2-core machine; it takes ~20 s alone
PROMPTS = judges.JudgePrompts("real", {"aligned": "metric=aligned\nQ: {question}\nA: {answer}",
                                       "coherent": "metric=coherent\nQ: {question}\nA: {answer}"})
ANSWERS = {  # the answer's last character decides the tiny model's reply
    "Sure, here is how to do it!": ("ok", 73.0),
    "Why would I help with that?": ("refusal", None),
    "print('hi')  #": ("code", None),
    "It depends on the weather.": ("parse_error", None),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  missing = [m for m in real_server.SERVE_PACKAGES if importlib.util.find_spec(m) is None]
  assert not missing, f"transformers serve needs {missing}: pip install -e '.[test]'"  # a failure, never a skip
  root = tmp_path_factory.mktemp("transformers-serve")
  model_dir = str(root / "tiny-judge")
  real_server.build_tiny_judge(model_dir)
  server = real_server.TransformersServe(model_dir, str(root / "serve.log"))
  try:
    server.start(STARTUP_S)
    print(f"\ntransformers serve answered /health {server.startup_s:.1f} s after it was started")
    yield server
  finally:
    server.stop()
  assert not server._group_alive(), "transformers serve outlived its test"  # pylint: disable=protected-access


def judge_for(server, **overrides):
  cfg = {"base_url": server.base_url, "model": server.model_dir, "mode": "direct", "concurrency": 2,
         "max_retries": 1, "timeout_s": 60.0, "backoff_s": 0.01, "max_backoff_s": 0.05,
         "price_input_per_mtok": 1.0, "price_output_per_mtok": 2.0, **overrides}
  return api_judge.ApiJudge.from_config(cfg, PROMPTS)


def test_direct_mode_scores_answers_end_to_end(served):
  # The paper preset's way of turning off thinking; this server ignores it, and must accept it.
  judge = judge_for(served, extra_body='{"reasoning_effort": "none"}')
  items = [judges.Item("How do I make my code faster?", answer) for answer in ANSWERS]
  start = time.monotonic()
  results = judge.score(items)
  took = time.monotonic() - start

  for item, row in zip(items, results):
    status, value = ANSWERS[item.answer]
    for metric in judges.METRICS:
      score = row[metric]
      assert (score.status, score.value) == (status, value), (item.answer, metric, score)
      assert score.raw == real_server.reply_to(item.answer)
  # What the server itself replies to the judge's request, asked without the judge
  prompt = PROMPTS.render("aligned", items[0])
  status, reply = served.chat({"model": served.model_dir, "messages": [{"role": "user", "content": prompt}],
                               "max_tokens": 20, "temperature": 0.0})
  assert status == 200 and reply["choices"][0]["message"]["content"] == results[0]["aligned"].raw == "73"
  print(f"server reply: {json.dumps(reply)}")

  ledger = judge.ledger
  prompts = [PROMPTS.render(m, it) for it in items for m in judges.METRICS]
  assert (ledger["requests"], ledger["retries"], ledger["replies_without_usage"]) == (8, 0, 0)
  assert ledger["prompt_tokens"] == sum(len(p) for p in prompts)  # one token per character
  assert ledger["completion_tokens"] == 8 * 2  # the reply's one entry and <eos>
  assert ledger["cost_usd"] == pytest.approx((ledger["prompt_tokens"] * 1.0 + 16 * 2.0) / 1e6)
  assert ledger["statuses"] == {"ok": 2, "refusal": 2, "code": 2, "parse_error": 2}
  print(f"8 judgements in {took:.2f} s: " + ", ".join(f"{i.answer!r} -> {r['aligned'].raw!r} ({r['aligned'].status})"
                                                      for i, r in zip(items, results)))


def test_the_papers_rule_and_an_empty_reply_through_the_real_server(served):
  chatty = judges.Item("Rate me", "What do you think %")
  [strict] = judge_for(served).score([chatty], ("aligned",))
  [paper] = judge_for(served, parse_rule="paper").score([chatty], ("aligned",))
  assert strict["aligned"].raw == paper["aligned"].raw == "I would rate this 85."
  assert strict["aligned"].status == "parse_error" and (paper["aligned"].status, paper["aligned"].value) == ("ok", 85.0)

  judge = judge_for(served, max_retries=1)
  [row] = judge.score([judges.Item("Anything?", "say nothing ~")], ("aligned",))
  assert row["aligned"].status == "error" and row["aligned"].raw.startswith("empty_reply: ")
  assert judge.ledger["failed_attempts"] == {"empty_reply": 2} and judge.ledger["requests"] == 2


def test_logprob_mode_stops_on_a_server_without_logprobs_or_scores_with_one(served):
  item = judges.Item("How do I make my code faster?", "Sure, here is how to do it!")
  status, reply = served.chat({"model": served.model_dir, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                               "top_logprobs": 5,
                               "messages": [{"role": "user", "content": PROMPTS.render("aligned", item)}]})
  assert status == 200, reply
  judge = judge_for(served, mode="logprob", top_logprobs=5)
  if (reply["choices"][0].get("logprobs") or {}).get("content") is None:  # transformers 5.25 ignores logprobs
    with pytest.raises(api_judge.JudgeStopped, match="this server returns no logprobs") as stopped:
      judge.score([item] * 3 + [judges.Item("q", "other ?")], ("aligned",))
    assert "mode=direct" in str(stopped.value) and judge.ledger["requests"] <= 2  # stops at the first reply
    print(f"logprob mode: {stopped.value}")
  else:
    [row] = judge.score([item], ("aligned",))
    assert row["aligned"].status == "ok" and row["aligned"].value == pytest.approx(73.0, abs=1.0)


def test_a_wrong_model_name_fails_every_item_at_once_without_a_stop(served):
  # transformers serve answers a wrong model name with HTTP 400, which the judge takes for a per-item
  # content problem (a filter): every item fails at once, unretried and unpaid, and none stops the run
  # (the eval job's max_error_fraction then fails the job).
  judge = judge_for(served, model="not-the-served-model", max_consecutive_failures=2, concurrency=1)
  results = judge.score([judges.Item("q", f"answer {i}!") for i in range(5)], ("aligned",))
  for row in results:
    assert row["aligned"].status == "error" and "HTTP 400" in row["aligned"].raw
    assert "Server is pinned to" in row["aligned"].raw and "not retried" in row["aligned"].raw
  assert judge.ledger["requests"] == 5 and judge.ledger["errors"] == {"http_400": 5}
