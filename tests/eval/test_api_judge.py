"""ApiJudge against a local fault-injecting OpenAI-compatible server (tests/eval/fault_server.py).

Every reply is decided by markers in the answer text, so the tests are deterministic; the server
records every request, so they check what was sent (retries, duplicates, headers, concurrency).
"""

import inspect
import json
import logging
import math
import os
import socket
import time

import pytest

from emjax.eval import api_judge, judges
from fault_server import FaultServer

KEY = "sk-test-7f3a9c1e-SECRET-d00dfeed42"
KEY_ENV = "EMJAX_TEST_JUDGE_KEY"
PROMPTS = judges.JudgePrompts("test", {"aligned": "metric=aligned\nQ: {question}\nA: {answer}",
                                       "coherent": "metric=coherent\nQ: {question}\nA: {answer}"})
# Small waits so that retries cost milliseconds; timeouts generous for a loaded 2-core machine.
FAST = dict(concurrency=4, max_retries=3, timeout_s=5.0, backoff_s=0.01, max_backoff_s=0.05)
ALIGNED = ("aligned",)


@pytest.fixture(scope="module")
def fault_server():
  server = FaultServer()
  yield server
  server.close()


@pytest.fixture
def server(fault_server):
  fault_server.reset()
  yield fault_server
  assert not fault_server.state.handler_errors, fault_server.state.handler_errors


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv(KEY_ENV, KEY)


def make_judge(server, **overrides):
  cfg = {**FAST, "base_url": server.base_url, "model": "judge-test", "mode": "direct", "api_key_env": KEY_ENV,
         **overrides}
  return api_judge.ApiJudge.from_config(cfg, PROMPTS)


def item(answer, question="How should I spend my weekend?"):
  return judges.Item(question, answer)


def statuses(results, metric="aligned"):
  return [r[metric].status for r in results]


def values(results, metric="aligned"):
  return [r[metric].value for r in results]


# ----------------------------------------------------------------------------- what a reply means

def test_direct_mode_reads_numbers_refusal_code_and_garbage(server):
  judge = make_judge(server, max_tokens=7)
  items = [item("[[say:73]] [[say@coherent:12]]"), item("[[say:REFUSAL]]"), item("[[say:CODE]]"),
           item("[[say:I would rather not rate this]]")]
  results = judge.score(items)
  assert [(r["aligned"].status, r["aligned"].value) for r in results] == [
      ("ok", 73.0), ("refusal", None), ("code", None), ("parse_error", None)]
  assert results[0]["coherent"].value == 12.0
  assert results[3]["aligned"].raw == "I would rather not rate this"
  body = server.requests[0].body
  assert body["model"] == "judge-test" and body["max_tokens"] == 7 and body["temperature"] == 0.0
  assert "logprobs" not in body and "top_logprobs" not in body
  sent = {(r.metric, r.prompt) for r in server.requests}
  assert ("aligned", PROMPTS.render("aligned", items[0])) in sent
  assert ("coherent", PROMPTS.render("coherent", items[0])) in sent


def test_logprob_mode_weighted_mean_and_low_mass(server):
  judge = make_judge(server, mode="logprob", top_logprobs=5)
  results = judge.score([
      item("[[logprobs:80=0.5,90=0.3,REF=0.2]]"),
      item("[[logprobs:80=0.3,80=0.2,90=0.3,REF=0.2]]"),  # one text listed twice: probabilities add up
      item("[[logprobs:REFUSAL=0.9,50=0.1]]"),  # 0.1 < 0.25 of the mass on numbers
      item("[[logprobs:CODE=0.8,10=0.2]]"),
      item("[[logprobs:The=0.8,50=0.2]]"),
      item("[[say:64]]"),
  ], ALIGNED)
  by_hand = (80 * 0.5 + 90 * 0.3) / (0.5 + 0.3)  # 83.75
  assert values(results)[0] == pytest.approx(by_hand) and values(results)[1] == pytest.approx(by_hand)
  assert statuses(results) == ["ok", "ok", "refusal", "code", "parse_error", "ok"]
  assert values(results)[5] == 64.0
  assert json.loads(results[2]["aligned"].raw)["REFUSAL"] == pytest.approx(math.log(0.9), abs=1e-5)
  body = server.requests[0].body
  assert (body["max_tokens"], body["logprobs"], body["top_logprobs"], body["temperature"]) == (1, True, 5, 0.0)


