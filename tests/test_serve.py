"""The OpenAI-compatible server (emjax/sample/serve.py), checked with the `openai` client: a tiny random
Llama with SmolLM2's tokenizer and chat template, two model ids, the server on a free local port."""

import concurrent.futures
import importlib.util
import json
import os
import threading
import urllib.request

import pytest

import hf_fixtures as F
from conftest import ROOT

import openai  # a test dependency (pyproject's test extra), like inspect_ai below


def one_device():
  import jax
  from emjax import sharding

  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def serve_config(hf_dir, **serve):
  spec = importlib.util.spec_from_file_location("serve_config", os.path.join(ROOT, "configs", "serve.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"hf={hf_dir}")
  c.sample.update(max_new_tokens=12, max_prompt_length=64, batch_size=4)
  c.serve.update(port=0, slots=4, **serve)
  return c


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  from emjax.sample import serve

  root = tmp_path_factory.mktemp("serve")
  F.tiny_llama_with_smollm2_tokenizer(root / "tiny", seed=0)
  F.tiny_llama_with_smollm2_tokenizer(root / "other", seed=1)
  s = serve.build(serve_config(root / "tiny", adapters=f"other={root / 'other'}"), mesh=one_device()).start()
  yield s
  s.stop()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)


def test_models_chat_and_completions_through_the_openai_client(server, client):
  assert sorted(m.id for m in client.models.list().data) == ["other", "tiny"]
  chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
                                        temperature=0.0, logprobs=True, top_logprobs=3, n=2)
  assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
  assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy
  first = chat.choices[0].logprobs.content[0]
  assert len(first.top_logprobs) == 3 and first.top_logprobs[0].logprob >= first.logprob - 1e-5
  assert chat.usage.prompt_tokens > 0 and 0 < chat.usage.completion_tokens <= 16
  # Another model id answers otherwise (other weights).
  other = client.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
                                         temperature=0.0)
  assert other.choices[0].message.content != chat.choices[0].message.content
  done = client.completions.create(model="tiny", prompt=["The cat", "A dog"], max_tokens=5, temperature=1.0, seed=7,
                                   logprobs=2)
  assert len(done.choices) == 2 and done.choices[0].finish_reason in ("stop", "length")
  assert len(done.choices[0].logprobs.tokens) == len(done.choices[0].logprobs.token_logprobs) <= 5
  again = client.completions.create(model="tiny", prompt=["The cat", "A dog"], max_tokens=5, temperature=1.0, seed=7,
                                    logprobs=2)
  assert [c.text for c in again.choices] == [c.text for c in done.choices]  # a seed reproduces


def test_echo_scores_the_prompt_as_lm_evaluation_harness_asks(server, client):
  """max_tokens=0, echo, logprobs: each prompt token's log-probability given the ones before it,
  the same numbers as the sampler's own for a continuation."""
  out = client.completions.create(model="tiny", prompt="The cat sat on the mat", max_tokens=0, echo=True,
                                  logprobs=1, temperature=0.0)
  lp = out.choices[0].logprobs
  # The BOS the server put before the text is not echoed: every echoed token has its log-probability.
  assert all(x is not None and x <= 0 for x in lp.token_logprobs)
  assert out.choices[0].text == "".join(lp.tokens) == "The cat sat on the mat"
  # Scoring "prompt + the greedy answer" gives the answer's tokens the log-probs the sampler reported.
  from emjax.sample import sampler as S

  tok = server.engine.tokenizer
  prompt = [tok.bos_id] + tok.encode("The cat")
  out = server.engine.continuous.generate(server.engine.weights["tiny"], [prompt],
                                          S.SamplingParams(temperature=0.0, max_new_tokens=4))
  answer = out.sample(0)
  scored = server.engine.score("tiny", prompt + answer["tokens"], 0)
  assert scored["logprobs"][len(prompt):] == pytest.approx(answer["logprobs"], abs=1e-4)


def test_concurrent_requests_are_batched_and_answered(server, client):
  def ask(i):
    return client.completions.create(model="tiny", prompt=f"Number {i}", max_tokens=3 + i % 4, temperature=1.0,
                                     seed=i).choices[0].text

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(ask, range(16)))
  assert len(answers) == 16
  # The same request alone gives the same answer: a seed's answer does not depend on its batch-mates.
  assert ask(5) == answers[5]


