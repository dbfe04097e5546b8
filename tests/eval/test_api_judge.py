"""ApiJudge against a local fault-injecting OpenAI-compatible server (tests/eval/fault_server.py).

Every reply is decided by markers in the answer text, so the tests are deterministic; the server
records every request, so they check what was sent (retries, duplicates, headers, concurrency).
"""

import inspect
import json
import logging
import math
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.parse

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


def test_reply_without_logprobs_stops_the_judge_at_the_first_one(server, tmp_path):
  cache, ledger_path = str(tmp_path / "cache.jsonl"), str(tmp_path / "ledger.json")
  judge = make_judge(server, mode="logprob", concurrency=1, cache_path=cache, ledger_path=ledger_path)
  items = [item("first [[say:64]]"), item("second [[fault:nologprobs]]"), item("third [[say:12]]")]
  with pytest.raises(api_judge.JudgeStopped, match="this server returns no logprobs") as stopped:
    judge.score(items, ALIGNED)
  assert stopped.value.cause == "no_logprobs" and "mode=direct" in str(stopped.value)
  assert "rerun resumes" in str(stopped.value)
  assert len(server.requests_with("nologprobs")) == 1  # not retried
  assert not server.requests_with("third")  # queued work is not sent once the judge cannot score
  assert stopped.value.counts["judged"] == 1 and stopped.value.counts["not_sent"] == 1
  # what was judged before the stop is on disk
  assert [json.loads(line)["value"] for line in open(cache, encoding="utf-8")] == [64.0]
  assert json.load(open(ledger_path, encoding="utf-8"))["judges"][judge.name]["requests"] == 2


# ----------------------------------------------------------------------------- direct mode: parse rule, empty replies

CHATTY = ("I would rate this 85.", "85\n\nThe answer is harmful", "Score: 40 out of 100, REFUSAL aside")


def sayq(text):
  return f"[[sayq:{urllib.parse.quote(text)}]]"


def test_parse_rule_paper_reads_chatty_replies_that_strict_refuses(server):
  items = [item(f"{i} {sayq(text)}") for i, text in enumerate(CHATTY)]
  strict = make_judge(server).score(items, ALIGNED)
  paper = make_judge(server, parse_rule="paper").score(items, ALIGNED)
  assert statuses(strict) == ["parse_error"] * 3
  assert [(s.status, s.value) for s in (r["aligned"] for r in paper)] == [("ok", 85.0), ("ok", 85.0), ("refusal", None)]
  assert [r["aligned"].raw for r in paper] == list(CHATTY)


def test_release_placeholders_from_a_live_judge_are_parse_errors_not_empty_or_error(server):
  results = make_judge(server, parse_rule="paper").score(
      [item(sayq("[EMPTY]")), item(sayq("[ERROR: quota]"))], ALIGNED)
  assert statuses(results) == ["parse_error", "parse_error"]


def test_cached_replies_are_read_again_with_the_current_parse_rule(server, tmp_path):
  cache = str(tmp_path / "cache.jsonl")
  items = [item(sayq(CHATTY[0]))]
  assert statuses(make_judge(server, cache_path=cache).score(items, ALIGNED)) == ["parse_error"]
  [row] = make_judge(server, cache_path=cache, parse_rule="paper").score(items, ALIGNED)
  assert (row["aligned"].status, row["aligned"].value) == ("ok", 85.0)
  assert len(server.requests) == 1  # switching the rule costs no request


@pytest.mark.parametrize("fault", ["empty", "null"])
def test_empty_direct_reply_is_retried_and_ends_in_error_never_empty(server, tmp_path, fault):
  cache = str(tmp_path / "cache.jsonl")
  judge = make_judge(server, max_retries=2, cache_path=cache)
  flaky, lasting, blank = judge.score([item(f"[[say:64]] [[fault:{fault}x1]]"), item(f"[[fault:{fault}]]"),
                                       item(sayq(" \n "))], ALIGNED)
  assert (flaky["aligned"].status, flaky["aligned"].value) == ("ok", 64.0)
  for row in (lasting, blank):
    assert row["aligned"].status == "error" and row["aligned"].raw.startswith("empty_reply: ")
    assert "gave up after 3 attempts" in row["aligned"].raw
  assert "finish_reason='length'" in lasting["aligned"].raw
  assert len(server.requests_with(f"fault:{fault}x1")) == 2 and len(server.requests_with(f"fault:{fault}]")) == 3
  assert judge.ledger["errors"] == {"empty_reply": 2} and judge.ledger["statuses"] == {"ok": 1, "error": 2}
  assert [json.loads(line)["value"] for line in open(cache, encoding="utf-8")] == [64.0]  # errors are not cached


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


# ----------------------------------------------------------------------------- the key only where it belongs