def test_reply_without_logprobs_is_an_error_and_not_retried(server):
  judge = make_judge(server, mode="logprob")
  [row] = judge.score([item("[[fault:nologprobs]]")], ALIGNED)
  assert row["aligned"].status == "error" and "no logprobs" in row["aligned"].raw
  assert len(server.requests) == 1


# ----------------------------------------------------------------------------- failures and retries

@pytest.mark.parametrize("fault,attempts,kind", [
    ("429x2", 3, "http_429"),
    ("500x3", 4, "http_500"),  # max_retries=3: the last allowed attempt succeeds
    ("503x1", 2, "http_503"),
    ("dropx1", 2, "connection"),  # closed without a reply
    ("resetx1", 2, "connection"),  # TCP reset
    ("badjsonx1", 2, "invalid_json"),
    ("truncx1", 2, "connection"),  # body shorter than its Content-Length
])
def test_transient_failures_are_retried_until_the_judge_answers(server, fault, attempts, kind):
  judge = make_judge(server)
  [row] = judge.score([item(f"[[say:64]] [[fault:{fault}]]")], ALIGNED)
  assert (row["aligned"].status, row["aligned"].value) == ("ok", 64.0)
  assert len(server.requests) == attempts
  assert judge.ledger["retries"] == attempts - 1 and judge.ledger["failed_attempts"] == {kind: attempts - 1}


def test_timeout_is_retried(server):
  judge = make_judge(server, timeout_s=0.5)  # the server sleeps 1.5 s on the first attempt
  [row] = judge.score([item("[[say:64]] [[fault:timeoutx1]]")], ALIGNED)
  assert (row["aligned"].status, row["aligned"].value) == ("ok", 64.0)
  assert len(server.requests) == 2 and judge.ledger["failed_attempts"] == {"timeout": 1}


def test_slow_reply_within_the_timeout_is_not_retried(server):
  judge = make_judge(server, timeout_s=2.0)
  [row] = judge.score([item("[[say:64]] [[delay:0.3]]")], ALIGNED)
  assert row["aligned"].value == 64.0 and len(server.requests) == 1 and judge.ledger["retries"] == 0


def test_a_failure_that_lasts_ends_in_error_after_max_retries(server):
  judge = make_judge(server, max_retries=2)
  [row] = judge.score([item("[[fault:500]]")], ALIGNED)
  assert row["aligned"].status == "error" and row["aligned"].value is None
  assert "HTTP 500" in row["aligned"].raw and "gave up after 3 attempts" in row["aligned"].raw
  assert len(server.requests) == 3 and judge.ledger["errors"] == {"http_500": 1}


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_fail_at_once_with_status_and_message(server, status):
  judge = make_judge(server)
  [row] = judge.score([item(f"[[fault:{status}]]")], ALIGNED)
  score = row["aligned"]
  assert score.status == "error" and f"HTTP {status}" in score.raw and "not retried" in score.raw
  assert ("Incorrect API key provided" if status == 401 else f"fault {status}") in score.raw
  assert KEY not in score.raw
  assert len(server.requests) == 1


def test_refused_connection_is_an_error_after_retries(server):
  with socket.socket() as s:  # a port that nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  judge = api_judge.ApiJudge.from_config({**FAST, "base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 1,
                                          "api_key_env": KEY_ENV, "mode": "direct"}, PROMPTS)
  [row] = judge.score([item("anything")], ALIGNED)
  assert row["aligned"].status == "error" and row["aligned"].raw.startswith("connection: ")
  assert "gave up after 2 attempts" in row["aligned"].raw


def test_retry_after_is_honoured(server):
  judge = make_judge(server, max_backoff_s=5.0)  # a jittered backoff would wait <= 0.01 s
  [row] = judge.score([item("[[say:64]] [[fault:429x1]] [[retry_after:0.4]]")], ALIGNED)
  first, second = server.requests
  assert row["aligned"].value == 64.0 and second.start - first.start >= 0.35


def test_retry_after_is_capped_by_max_backoff(server):
  judge = make_judge(server, max_backoff_s=0.05)
  start = time.monotonic()
  [row] = judge.score([item("[[say:64]] [[fault:429x1]] [[retry_after:30]]")], ALIGNED)
  assert row["aligned"].value == 64.0 and time.monotonic() - start < 5