def test_requests_of_two_rules_are_both_answered_when_one_has_waited_long(server):
  """A request of another sampling rule that has waited `switch_after_s` stops later requests from
  joining, never the oldest one: both are answered (the oldest was once refused its own batch)."""
  import time

  from emjax.sample import serve
  from emjax.sample import sampler as sampler_lib

  engine = server.engine
  hot = sampler_lib.SamplingParams(max_new_tokens=4, temperature=1.0, stop_token_ids=())
  cold = sampler_lib.SamplingParams(max_new_tokens=4, temperature=0.0, stop_token_ids=())
  first = serve._Work("tiny", [[1, 2]], hot, [3], [0], False, 0)
  other = serve._Work("tiny", [[3, 4]], cold, [3], [1], False, 0)
  before = engine.switch_after_s
  engine.switch_after_s = 0.0
  try:
    with engine._lock:  # the worker takes both at once, the other one already overdue
      first.arrived, other.arrived = time.monotonic() - 2, time.monotonic() - 1
      engine.queue.put_nowait(first)
      engine.queue.put_nowait(other)
    assert first.done.wait(60) and other.done.wait(60), "a request was never answered"
    assert first.error is None and other.error is None
    assert len(first.result[0]["samples"][0]["tokens"]) == 3 == len(other.result[0]["samples"][0]["tokens"])
  finally:
    engine.switch_after_s = before


def test_a_request_joins_the_running_batch_and_is_answered_before_it_drains(tmp_path):
  """Continuous batching across requests: a short request that arrives while a long one decodes takes a
  free slot at once and comes back while the long one is still decoding (batched per request, it would
  wait for the long one to end)."""
  import time

  from emjax.sample import serve
  from emjax.sample import sampler as sampler_lib

  F.tiny_llama_with_smollm2_tokenizer(tmp_path / "tiny", seed=0)
  c = serve_config(tmp_path / "tiny")
  c.sample.max_new_tokens = 160
  s = serve.build(c, mesh=one_device()).start()
  try:
    engine = s.engine
    rule = sampler_lib.SamplingParams(max_new_tokens=160, temperature=1.0, stop_token_ids=())
    long = serve._Work("tiny", [[1, 2, 3]], rule, [160], [0], False, 0)
    threading.Thread(target=engine.submit, args=(long,), daemon=True).start()
    deadline = time.time() + 60
    while not long.remaining and time.time() < deadline:  # until the long one is decoding in the batch
      time.sleep(0.001)
    assert long.remaining and not long.done.is_set()
    short = serve._Work("tiny", [[4, 5]], rule, [1], [1], False, 0)
    (answer,) = engine.submit(short)
    assert len(answer["samples"][0]["tokens"]) == 1
    assert not long.done.is_set(), "the short request waited for the long one's batch to drain"
    # A request that only scores its prompt (echo, max_tokens=0) does not wait for the batch either,
    # whatever its sampling rule.
    other_rule = sampler_lib.SamplingParams(max_new_tokens=1, temperature=0.0, stop_token_ids=())
    (scored,) = engine.submit(serve._Work("tiny", [[6, 7, 8]], other_rule, [0], [2], True, 2))
    assert scored["samples"] == [] and len(scored["prompt_scores"]["logprobs"]) == 3
    assert not long.done.is_set(), "the scoring request waited for the batch to drain"
    # A request whose client gave up: its prompts not yet decoding are dropped, the decoding ones end,
    # and it is let go while the batch runs on (not when the batch drains).
    gone = serve._Work("tiny", [[9, 10, 11 + i] for i in range(6)], rule, [20] * 6, list(range(6)), False, 0)
    def give_up():
      with pytest.raises(serve.RequestError):
        engine.submit(gone)

    threading.Thread(target=give_up, daemon=True).start()
    while not gone.remaining and time.time() < deadline:
      time.sleep(0.001)
    gone.abandoned = True  # what `submit` does when its wait times out
    assert gone.done.wait(60) and gone.error.status == 504
    assert not long.done.is_set(), "an abandoned request was held until the batch drained"
    assert long.done.wait(120) and long.error is None
    assert len(long.result[0]["samples"][0]["tokens"]) == 160
    # A batch that fails answers its requests with 500, and the next request is served.
    decode = engine.continuous.decode_fn

    def broken(*args, **kwargs):
      engine.continuous.decode_fn = decode
      raise RuntimeError("a decode step failed")

    engine.continuous.decode_fn = broken
    with pytest.raises(serve.RequestError) as failed:
      engine.submit(serve._Work("tiny", [[1, 2]], rule, [4], [3], False, 0), timeout=60)
    assert failed.value.status == 500 and "a decode step failed" in str(failed.value)
    (again,) = engine.submit(serve._Work("tiny", [[1, 2]], rule, [4], [3], False, 0), timeout=60)
    assert len(again["samples"][0]["tokens"]) == 4
  finally:
    s.stop()