def test_default_key_env_sends_the_openai_key_to_no_other_server(server, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  cfg = {**FAST, "base_url": server.base_url, "model": "judge-test", "mode": "direct"}  # api_key_env left default
  api_judge.ApiJudge.from_config(cfg, PROMPTS).score([item("[[say:5]]")], ALIGNED)
  assert [r.authorization for r in server.requests] == [None]


def test_default_key_env_is_openai_key_for_openais_base_url(monkeypatch):
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  with pytest.raises(ValueError, match="environment variable OPENAI_API_KEY is not set"):
    api_judge.validate_config({})
  api_judge.validate_config({"base_url": "https://judge.example.org/v1"})  # another server needs no key
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  api_judge.validate_config({})
  judge = api_judge.ApiJudge.from_config({"base_url": "https://api.openai.com/v1/"}, PROMPTS)
  assert judge._headers["Authorization"] == f"Bearer {KEY}"  # pylint: disable=protected-access


@pytest.mark.parametrize("base_url", ["http://judge.example.org/v1", "http://10.1.2.3:8000/v1",
                                      "http://192.168.0.7/v1", "http://127.0.0.1.example.org/v1"])
def test_no_key_over_plain_http_to_a_host_that_is_not_loopback(base_url, tmp_path):
  cfg = {"base_url": base_url, "api_key_env": KEY_ENV, "cache_path": str(tmp_path / "c.jsonl")}
  for check in (api_judge.validate_config, lambda c: api_judge.ApiJudge.from_config(c, PROMPTS)):
    with pytest.raises(ValueError, match="unencrypted"):
      check(cfg)
  assert not os.listdir(tmp_path)
  api_judge.ApiJudge.from_config({**cfg, "api_key_env": ""}, PROMPTS)  # without a key it may go anywhere


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:8000/v1", "http://127.3.2.1:1/v1", "http://localhost:1/v1",
                                      "http://LOCALHOST:1/v1", "http://[::1]:8000/v1", "https://judge.example.org/v1"])
def test_key_may_go_over_http_to_loopback_and_over_https_anywhere(base_url):
  api_judge.validate_config({"base_url": base_url, "api_key_env": KEY_ENV})
  assert api_judge.ApiJudge.from_config({"base_url": base_url, "api_key_env": KEY_ENV}, PROMPTS)._api_key == KEY


# Keys of the shapes providers issue, none with a '-': each would pass a rule of letters, digits and _.
GEMINI_STYLE_KEY = "AIzaSyDq3xWm8Fk2Lr7Tz9Ph1Nc5Jb0Vg4Ys6Ue"
HF_STYLE_TOKEN = "hf_qXwErTyUiOpAsDfGhJkLzXcVbNm1234567"
SK_STYLE_KEY = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"


@pytest.mark.parametrize("pasted", [KEY, GEMINI_STYLE_KEY, HF_STYLE_TOKEN, SK_STYLE_KEY,
                                    "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "my key", "1ABC", "A-B", "SECRET\n",
                                    "gemini_api_key"])
@pytest.mark.parametrize("defined", [False, True])
def test_a_key_pasted_into_api_key_env_is_refused_and_never_shown(pasted, defined, monkeypatch, tmp_path, caplog):
  # Not a variable: "... is not set" would quote it. A variable (by chance): it would be read as the key.
  if defined:
    monkeypatch.setattr(os, "environ", {**os.environ, pasted: KEY})
  caplog.set_level(logging.DEBUG)
  cfg = {"base_url": "https://judge.example.org/v1", "api_key_env": pasted,
         "ledger_path": str(tmp_path / "ledger.json"), "cache_path": str(tmp_path / "cache.jsonl")}
  for check in (api_judge.validate_config, lambda c: api_judge.ApiJudge.from_config(c, PROMPTS),
                lambda c: api_judge.check_key_env(c["api_key_env"])):
    for bad in ({}, {"base_url": "http://judge.example.org/v1"}):
      with pytest.raises(ValueError, match="did you paste the key itself") as error:
        check({**cfg, **bad})
      assert pasted.strip() not in str(error.value) and "value not shown" in str(error.value)
      assert "upper case" in str(error.value)
  assert pasted.strip() not in caplog.text and not os.listdir(tmp_path)
  scrubbed = api_judge.scrub_config({"api_key_env": pasted, "model": "m"})
  assert scrubbed == {"api_key_env": "[invalid, not shown]", "model": "m"}


def test_check_key_env_passes_upper_case_names_and_the_empty_default():
  for name in ("", "OPENAI_API_KEY", "_X1", "GEMINI_API_KEY"):
    api_judge.check_key_env(name)
    assert api_judge.scrub_config({"api_key_env": name}) == {"api_key_env": name}
  for name in ("gemini_api_key", "Gemini_Api_Key", "_x1"):
    with pytest.raises(ValueError, match="upper case"):
      api_judge.check_key_env(name)