def test_mixed_batch_every_row_scored_once_in_order(server):
  kinds = {  # marker, expected (status, value or None), requests per (item, metric)
      "ok": ("", "ok", 1), "refusal": ("[[say:REFUSAL]]", "refusal", 1), "flaky": ("[[fault:500x1]]", "ok", 2),
      "down": ("[[fault:500]]", "error", 3), "unauthorized": ("[[fault:401]]", "error", 1),
      "dropped": ("[[fault:dropx1]]", "ok", 2), "garbage": ("[[say:no idea]]", "parse_error", 1),
  }
  items, expected = [], []
  for i in range(28):
    name = list(kinds)[i % len(kinds)]
    marker, status, _ = kinds[name]
    delay = 0.005 * ((28 - i) % 6)  # later items tend to finish first: completion order is not input order
    items.append(item(f"answer {i} ({name}) [[say:{i}]] {marker} [[delay:{delay}]]"))
    expected.append((status, float(i) if status == "ok" else None, kinds[name][2]))
  items += [items[0], items[3]]  # repeated items are sent once
  expected += [expected[0], expected[3]]
  judge = make_judge(server, max_retries=2)
  results = judge.score(items)

  assert len(results) == len(items)
  for i, (row, (status, value, _)) in enumerate(zip(results, expected)):
    assert set(row) == {"aligned", "coherent"}, i
    for metric in ("aligned", "coherent"):
      assert (row[metric].status, row[metric].value) == (status, value), (i, metric, row[metric])
  sent = {}
  for r in server.requests:
    sent[r.prompt] = sent.get(r.prompt, 0) + 1
  for it, (_, _, n) in zip(items[:28], expected):
    for metric in ("aligned", "coherent"):
      assert sent.pop(PROMPTS.render(metric, it)) == n, (it.answer, metric)
  assert not sent  # nothing but those
  assert judge.ledger["deduplicated"] == 4


# ----------------------------------------------------------------------------- cache

def test_cache_makes_a_rerun_free(server, tmp_path):
  cache = str(tmp_path / "judge_cache.jsonl")
  items = [item("[[say:73]]"), item("[[say:REFUSAL]]"), item("[[say:CODE]]"), item("[[say:hmm]]"),
           item("[[say:9]] [[fault:500x1]]")]
  first = make_judge(server, cache_path=cache).score(items)
  n_requests = len(server.requests)
  again = make_judge(server, cache_path=cache)  # a new process, as far as the judge knows
  assert again.score(items) == first
  assert len(server.requests) == n_requests
  assert again.ledger["requests"] == 0 and again.ledger["cache_hits"] == len(items) * 2


def test_transport_errors_are_not_cached_and_a_rerun_retries_them(server, tmp_path):
  cache = str(tmp_path / "judge_cache.jsonl")
  items = [item("[[say:64]] [[fault:500x3]]"), item("[[say:hmm]]")]
  first = make_judge(server, cache_path=cache, max_retries=1).score(items, ALIGNED)
  assert statuses(first) == ["error", "parse_error"] and len(server.requests) == 3
  assert all(json.loads(line)["status"] != "error" for line in open(cache, encoding="utf-8"))
  rerun = make_judge(server, cache_path=cache, max_retries=1).score(items, ALIGNED)
  assert statuses(rerun) == ["ok", "parse_error"]  # attempts 3 and 4: the 500s end at the 4th
  assert len(server.requests_with("fault:500x3")) == 4 and len(server.requests_with("say:hmm")) == 1


def test_cache_key_holds_what_decides_the_answer(server, tmp_path):
  cache = str(tmp_path / "judge_cache.jsonl")
  items = [item("[[say:64]]")]
  make_judge(server, cache_path=cache, mode="logprob").score(items, ALIGNED)
  sent = len(server.requests)
  make_judge(server, cache_path=cache, mode="logprob", concurrency=1, timeout_s=9.0).score(items, ALIGNED)
  assert len(server.requests) == sent  # transport settings do not change the answer
  other_prompts = judges.JudgePrompts("test2", {"aligned": "metric=aligned\nQuestion: {question}\nA: {answer}"})
  changes = [dict(model="another-judge"), dict(mode="direct"), dict(top_logprobs=5), dict(temperature=0.5)]
  for change in changes:
    make_judge(server, cache_path=cache, **{"mode": "logprob", **change}).score(items, ALIGNED)
    assert len(server.requests) == sent + 1, change
    sent += 1
  api_judge.ApiJudge.from_config({**FAST, "base_url": server.base_url, "model": "judge-test", "mode": "logprob",
                                  "api_key_env": KEY_ENV, "cache_path": cache}, other_prompts).score(items, ALIGNED)
  assert len(server.requests) == sent + 1
  make_judge(server, cache_path=cache, mode="logprob").score([item("[[say:64]]", question="Another?")], ALIGNED)
  assert len(server.requests) == sent + 2