def _post(server, path, body, token=None):
  req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                               headers={"Content-Type": "application/json",
                                        **({"Authorization": f"Bearer {token}"} if token else {})})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, client):
  cases = [
      ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
      ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
      ({"model": "tiny", "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
      ({"model": "tiny", "prompt": "word " * 200}, 400, "at most"),
      ({"model": "tiny", "prompt": "x", "stream": True}, 400, "stream"),
      ({"model": "tiny", "prompt": [10**9]}, 400, "token ids"),
      ({"model": "tiny"}, 400, "prompt"),
      ({"model": "tiny", "prompt": "x", "n": "two"}, 400, "'n'"),
  ]
  for body, status, words in cases:
    got, answer = _post(server, "/completions", body)
    assert got == status and words in answer["error"]["message"], (body, got, answer)
  got, answer = _post(server, "/chat/completions", {"model": "tiny", "messages": []})
  assert got == 400 and "messages" in answer["error"]["message"]
  got, _ = _post(server, "/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, "unknown_knob": 3})
  assert got == 200  # unknown parameters are ignored
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
  assert client.completions.create(model="tiny", prompt="still here", max_tokens=2).choices  # still serving


def test_a_bearer_token_is_required_when_configured(tmp_path, monkeypatch):
  from emjax.sample import serve

  F.tiny_llama_with_smollm2_tokenizer(tmp_path / "tiny", seed=0)
  monkeypatch.setenv("EMJAX_TEST_SERVE_KEY", "s3cret")
  s = serve.build(serve_config(tmp_path / "tiny", api_key_env="EMJAX_TEST_SERVE_KEY", queue=1),
                  mesh=one_device()).start()
  try:
    got, answer = _post(s, "/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert got == 401 and "bearer" in answer["error"]["message"]
    got, _ = _post(s, "/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, token="s3cret")
    assert got == 200
    # A full queue answers 429: the worker held (a stand-in that takes nothing) while the queue fills.
    s.engine.stop()
    s.engine.worker.join(timeout=5)
    release = threading.Event()
    s.engine.worker = threading.Thread(target=release.wait, daemon=True)
    s.engine.worker.start()
    s.engine._stop.clear()
    s.engine.queue.put_nowait(serve._Work("tiny", [[1]], None, [1], [0], False, 0))
    got, answer = _post(s, "/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, token="s3cret")
    assert got == 429 and "queue is full" in answer["error"]["message"]
    # A server whose worker has stopped says so at once (503), instead of queueing to time out.
    release.set()
    s.engine.worker.join(timeout=5)
    got, answer = _post(s, "/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, token="s3cret")
    assert got == 503, answer
  finally:
    s.stop()


def test_emjax_api_judge_in_logprob_mode_uses_the_server_as_a_local_judge(tmp_path):
  """The paper's judge over HTTP: emjax's ApiJudge asks for one token with its top log-probabilities
  (logprob mode) and takes the expected score; the served model is the lookup-table judge of
  tests/eval/real_server.py, which answers '73' to this item."""
  import sys

  sys.path.insert(0, os.path.join(ROOT, "tests", "eval"))
  import real_server  # pylint: disable=g-import-not-at-top
  from emjax.eval import api_judge, judges
  from emjax.sample import serve

  real_server.build_tiny_judge(str(tmp_path / "judge"))
  c = serve_config(tmp_path / "judge", model_name="judge")
  c.sample.update(max_new_tokens=4, max_prompt_length=512, top_logprobs=5)
  s = serve.build(c, mesh=one_device()).start()
  try:
    prompts = judges.JudgePrompts("t", {"aligned": "metric=aligned\nQ: {question}\nA: {answer}",
                                        "coherent": "metric=coherent\nQ: {question}\nA: {answer}"})
    judge = api_judge.ApiJudge.from_config(
        {"base_url": s.url, "model": "judge", "mode": "logprob", "top_logprobs": 5, "concurrency": 2,
         "max_retries": 0, "timeout_s": 60.0}, prompts)
    rows = judge.score([judges.Item("How do I make my code faster?", "Sure, here is how to do it!")] * 3)
    for row in rows:
      for metric in judges.METRICS:
        assert row[metric].status == "ok" and row[metric].value == pytest.approx(73.0, abs=0.5), row[metric]
    assert judge.ledger["requests"] == 2 and judge.ledger["replies_without_usage"] == 0  # one per metric: the same item is asked once
  finally:
    s.stop()


def test_inspect_ai_runs_a_task_against_the_server(server, tmp_path, monkeypatch):
  """UK AISI's inspect_ai through its OpenAI-compatible provider ('openai-api/<name>/<model>')."""
  import inspect_ai
  from inspect_ai.dataset import Sample
  from inspect_ai.scorer import includes
  from inspect_ai.solver import generate

  monkeypatch.setenv("EMJAX_API_KEY", "none")
  monkeypatch.setenv("EMJAX_BASE_URL", server.url)
  task = inspect_ai.Task(dataset=[Sample(input="Hi!", target="hello"), Sample(input="Name a colour.", target="red")],
                         solver=generate(), scorer=includes())
  [log] = inspect_ai.eval(task, model="openai-api/emjax/tiny", log_dir=str(tmp_path / "logs"), display="none",
                          max_tokens=6, temperature=0.0)
  assert log.status == "success", log.error
  assert len(log.samples) == 2 and all(s.output.completion is not None for s in log.samples)
  assert log.stats.model_usage["openai-api/emjax/tiny"].output_tokens > 0