def test_scrub_config_keeps_valid_names_and_copies():
  cfg = {"api_key_env": "GEMINI_API_KEY", "model": "gemini-2.5-flash", "max_cost_usd": 5.0}
  scrubbed = api_judge.scrub_config(cfg)
  assert scrubbed == cfg and scrubbed is not cfg
  assert api_judge.scrub_config({"api_key_env": ""}) == {"api_key_env": ""}
  assert api_judge.scrub_config({"model": "m"}) == {"model": "m"}
  original = {"api_key_env": "sk-abc"}
  api_judge.scrub_config(original)
  assert original == {"api_key_env": "sk-abc"}  # the caller's config is not changed


@pytest.mark.parametrize("bad,match", [
    ({"modle": "x"}, r"unknown keys \['modle'\]"), ({"mode": "vibes"}, "mode='vibes'"),
    ({"parse_rule": "loose"}, "parse_rule='loose'"), ({"concurrency": 0.5}, "concurrency=0.5"),
    ({"max_consecutive_failures": -1}, "max_consecutive_failures=-1"), ({"max_cost_usd": -1}, "max_cost_usd=-1"),
    ({"max_cost_usd": 5.0}, "cap could never be reached"), ({"extra_body": "[1]"}, "expected a JSON object"),
    ({"extra_body": "{nope"}, "not valid JSON"), ({"extra_body": '{"max_tokens": 5}'}, r"sets \['max_tokens'\]"),
    ({"base_url": "api.openai.com"}, "base_url"), ({"base_url": "http://h:notaport/v1"}, "base_url"),
    ({"api_key_env": "NOT_SET_ANYWHERE_3F9"}, "NOT_SET_ANYWHERE_3F9 is not set"),
    ({"api_key_env": KEY_ENV, "base_url": "http://judge.example.org"}, "unencrypted"),
])
def test_validate_config_checks_everything_without_a_request_or_a_file(server, tmp_path, bad, match):
  paths = {"cache_path": str(tmp_path / "d" / "cache.jsonl"), "ledger_path": str(tmp_path / "d" / "ledger.json")}
  good = {"base_url": server.base_url, "api_key_env": KEY_ENV, "mode": "direct", **paths}
  api_judge.validate_config(good)
  with pytest.raises(ValueError, match=match):
    api_judge.validate_config({**good, **bad})
  with pytest.raises(ValueError, match=match):  # the constructor makes the same checks
    api_judge.ApiJudge.from_config({**good, **bad}, PROMPTS)
  assert not os.listdir(tmp_path) and not server.requests


# ----------------------------------------------------------------------------- key_host: the key tied to its host

GEMINI_URL = "https://generativelanguage.googleapis.com/v1beta/openai"
GEMINI_HOST = "generativelanguage.googleapis.com"


def test_key_host_sends_the_key_to_its_host(server):
  for key_host in ("127.0.0.1", "127.0.0.1.", " 127.0.0.1 "):
    make_judge(server, key_host=key_host).score([item(f"[[say:5]] {key_host!r}")], ALIGNED)
  assert [r.authorization for r in server.requests] == [f"Bearer {KEY}"] * 3
  api_judge.validate_config({"base_url": "https://Judge.Example.org:8443/v1", "api_key_env": KEY_ENV,
                             "key_host": "judge.example.ORG"})  # host names compared in lower case, port aside


@pytest.mark.parametrize("cfg,elsewhere", [
    ({"base_url": GEMINI_URL, "key_host": GEMINI_HOST}, "https://judge.example.org/v1"),  # the paper preset, redirected
    ({"base_url": GEMINI_URL, "key_host": GEMINI_HOST}, "https://generativelanguage.googleapis.com.evil.org/v1"),
    ({"base_url": "https://judge.example.org/v1", "key_host": "judge.example.org"}, "http://127.0.0.1:9/v1"),
])
def test_key_host_refuses_a_base_url_on_another_host(cfg, elsewhere, tmp_path):
  paths = {"cache_path": str(tmp_path / "cache.jsonl"), "ledger_path": str(tmp_path / "ledger.json")}
  good = {**cfg, "api_key_env": KEY_ENV, "mode": "direct", **paths}
  api_judge.validate_config(good)
  host = urllib.parse.urlsplit(elsewhere).hostname
  expected = (f"the key of api_key_env={KEY_ENV} is for host {cfg['key_host']}; base_url points to {host}: "
              "set api_key_env='' or key_host")
  for check in (api_judge.validate_config, lambda c: api_judge.ApiJudge.from_config(c, PROMPTS)):
    with pytest.raises(ValueError) as error:
      check({**good, "base_url": elsewhere})
    assert expected in str(error.value) and KEY not in str(error.value)
  assert not os.listdir(tmp_path)
  # Either remedy: no key, or no (or the right) key_host.
  api_judge.ApiJudge.from_config({**good, "base_url": elsewhere, "api_key_env": ""}, PROMPTS)
  api_judge.validate_config({**good, "base_url": elsewhere, "key_host": ""})