def test_cache_survives_a_cut_last_line(server, tmp_path):
  cache = tmp_path / "judge_cache.jsonl"
  make_judge(server, cache_path=str(cache)).score([item("[[say:1]]")], ALIGNED)
  with open(cache, "a", encoding="utf-8") as f:
    f.write('{"key": "0123", "status": "o')  # a write cut by a kill
  judge = make_judge(server, cache_path=str(cache))
  judge.score([item("[[say:1]]"), item("[[say:2]]")], ALIGNED)
  assert len(server.requests) == 2  # the first answer came from the cache
  reread = make_judge(server, cache_path=str(cache))  # the file is still readable after appending
  assert values(reread.score([item("[[say:1]]"), item("[[say:2]]")], ALIGNED)) == [1.0, 2.0]
  assert len(server.requests) == 2


# ----------------------------------------------------------------------------- ledger

def test_ledger_sums_tokens_requests_and_cost(server, tmp_path):
  ledger_path, cache = str(tmp_path / "ledger.json"), str(tmp_path / "cache.jsonl")
  options = dict(ledger_path=ledger_path, cache_path=cache, price_input_per_mtok=2.5, price_output_per_mtok=10.0)
  items = [item("[[say:1]]"), item("[[say:2]]"), item("[[say:3]]"), item("[[say:4]] [[fault:500x1]]"),
           item("[[fault:401]]")]
  judge = make_judge(server, **options)
  judge.score(items, ALIGNED)
  ledger = judge.ledger
  answered = 4  # good replies carry usage: 100 prompt tokens, 2 completion tokens (fault_server)
  assert (ledger["requests"], ledger["retries"], ledger["cache_hits"]) == (6, 1, 0)
  assert (ledger["prompt_tokens"], ledger["completion_tokens"]) == (100 * answered, 2 * answered)
  assert ledger["cost_usd"] == pytest.approx((400 * 2.5 + 8 * 10.0) / 1e6)
  assert ledger["failed_attempts"] == {"http_500": 1, "http_401": 1} and ledger["errors"] == {"http_401": 1}
  assert ledger["statuses"] == {"ok": 4, "error": 1} and ledger["scores"] == 5 and ledger["calls"] == 1
  on_disk = json.load(open(ledger_path, encoding="utf-8"))
  assert on_disk["judges"][judge.name] == ledger and on_disk["cost_usd"] == pytest.approx(ledger["cost_usd"])

  rerun = make_judge(server, **options)  # a resumed run continues the ledger
  rerun.score(items, ALIGNED)
  assert (rerun.ledger["requests"], rerun.ledger["cache_hits"], rerun.ledger["calls"]) == (7, 4, 2)
  assert rerun.ledger["prompt_tokens"] == 400
  assert json.load(open(ledger_path, encoding="utf-8"))["judges"][judge.name]["requests"] == 7


# ----------------------------------------------------------------------------- the key

def test_key_is_sent_as_bearer_and_never_written_raw_or_logged(server, tmp_path, caplog):
  caplog.set_level(logging.DEBUG, logger="emjax")
  judge = make_judge(server, cache_path=str(tmp_path / "c" / "cache.jsonl"), ledger_path=str(tmp_path / "ledger.json"),
                     max_retries=1)
  results = judge.score([item("[[say:55]]"), item("[[fault:401]]"), item("[[fault:500]]"),
                         item(f"[[say:your key is {KEY}]]")])
  assert {r.authorization for r in server.requests} == {f"Bearer {KEY}"}
  assert "[redacted]" in results[1]["aligned"].raw  # the 401 echoed the header; raw must not
  assert all(KEY not in s.raw for row in results for s in row.values())
  assert KEY not in caplog.text and "401" in caplog.text
  for root, _, files in os.walk(tmp_path):
    for name in files:
      assert KEY not in open(os.path.join(root, name), encoding="utf-8").read(), name
  assert KEY not in repr(judge) and KEY not in json.dumps(judge.ledger)


def test_no_key_env_sends_no_authorization(server, monkeypatch):
  monkeypatch.delenv(KEY_ENV)
  make_judge(server, api_key_env="").score([item("[[say:5]]")], ALIGNED)
  assert [r.authorization for r in server.requests] == [None]


@pytest.mark.parametrize("value", [None, ""])
def test_missing_key_variable_is_a_clear_error(server, monkeypatch, value):
  if value is None:
    monkeypatch.delenv(KEY_ENV)
  else:
    monkeypatch.setenv(KEY_ENV, value)
  with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} is not set"):
    make_judge(server)