@pytest.mark.parametrize("pasted", [GEMINI_STYLE_KEY, HF_STYLE_TOKEN, SK_STYLE_KEY])
def test_a_pasted_key_is_refused_before_key_host_could_quote_it(pasted, monkeypatch):
  monkeypatch.setattr(os, "environ", {**os.environ, pasted: KEY})
  for key_host in (GEMINI_HOST, "judge.example.org"):
    with pytest.raises(ValueError, match="did you paste the key itself") as error:
      api_judge.validate_config({"base_url": "https://judge.example.org/v1", "api_key_env": pasted,
                                 "key_host": key_host})
    assert pasted not in str(error.value)


def test_key_host_without_a_key_sends_none(server, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  make_judge(server, api_key_env="", key_host=GEMINI_HOST).score([item("[[say:5]]")], ALIGNED)
  assert [r.authorization for r in server.requests] == [None]
  # OpenAI's own key for OpenAI's base_url (api_key_env '') is not an explicit key: key_host leaves it be.
  api_judge.validate_config({"base_url": "https://api.openai.com/v1", "key_host": GEMINI_HOST})


@pytest.mark.parametrize("bad", [GEMINI_URL, f"{GEMINI_HOST}:443", f"{GEMINI_HOST}/v1", "user@host", "a b", "-x-"])
def test_key_host_must_be_a_bare_host_name(bad):
  with pytest.raises(ValueError, match="key_host=.*expected a bare host name"):
    api_judge.validate_config({"base_url": GEMINI_URL, "api_key_env": KEY_ENV, "key_host": bad})


def test_key_host_is_a_transport_setting_not_in_the_cache_key(server, tmp_path):
  cache = str(tmp_path / "cache.jsonl")
  make_judge(server, cache_path=cache, key_host="127.0.0.1").score([item("[[say:64]]")], ALIGNED)
  [row] = make_judge(server, cache_path=cache).score([item("[[say:64]]")], ALIGNED)
  assert row["aligned"].value == 64.0 and len(server.requests) == 1
  assert api_judge.DEFAULTS["key_host"] == ""


# ----------------------------------------------------------------------------- extra_body and the cache key

def test_extra_body_is_merged_into_every_request_and_into_the_cache_key(server, tmp_path):
  cache = str(tmp_path / "cache.jsonl")
  items = [item("[[say:64]] [[fault:500x1]]")]
  make_judge(server, cache_path=cache, extra_body='{"reasoning_effort": "none"}').score(items, ALIGNED)
  assert [r.body.get("reasoning_effort") for r in server.requests] == ["none", "none"]  # the retry too
  make_judge(server, cache_path=cache, extra_body={"reasoning_effort": "none"}).score(items, ALIGNED)
  assert len(server.requests) == 2  # the same body as a mapping: a cache hit
  make_judge(server, cache_path=cache, extra_body='{"reasoning_effort": "low"}').score(items, ALIGNED)
  make_judge(server, cache_path=cache).score(items, ALIGNED)
  assert [r.body.get("reasoning_effort") for r in server.requests[2:]] == ["low", None]


def test_base_url_is_in_the_cache_key(server, tmp_path):
  cache = str(tmp_path / "cache.jsonl")
  other = FaultServer()  # another server under the same model name: other weights, perhaps
  try:
    make_judge(server, cache_path=cache).score([item("[[say:64]]")], ALIGNED)
    [row] = api_judge.ApiJudge.from_config({**FAST, "base_url": other.base_url, "model": "judge-test",
                                            "mode": "direct", "cache_path": cache}, PROMPTS).score(
                                                [item("[[say:64]]")], ALIGNED)
    assert row["aligned"].value == 64.0 and len(other.requests) == 1
    make_judge(server, cache_path=cache).score([item("[[say:64]]")], ALIGNED)
    assert len(server.requests) == 1
  finally:
    other.close()


# ----------------------------------------------------------------------------- stops

def test_max_cost_usd_stops_before_the_request_that_would_pass_it_and_a_rerun_resumes(server, tmp_path):
  cache, ledger_path = str(tmp_path / "cache.jsonl"), str(tmp_path / "ledger.json")
  # 100 prompt tokens a reply at 10,000 USD per million: $1 a request
  priced = dict(cache_path=cache, ledger_path=ledger_path, price_input_per_mtok=10_000.0, concurrency=1)
  items = [item(f"{i} [[say:{i}]]") for i in range(5)]
  with pytest.raises(api_judge.JudgeStopped, match="max_cost_usd") as stopped:
    make_judge(server, max_cost_usd=2.5, **priced).score(items, ALIGNED)
  assert stopped.value.cause == "max_cost_usd" and "rerun resumes" in str(stopped.value)
  assert len(server.requests) == 3  # $0, $1, $2 before each: sent; $3 >= $2.5 before the fourth: not sent
  assert stopped.value.counts == {"distinct_pairs": 5, "judged": 3, "cache_hits": 0, "errors": 0, "not_sent": 2,
                                  "requests": 3, "cost_usd": pytest.approx(3.0)}
  assert json.load(open(ledger_path, encoding="utf-8"))["cost_usd"] == pytest.approx(3.0)
  assert sum(1 for _ in open(cache, encoding="utf-8")) == 3

  with pytest.raises(api_judge.JudgeStopped):  # a new process, the same ledger and cap: nothing more is sent
    make_judge(server, max_cost_usd=2.5, **priced).score(items, ALIGNED)
  assert len(server.requests) == 3
  assert values(make_judge(server, max_cost_usd=2.5, **priced).score(items[:3], ALIGNED)) == [0.0, 1.0, 2.0]
  results = make_judge(server, max_cost_usd=10.0, **priced).score(items, ALIGNED)  # a raised cap resumes
  assert values(results) == [0.0, 1.0, 2.0, 3.0, 4.0] and len(server.requests) == 5


def test_max_cost_usd_lets_requests_in_flight_finish_and_caches_them(server, tmp_path):
  cache = str(tmp_path / "cache.jsonl")
  judge = make_judge(server, cache_path=cache, price_input_per_mtok=10_000.0, max_cost_usd=0.5, concurrency=3)
  with pytest.raises(api_judge.JudgeStopped):
    judge.score([item(f"{i} [[say:{i}]] [[delay:0.5]]") for i in range(6)], ALIGNED)
  assert len(server.requests) == 3  # the first three were sent at $0 and all came back
  assert sum(1 for _ in open(cache, encoding="utf-8")) == 3


def test_consecutive_identical_client_errors_stop_with_the_servers_message(server, tmp_path, caplog):
  ledger_path = str(tmp_path / "ledger.json")
  judge = make_judge(server, max_consecutive_failures=3, concurrency=1, ledger_path=ledger_path)
  with pytest.raises(api_judge.JudgeStopped, match="3 items in a row") as stopped:
    judge.score([item(f"{i} [[fault:401]]") for i in range(8)], ALIGNED)
  message = str(stopped.value)
  assert stopped.value.cause == "consecutive_failures"
  assert "HTTP 401: Incorrect API key provided: Bearer [redacted]" in message and KEY not in message
  assert len(server.requests) == 3 and stopped.value.counts["not_sent"] == 5
  assert KEY not in caplog.text
  assert json.load(open(ledger_path, encoding="utf-8"))["judges"][judge.name]["errors"]["http_401"] == 3


def test_the_failure_streak_lasts_across_calls(server):
  judge = make_judge(server, max_consecutive_failures=3, concurrency=1)
  assert statuses(judge.score([item("a [[fault:403]]"), item("b [[fault:403]]")], ALIGNED)) == ["error"] * 2
  with pytest.raises(api_judge.JudgeStopped):
    judge.score([item("c [[fault:403]]"), item("d [[fault:403]]")], ALIGNED)
  assert len(server.requests) == 3


@pytest.mark.parametrize("answers,k", [
    (["[[fault:401]]", "[[fault:401]]", "[[say:5]]", "[[fault:401]]", "[[fault:401]]"], 3),  # a success ends a run
    (["[[fault:401]]", "[[fault:403]]", "[[fault:401]]", "[[fault:403]]"], 2),  # different failures
    (["[[fault:401]]"] * 4, 0),  # 0: never stop
    (["[[fault:500]]", "[[fault:503]]", "[[fault:500]]", "[[fault:503]]"], 2),  # different retryable failures
    (["[[fault:500]]", "[[fault:500]]", "[[say:5]]", "[[fault:500]]", "[[fault:500]]"], 3),
    (["[[fault:500]]", "[[fault:401]]", "[[fault:500]]", "[[fault:401]]"], 2),  # retried to the end or not
])
def test_failures_that_are_not_a_run_of_identical_ones_do_not_stop(server, answers, k):
  judge = make_judge(server, max_consecutive_failures=k, concurrency=1, max_retries=0)
  results = judge.score([item(f"{i} {a}") for i, a in enumerate(answers)], ALIGNED)
  assert len(results) == len(answers) and len(server.requests) == len(answers)


def test_an_exhausted_quota_stops_after_k_items_not_after_every_backoff(server, tmp_path, caplog):
  ledger_path = str(tmp_path / "ledger.json")
  judge = make_judge(server, max_consecutive_failures=3, concurrency=1, max_retries=2, ledger_path=ledger_path)
  # Every request is a 429, as from a quota spent for the day; the message's numbers change every time.
  items = [item(f"{i} [[fault:429]] [[errmsg:Quota exceeded for {KEY}; retry in {i}.{i}s]]") for i in range(20)]
  stop = "3 items in a row failed the same way after all their retries"
  with pytest.raises(api_judge.JudgeStopped, match=stop) as stopped:
    judge.score(items, ALIGNED)
  message = str(stopped.value)
  assert stopped.value.cause == "exhausted_retries"
  assert "http_429: HTTP 429: Quota exceeded for [redacted]; retry in 2.2s" in message  # the last one
  assert "a rerun resumes" in message and "the quota may be spent" in message
  assert KEY not in message and KEY not in caplog.text
  assert len(server.requests) == 3 * 3  # three items, three attempts each: not twenty
  assert (stopped.value.counts["errors"], stopped.value.counts["not_sent"]) == (3, 17)
  errors = json.load(open(ledger_path, encoding="utf-8"))["judges"][judge.name]["errors"]
  assert errors == {"http_429": 3, "stopped": 17}


def test_empty_replies_to_the_end_stop_with_a_hint_about_thinking(server):
  judge = make_judge(server, max_consecutive_failures=2, concurrency=1, max_retries=1)
  with pytest.raises(api_judge.JudgeStopped, match="raise max_tokens") as stopped:
    judge.score([item(f"{i} [[fault:null]]") for i in range(5)], ALIGNED)
  assert stopped.value.cause == "exhausted_retries" and len(server.requests) == 2 * 2


def test_a_success_between_exhausted_items_ends_their_run(server):
  judge = make_judge(server, max_consecutive_failures=3, concurrency=1, max_retries=1)
  answers = ["[[fault:429]]", "[[fault:429]]", "[[say:5]]", "[[fault:429]]", "[[fault:429]]", "[[say:6]]"] * 3
  results = judge.score([item(f"{i} {a}") for i, a in enumerate(answers)], ALIGNED)
  assert statuses(results) == ["error", "error", "ok", "error", "error", "ok"] * 3
  assert len(server.requests) == 12 * 2 + 6


def test_content_rejections_400_413_422_never_stop_the_judge(server):
  # A provider's content filter on a run of harmful answers: rows the eval job can finalise, not a stop.
  judge = make_judge(server, max_consecutive_failures=3, concurrency=1)
  answers = ["[[fault:400]]"] * 10 + ["[[fault:422]]"] * 4 + ["[[fault:413]]"] * 4
  results = judge.score([item(f"{i} {a} [[errmsg:content filtered]]") for i, a in enumerate(answers)], ALIGNED)
  assert statuses(results) == ["error"] * 18 and len(server.requests) == 18  # each not retried, none stopped
  assert "HTTP 400: content filtered" in results[0]["aligned"].raw
  assert judge.ledger["errors"] == {"http_400": 10, "http_422": 4, "http_413": 4}


def test_client_errors_other_than_content_rejections_still_stop(server):
  for status in (401, 403, 404, 405):
    server.reset()
    judge = make_judge(server, max_consecutive_failures=3, concurrency=1)
    with pytest.raises(api_judge.JudgeStopped) as stopped:
      judge.score([item(f"{i} [[fault:{status}]]") for i in range(10)], ALIGNED)
    assert stopped.value.cause == "consecutive_failures" and len(server.requests) == 3, status


def test_content_rejections_neither_count_towards_nor_end_a_run(server):
  judge = make_judge(server, max_consecutive_failures=3, concurrency=1)
  answers = ["[[fault:401]]", "[[fault:400]]", "[[fault:401]]", "[[fault:422]]", "[[fault:401]]", "[[say:5]]"]
  with pytest.raises(api_judge.JudgeStopped, match="HTTP 401"):
    judge.score([item(f"{i} {a}") for i, a in enumerate(answers)], ALIGNED)
  assert len(server.requests) == 5


# ----------------------------------------------------------------------------- spend: no usage, a shared ledger

def test_a_reply_without_usage_is_charged_an_estimate_not_zero(server, tmp_path):
  ledger_path = str(tmp_path / "ledger.json")
  priced = dict(ledger_path=ledger_path, price_input_per_mtok=3.0, price_output_per_mtok=20.0, max_tokens=7)
  it = item("[[say:64]] [[nousage:1]]")
  prompt_tokens = math.ceil(len(PROMPTS.render("aligned", it)) / 4)
  for mode, completion_tokens in (("direct", 7), ("logprob", 1)):
    judge = make_judge(server, mode=mode, **priced)
    [row] = judge.score([it], ALIGNED)
    assert row["aligned"].value == 64.0
    ledger = judge.ledger
    assert (ledger["prompt_tokens"], ledger["completion_tokens"]) == (0, 0), mode  # nothing counted by the server
    assert (ledger["estimated_prompt_tokens"], ledger["estimated_completion_tokens"]) == (
        prompt_tokens, completion_tokens), mode
    assert ledger["replies_without_usage"] == 1
    assert ledger["cost_usd"] == pytest.approx((prompt_tokens * 3.0 + completion_tokens * 20.0) / 1e6), mode
    assert json.load(open(ledger_path, encoding="utf-8"))["judges"][judge.name] == ledger
  # a reply with usage is charged what it says, with nothing estimated
  judge = make_judge(server, **{**priced, "ledger_path": ""})
  judge.score([item("[[say:64]]")], ALIGNED)
  assert (judge.ledger["prompt_tokens"], judge.ledger["estimated_prompt_tokens"]) == (100, 0)
  assert judge.ledger["replies_without_usage"] == 0


def test_max_cost_usd_trips_against_a_server_that_reports_no_usage(server, tmp_path):
  items = [item(f"{i} [[say:{i}]] [[nousage:1]]") for i in range(6)]
  per_request = (math.ceil(len(PROMPTS.render("aligned", items[0])) / 4) * 1000.0 + 7 * 1000.0) / 1e6
  judge = make_judge(server, concurrency=1, max_tokens=7, price_input_per_mtok=1000.0, price_output_per_mtok=1000.0,
                     max_cost_usd=2.5 * per_request, ledger_path=str(tmp_path / "ledger.json"))
  with pytest.raises(api_judge.JudgeStopped, match="max_cost_usd") as stopped:
    judge.score(items, ALIGNED)
  assert stopped.value.cause == "max_cost_usd" and len(server.requests) == 3
  assert stopped.value.counts["cost_usd"] == pytest.approx(3 * per_request)


def _another_job_spends(ledger_path, name, prompt_tokens):
  """What another process's ledger merge does (api_judge._write_ledger): under the lock, add to the file."""
  with api_judge._ledger_lock(ledger_path):  # pylint: disable=protected-access
    doc = api_judge._read_ledger_file(ledger_path)  # pylint: disable=protected-access
    entry = doc.setdefault("judges", {}).setdefault(name, {})
    entry["prompt_tokens"] = entry.get("prompt_tokens", 0) + prompt_tokens
    api_judge._atomic_write_json(ledger_path, doc)  # pylint: disable=protected-access


@pytest.mark.parametrize("cap,at_request,their_tokens,sent", [
    (100.0, 2, 9_500, 16),  # $95 by another job: seen at the merge after 16 requests (95 + 16 >= 100)
    (10.0, 9, 150, 9),  # $1.50 by another job: at $9 of $10 (within 10%) every request merges first
])
def test_a_capped_judge_sees_another_jobs_spend_during_its_call(server, tmp_path, cap, at_request, their_tokens,
                                                                sent):
  ledger_path = str(tmp_path / "ledger.json")
  # $1 a request (100 prompt tokens at $10,000 a million)
  judge = make_judge(server, concurrency=1, price_input_per_mtok=10_000.0, max_cost_usd=cap, ledger_path=ledger_path)

  def another_job(request):
    if len(server.requests) == at_request:
      _another_job_spends(ledger_path, judge.name, their_tokens)

  server.state.on_request = another_job
  with pytest.raises(api_judge.JudgeStopped, match="max_cost_usd") as stopped:
    judge.score([item(f"{i} [[say:{i}]]") for i in range(20)], ALIGNED)
  assert len(server.requests) == sent
  total = json.load(open(ledger_path, encoding="utf-8"))["judges"][judge.name]
  assert total["prompt_tokens"] == their_tokens + 100 * sent  # both jobs' tokens, neither overwritten
  assert stopped.value.counts["cost_usd"] == pytest.approx(their_tokens / 100 + sent)


# ----------------------------------------------------------------------------- estimate

def test_estimate_counts_requests_cache_hits_tokens_and_cost_without_a_request(server, tmp_path):
  cache = str(tmp_path / "cache.jsonl")
  priced = dict(cache_path=cache, price_input_per_mtok=2.5, price_output_per_mtok=10.0, max_tokens=7)
  a, b, c = item("a [[say:1]]"), item("b [[say:2]]"), item("c [[say:3]] ünïcode")
  make_judge(server, **priced).score([a], ALIGNED)
  judge = make_judge(server, **priced)
  estimate = judge.estimate([a, b, b, c], ALIGNED)
  assert len(server.requests) == 1  # only the priming call
  prompt_tokens = sum(math.ceil(len(PROMPTS.render("aligned", it)) / 4) for it in (b, c))
  assert {k: estimate[k] for k in ("pairs", "requests", "cache_hits", "deduplicated", "prompt_tokens",
                                   "completion_tokens")} == {"pairs": 4, "requests": 2, "cache_hits": 1,
                                                             "deduplicated": 1, "prompt_tokens": prompt_tokens,
                                                             "completion_tokens": 14}
  assert estimate["cost_usd"] == pytest.approx((prompt_tokens * 2.5 + 14 * 10.0) / 1e6)
  assert "characters/4" in estimate["token_estimate"] and "characters/4" in estimate["summary"]
  assert "2 requests to send (1 cache hits" in estimate["summary"]
  judge.score([a, b, b, c], ALIGNED)
  assert len(server.requests) == 1 + estimate["requests"]
  logprob = make_judge(server, mode="logprob", **priced).estimate([a, b], ALIGNED)
  assert logprob["requests"] == 2 and logprob["completion_tokens"] == 2  # one token per request


def test_estimate_reports_the_ledgers_spend_and_the_cap(server, tmp_path):
  ledger_path = str(tmp_path / "ledger.json")
  options = dict(ledger_path=ledger_path, price_input_per_mtok=10_000.0, max_cost_usd=50.0)
  make_judge(server, **options).score([item("[[say:1]]"), item("[[say:2]]")], ALIGNED)
  estimate = make_judge(server, **options).estimate([item("[[say:3]]")], ALIGNED)
  assert estimate["spent_usd"] == pytest.approx(2.0) and estimate["max_cost_usd"] == 50.0
  assert not estimate["reaches_cap"] and "cap $50.00" in estimate["summary"]
  near = make_judge(server, **{**options, "max_cost_usd": 2.05}).estimate([item("[[say:3]]")], ALIGNED)
  assert near["cost_usd"] > 0.05 and near["reaches_cap"] and "would reach" in near["summary"]  # $2 spent


def test_judge_stopped_survives_pickling():
  stopped = pickle.loads(pickle.dumps(api_judge.JudgeStopped("stopped: why", "max_cost_usd", {"judged": 3})))
  assert (str(stopped), stopped.cause, stopped.counts) == ("stopped: why", "max_cost_usd", {"judged": 3})


# ----------------------------------------------------------------------------- one ledger, several processes

_LEDGER_WRITER = """
import os, sys, time
from emjax.eval import api_judge, judges
base_url, ledger_path, name, calls, go = sys.argv[1:6]
prompts = judges.JudgePrompts("test", {"aligned": "metric=aligned\\nQ: {question}\\nA: {answer}"})
judge = api_judge.ApiJudge.from_config({"base_url": base_url, "model": "judge-test", "mode": "direct",
                                        "ledger_path": ledger_path, "concurrency": 1}, prompts)
open(go + "." + name, "w").close()
while not os.path.exists(go):  # both processes start writing together
  time.sleep(0.005)
for i in range(int(calls)):
  judge.score([judges.Item("q", f"{name} {i} [[say:1]]")], ("aligned",))
print(api_judge.__file__)
"""


def test_processes_sharing_a_ledger_add_up_their_counts(server, tmp_path):
  ledger_path, go, calls = str(tmp_path / "ledger.json"), str(tmp_path / "go"), 40
  other = make_judge(server, model="another-judge", ledger_path=ledger_path)  # a judge of this process too
  other.score([item("[[say:1]]")], ALIGNED)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(api_judge.__file__))))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  writers = [subprocess.Popen([sys.executable, "-c", _LEDGER_WRITER, server.base_url, ledger_path, name, str(calls),
                               go], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("p1", "p2")]
  deadline = time.monotonic() + 60
  while not all(os.path.exists(f"{go}.{n}") for n in ("p1", "p2")) and time.monotonic() < deadline:
    if any(w.poll() is not None for w in writers):
      break
    time.sleep(0.01)
  open(go, "w").close()
  for w in writers:
    out, _ = w.communicate(timeout=120)
    assert w.returncode == 0 and out.strip().endswith(api_judge.__file__), out  # this checkout's judge
  other.score([item("[[say:2]]")], ALIGNED)  # written after the others: it must not drop their counts
  doc = json.load(open(ledger_path, encoding="utf-8"))
  mine = doc["judges"]["api:judge-test:direct"]
  assert (mine["calls"], mine["requests"], mine["prompt_tokens"], mine["statuses"]) == (
      2 * calls, 2 * calls, 2 * calls * 100, {"ok": 2 * calls})
  assert doc["judges"]["api:another-judge:direct"]["requests"] == 2
  assert len(server.requests) == 2 * calls + 2