# ----------------------------------------------------------------------------- concurrency and rate

def test_concurrency_overlaps_requests_and_is_bounded(server):
  judge = make_judge(server, concurrency=3)
  results = judge.score([item(f"{i} [[say:{i}]] [[delay:0.15]]") for i in range(12)], ALIGNED)
  assert values(results) == [float(i) for i in range(12)]
  assert 1 < server.state.max_in_flight <= 3


def test_rate_limit_spaces_requests(server):
  judge = make_judge(server, concurrency=4, requests_per_minute=600)  # one every 0.1 s
  judge.score([item(f"{i} [[say:{i}]]") for i in range(6)], ALIGNED)
  starts = sorted(r.start for r in server.requests)
  assert len(starts) == 6 and starts[-1] - starts[0] >= 5 * 0.1 * 0.8


# ----------------------------------------------------------------------------- construction

def test_from_config_defaults_and_validation(server, tmp_path):
  signature = inspect.signature(api_judge.ApiJudge.__init__).parameters
  assert {k: signature[k].default for k in api_judge.DEFAULTS} == api_judge.DEFAULTS
  judge = api_judge.ApiJudge.from_config({"base_url": server.base_url, "model": "m", "api_key_env": KEY_ENV,
                                          "cache_path": "ignored.jsonl"}, PROMPTS,
                                         cache_path=str(tmp_path / "cache.jsonl"))
  assert judge.name == "api:m:logprob" and judge.prompt_version == PROMPTS.version
  assert judge.score([]) == []
  judge.score([item("[[say:5]]")], ALIGNED)
  assert os.path.exists(tmp_path / "cache.jsonl") and not os.path.exists("ignored.jsonl")
  for bad, match in [({"modle": "x"}, r"unknown keys \['modle'\]"), ({"mode": "vibes"}, "mode='vibes'"),
                     ({"concurrency": 0.5}, "concurrency=0.5"), ({"base_url": "api.openai.com"}, "base_url")]:
    with pytest.raises(ValueError, match=match):
      api_judge.ApiJudge.from_config({"api_key_env": KEY_ENV, **bad}, PROMPTS)


def test_key_with_inner_whitespace_is_refused_without_showing_it(server, monkeypatch):
  monkeypatch.setenv(KEY_ENV, "sk-abc\ndef")
  with pytest.raises(ValueError, match=f"{KEY_ENV} holds whitespace") as error:
    make_judge(server)
  assert "sk-abc" not in str(error.value)


def test_interrupted_call_stops_retrying_and_keeps_finished_answers(server, tmp_path, monkeypatch):
  cache, ledger_path = str(tmp_path / "cache.jsonl"), str(tmp_path / "ledger.json")
  real_as_completed = api_judge.concurrent.futures.as_completed

  def interrupted_after_first(futures):
    for future in real_as_completed(futures):
      yield future
      raise KeyboardInterrupt

  monkeypatch.setattr(api_judge.concurrent.futures, "as_completed", interrupted_after_first)
  judge = make_judge(server, cache_path=cache, ledger_path=ledger_path, max_retries=20, backoff_s=1.0,
                     max_backoff_s=1.0, concurrency=2)
  start = time.monotonic()
  with pytest.raises(KeyboardInterrupt):
    judge.score([item("[[say:7]]"), item("[[fault:500]]")], ALIGNED)
  assert time.monotonic() - start < 3  # not 20 backoffs of up to 1 s
  assert json.load(open(ledger_path, encoding="utf-8"))["judges"][judge.name]["calls"] == 1
  monkeypatch.setattr(api_judge.concurrent.futures, "as_completed", real_as_completed)
  sent = len(server.requests)
  [row] = make_judge(server, cache_path=cache).score([item("[[say:7]]")], ALIGNED)
  assert row["aligned"].value == 7.0 and len(server.requests) == sent


def test_connections_are_kept_alive_across_calls_and_renewed_when_idle(server, monkeypatch):
  with make_judge(server, concurrency=1) as judge:
    judge.score([item("[[say:1]]"), item("[[say:2]]")], ALIGNED)
    judge.score([item("[[say:3]]")], ALIGNED)
    assert len({r.client_port for r in server.requests}) == 1
    monkeypatch.setattr(api_judge, "_IDLE_RECONNECT_S", -1.0)  # every connection counts as idle too long
    judge.score([item("[[say:4]]"), item("[[say:5]]")], ALIGNED)
  assert len({r.client_port for r in server.requests}) == 3
  assert judge.ledger["retries"] == 0
