"""The `serve` job: an OpenAI-compatible HTTP server for any model emjax loads, answering through the
continuous-batching sampler.

  python -m emjax.main --config=configs/serve.py:hf=HF_DIR --workdir=DIR        # or :checkpoint=RUN

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (the model's chat
template). Parameters: `model`, `n`, `temperature`, `top_p`, `max_tokens` (chat:
`max_completion_tokens` too), `stop` (strings; `stop_token_ids`, a list of ids, as vLLM takes them),
`seed`, `logprobs` (completions: the number of top alternatives; chat: a bool with `top_logprobs`),
`echo` with the prompt's log-probabilities on completions (`max_tokens=0` scores the prompt alone,
what lm-evaluation-harness asks for). Unknown parameters are ignored; `stream=true` is refused with
a 400. Several models side by side (`serve.adapters`: 'name=DIR,...', e.g. LoRA or PEFT adapters of
one base, merged) are model ids; they must share the first model's architecture.

Requests go into a bounded queue (`serve.queue`; full: 429) read by one worker thread, which keeps one
continuous batch open: requests of the oldest one's model and sampling rule join it as they arrive (in
arrival order, while their prompts fit its cache), each prompt taking a decode slot as soon as one is
free, and each answered at the end of the decode chunk in which its own rows stop; a request of
another model or rule waits until the batch drains, and once it has waited `serve.switch_after_s`
no request joins, so the batch drains for it (`max_tokens` and `seed` are per request). Echo-only
requests (`max_tokens=0`) are scored at once, outside the batch. A batch's cache is as wide as
`serve.cache_bucket` asks, else as the widest prompt bucket the server has seen so far needs (a
fixed width makes a seed's answer independent of earlier traffic too). A stopped worker answers 503.
A request without `seed` gets a fresh one. Stop strings cut the text after generation (the stop ids
end it early). Bad requests get 400 (404: unknown model; 401: a missing or wrong bearer
token when `serve.api_key_env` names one), with OpenAI's error body; the server keeps serving.

It binds to 127.0.0.1 unless `serve.host` says otherwise. WORKDIR/server.json holds the address once
it listens.
"""

from __future__ import annotations

import dataclasses
import hmac
import http.server
import itertools
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
import uuid
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from emjax import workdir as workdir_lib
from emjax.sample import continuous as continuous_lib
from emjax.sample import run as sample_run
from emjax.sample import sampler as sampler_lib

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_STOP_STRINGS = 16
MAX_ROWS_PER_REQUEST = 1024  # prompts x n  # OpenAI takes 4; lm-evaluation-harness tasks may send more
UNSUPPORTED = ("logit_bias", "response_format", "tools", "functions", "tool_choice", "suffix", "best_of",
               "frequency_penalty", "presence_penalty")


def serve_block() -> dict:
  return dict(
      host="127.0.0.1",
      port=8000,  # 0: any free port (written to WORKDIR/server.json)
      model_name="",  # '' = the model directory's name
      adapters="",  # 'name=DIR[,name=DIR]': more models of the same architecture served beside it
      queue=64,  # requests waiting at most; a full queue answers 429
      slots=32,  # continuous-batching decode slots
      prefill_rows=1,  # prompts per prefill (a fixed shape): requests mostly arrive one at a time
      cache_bucket=0,  # a batch's cache width as a prompt bucket (0: the widest the server has seen so far)
      switch_after_s=2.0,  # a request of another model or rule waiting this long stops admissions
      api_key_env="",  # an environment variable holding the bearer token clients must send ('' = none)
  )


class RequestError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code

  def body(self) -> dict:
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        self.status, "invalid_request_error" if self.status < 500 else "server_error")
    return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _timed_out() -> RequestError:
  return RequestError(504, "the request was not answered in time")


@dataclasses.dataclass
class _Work:
  """One request's prompts for the worker, and where its answer goes."""

  model: str
  prompts: list[list[int]]
  sampling: sampler_lib.SamplingParams
  limits: list[int]  # per prompt
  seeds: list[int]  # per prompt
  score: bool  # echo: the prompts' own log-probabilities too
  top: int  # top alternatives per token (0 = none)
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: Any = None
  error: BaseException | None = None
  abandoned: bool = False  # its client stopped waiting: its prompts not yet decoding are dropped
  remaining: int = 0  # its prompts still decoding
  serial: int = 0  # its number in the worker's batches (never reused, as an id() may be)
  arrived: float = 0.0  # time.monotonic() when it was queued

  def key(self) -> tuple:
    s = self.sampling
    return (self.model, s.rules, s.temperature, s.top_p, s.top_k, s.min_p, s.stop_token_ids, s.banned_token_ids, s.n)


# ----------------------------------------------------------------------------- the engine


def _let_go(w: _Work) -> None:
  """A request whose client stopped waiting, or whose batch ended without it: 504, if not yet answered."""
  if not w.done.is_set():
    w.error = _timed_out()
    w.done.set()


class Engine:
  """The models, one sampler and its continuous batcher, a bounded queue and the worker that drains it."""

  def __init__(self, models: Mapping[str, sample_run.Model], *, slots: int, queue_size: int, cache_bucket: int = 0,
               switch_after_s: float = 2.0, prefill_rows: int = 1):
    if not models:
      raise ValueError("serve: no model")
    self.models = dict(models)
    first = next(iter(self.models.values()))
    self.tokenizer = first.tokenizer
    self.sampler, _, _, _ = first.weights()
    self.weights = {}
    for name, model in self.models.items():
      if model.model_cfg != first.model_cfg:
        raise ValueError(f"config.serve.adapters: {name!r} has another architecture than the first model; models "
                         "served side by side share one")
      _, self.weights[name], _, _ = model.weights()
    self.cap = first.cap
    self.max_prompt = max(first.buckets)
    self.continuous = continuous_lib.engine(self.sampler, slots=slots, prefill_rows=prefill_rows)
    self.queue: queue.Queue[_Work] = queue.Queue()
    self.limit = max(int(queue_size), 1)
    self._deferred: list[_Work] = []  # taken from the queue by the worker, not yet in a batch
    if cache_bucket and cache_bucket not in first.buckets:
      raise ValueError(f"config.serve.cache_bucket={cache_bucket}: 0 or one of the prompt buckets {first.buckets}")
    self.cache_bucket = int(cache_bucket)
    self.switch_after_s = float(switch_after_s)
    self._width = 0  # the widest prompt bucket of any batch so far: the next batch's cache width
    self._lock = threading.Lock()
    self.score_fn = jax.jit(self._score, static_argnames=("top",))
    self._stop = threading.Event()
    self.worker = threading.Thread(target=self._loop, name="emjax-serve-worker", daemon=True)
    self.worker.start()

  def stop(self) -> None:
    self._stop.set()

  def waiting(self) -> int:
    with self._lock:
      return self.queue.qsize() + len(self._deferred)

  def submit(self, work: _Work, timeout: float = 600.0):
    with self._lock:  # every request not yet answered counts, whichever list holds it
      if self._stop.is_set() or not self.worker.is_alive():
        raise RequestError(503, "the server is shutting down or its worker has stopped", code="unavailable")
      if self.queue.qsize() + len(self._deferred) >= self.limit:
        raise RequestError(429, f"the server's queue is full ({self.limit} requests waiting); retry later",
                           code="queue_full")
      work.arrived = time.monotonic()
      self.queue.put_nowait(work)
    if not work.done.wait(timeout):
      work.abandoned = True
      raise _timed_out()
    if work.error is not None:
      raise work.error
    return work.result

  def _loop(self) -> None:
    batch: continuous_lib.Batch | None = None  # the open continuous batch
    key = None  # the model and sampling rule of its requests
    owners: dict[tuple[int, int], tuple[_Work, int]] = {}  # a prompt in the batch -> its request, index
    live: dict[int, _Work] = {}  # the requests in the batch, not yet answered
    serials = itertools.count(1)
    while not self._stop.is_set():
      scored, admitted, new_batch = [], [], None
      try:
        with self._lock:
          while True:
            try:
              self._deferred.append(self.queue.get_nowait())
            except queue.Empty:
              break
          self._deferred = [w for w in self._deferred if not w.abandoned]
          # A request with nothing to decode (echo of the prompt alone) never waits for a batch.
          scored = [w for w in self._deferred if not any(limit > 0 for limit in w.limits)]
          self._deferred = [w for w in self._deferred if any(limit > 0 for limit in w.limits)]
          if batch is None and self._deferred:
            key = self._deferred[0].key()
            new_batch = [w for w in self._deferred if w.key() == key]
        for w in scored:
          w.result = [{"samples": [], "prompt_scores": None} for _ in w.prompts]
          self._finish(w)
        if new_batch:
          # The cache as wide as asked, else never narrower than any batch before it: a mixed stream of
          # prompt lengths settles on one width instead of draining whenever a longer prompt arrives.
          widest = max(self.sampler.bucket_for(len(p)) for w in new_batch for p in w.prompts)
          width = self.cache_bucket or max(self._width, widest)
          first = new_batch[0]
          batch = continuous_lib.Batch(self.continuous, self.weights[first.model],
                                       dataclasses.replace(first.sampling, max_new_tokens=self.cap, seed=0),
                                       cache_bucket=max(width, widest))
          self._width, new_batch = max(self._width, widest), None
        with self._lock:
          # Requests of the batch's model and rule join it in arrival order while their prompts fit its
          # cache and few samples wait inside it (the rest wait in the bounded queue). A request of
          # another model or rule that has waited `switch_after_s` stops the ones that came after it,
          # so the batch drains for it; the oldest request (the batch's own rule) always joins.
          now, waiting = time.monotonic(), len(batch.pending) if batch is not None else 0
          for w in list(self._deferred) if batch is not None else []:
            if waiting >= self.continuous.slots:
              break
            if w.key() != key:
              if now - w.arrived > self.switch_after_s:
                break
              continue
            if not all(batch.fits(p) for p, limit in zip(w.prompts, w.limits) if limit > 0):
              break  # a longer prompt: the batch drains, and the next one is wider
            self._deferred.remove(w)
            admitted.append(w)
            waiting += sum(limit > 0 for limit in w.limits) * w.sampling.n
        for w in admitted:
          w.result = [{"samples": [], "prompt_scores": None} for _ in w.prompts]
          w.serial = next(serials)
          live[w.serial] = w
          for i, (p, limit, seed) in enumerate(zip(w.prompts, w.limits, w.seeds)):
            if limit > 0:
              batch.add((w.serial, i), p, seed, limit)
              owners[(w.serial, i)] = (w, i)
              w.remaining += 1
        admitted = []
        for w in list(live.values()):
          if w.abandoned:  # its client gave up: its prompts not yet decoding are dropped
            batch.cancel(lambda k, w=w: k[0] == w.serial)
            for k in [k for k in owners if k[0] == w.serial and k not in batch.left]:  # dropped, or cut short
              del owners[k]
              w.remaining -= 1
            if not w.remaining:
              live.pop(w.serial)
              _let_go(w)
        if batch is None or batch.idle:
          batch = None
          for w in live.values():  # cancelled ones
            _let_go(w)
          live.clear()
          owners.clear()
          if not scored:
            time.sleep(0.005)
          continue
        for k, out in batch.step().items():
          w, i = owners[k]
          w.result[i]["samples"] = [out.sample(0, j) for j in range(w.sampling.n)]
          w.remaining -= 1
          if not w.remaining:
            live.pop(w.serial, None)
            if w.abandoned:  # some of its prompts were dropped: nobody waits for it
              _let_go(w)
            else:
              self._finish(w)
          del owners[k]
      except Exception as e:  # noqa: BLE001  (one bad batch never stops the server)
        log.exception("serve: a batch failed")
        # The requests it held, and those a batch could not be built for (the oldest, at least).
        head = new_batch or ([self._deferred[0]] if batch is None and self._deferred else [])
        for w in [*live.values(), *admitted, *scored, *head]:
          with self._lock:
            if w in self._deferred:
              self._deferred.remove(w)
          if not w.done.is_set():
            w.error = RequestError(500, f"the server failed on this request: {type(e).__name__}: {e}")
            w.done.set()
        live.clear()
        owners.clear()
        batch, self._width = None, 0
    self._fail_waiting(RequestError(503, "the server is shutting down", code="unavailable"))
    for w in live.values():
      if not w.done.is_set():
        w.error = RequestError(503, "the server is shutting down", code="unavailable")
        w.done.set()

  def _fail_waiting(self, error: RequestError) -> None:
    with self._lock:
      waiting = self._deferred
      self._deferred = []
      while True:
        try:
          waiting.append(self.queue.get_nowait())
        except queue.Empty:
          break
    for w in waiting:
      w.error = error
      w.done.set()

  def _finish(self, w: _Work) -> None:
    """A request whose prompts are all answered: its prompts scored when it asks (echo), and handed back."""
    if w.score:
      for i, p in enumerate(w.prompts):
        w.result[i]["prompt_scores"] = self.score(w.model, p, w.top)
    w.done.set()

  # Scoring a prompt (echo): each token's log-probability given the ones before it, and the top ones.

  def _score(self, weights, tokens_1xL, length, *, top: int):
    model = self.sampler._model(weights)
    positions = jnp.arange(tokens_1xL.shape[1])[None]
    real = (positions < length).astype(jnp.int32)
    logits = model(tokens_1xL, positions, real).astype(jnp.float32)[0]
    lp = jax.nn.log_softmax(logits[:-1], axis=-1)
    chosen = jnp.take_along_axis(lp, tokens_1xL[0, 1:, None], axis=-1)[:, 0]
    if top:
      vals, ids = jax.lax.top_k(lp, top)
      return chosen, vals, ids
    return chosen, None, None

  def score(self, model: str, tokens: list[int], top: int) -> dict:
    length = next(b for b in sampler_lib.make_buckets(max(self.max_prompt, 16)) if b >= len(tokens))
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(tokens)] = tokens
    chosen, vals, ids = jax.device_get(self.score_fn(self.weights[model], jnp.asarray(padded),
                                                     jnp.int32(len(tokens)), top=top))
    n = len(tokens) - 1
    return {"logprobs": [None] + np.asarray(chosen)[:n].tolist(),
            "top_ids": [None] + (np.asarray(ids)[:n].tolist() if top else [None] * n),
            "top_logprobs": [None] + (np.asarray(vals)[:n].tolist() if top else [None] * n)}


# ----------------------------------------------------------------------------- requests


def _number(body, name, kind, default, lo=None, hi=None):
  value = body.get(name, default)
  if value is None:
    value = default
  if kind is int and isinstance(value, bool) or not isinstance(value, (int, float)) or \
      (kind is int and not float(value).is_integer()):
    raise RequestError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
  value = kind(value)
  if not math.isfinite(value):
    raise RequestError(400, f"'{name}' must be finite, got {value}", name)
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise RequestError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", name)
  return value


class Api:
  """Turns OpenAI request bodies into work for the engine and its answers into OpenAI responses."""

  def __init__(self, engine: Engine, *, stop_ids: tuple[int, ...]):
    self.engine, self.stop_ids = engine, tuple(stop_ids)
    self.created = int(time.time())

  def models(self) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "emjax"}
                                       for name in self.engine.models]}

  def _common(self, body: Mapping, *, chat_request: bool) -> dict:
    if not isinstance(body, Mapping):
      raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model not in self.engine.models:
      raise RequestError(404, f"the model {model!r} does not exist; served: {sorted(self.engine.models)}", "model",
                         "model_not_found")
    if body.get("stream"):
      raise RequestError(400, "stream=true is not supported by this server; ask without streaming", "stream")
    for name in UNSUPPORTED:  # known parameters that would change the answer: refused, never ignored
      if body.get(name) not in (None, {}, [], "none", "auto") and not (name == "response_format" and
                                                                   body[name] == {"type": "text"}):
        raise RequestError(400, f"'{name}' is not supported by this server", name)
    n = _number(body, "n", int, 1, 1, 128)
    temperature = _number(body, "temperature", float, 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", float, 1.0, 0.0, 1.0)
    if top_p == 0.0:
      raise RequestError(400, "'top_p' must be > 0", "top_p")
    default_max = self.engine.cap if chat_request else min(16, self.engine.cap)
    name = "max_completion_tokens" if chat_request and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, int, default_max, 0, self.engine.cap)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
      raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                         "stop")
    extra = body.get("stop_token_ids") or []
    vocab = self.engine.sampler.model_cfg.vocab_size
    if not isinstance(extra, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in extra):
      raise RequestError(400, f"'stop_token_ids' must be a list of token ids in [0, {vocab})", "stop_token_ids")
    seed = body.get("seed")
    if seed is None:
      seed = secrets.randbits(31)
    elif isinstance(seed, bool) or not isinstance(seed, int):
      raise RequestError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    sampling = sampler_lib.SamplingParams(
        max_new_tokens=max(max_tokens, 1), temperature=temperature, top_p=top_p, n=n,
        stop_token_ids=tuple(dict.fromkeys([*self.stop_ids, *extra])))
    return {"model": model, "n": n, "max_tokens": max_tokens, "stop": stop, "seed": int(seed), "sampling": sampling,
            "stop_ids": set(sampling.stop_token_ids)}

  def _prompt_checked(self, tokens: list[int], where: str) -> list[int]:
    if not tokens:
      raise RequestError(400, f"{where}: the prompt is empty", where)
    if len(tokens) > self.engine.max_prompt:
      raise RequestError(400, f"{where}: the prompt has {len(tokens)} tokens; this server takes at most "
                         f"{self.engine.max_prompt} (config.sample.max_prompt_length)", where, "context_length_exceeded")
    vocab = self.engine.sampler.model_cfg.vocab_size
    if any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
      raise RequestError(400, f"{where}: token ids must be integers in [0, {vocab})", where)
    return tokens

  def _run(self, common: dict, prompts: list[list[int]], *, score: bool, top: int):
    if len(prompts) * common["n"] > MAX_ROWS_PER_REQUEST:
      raise RequestError(400, f"{len(prompts)} prompts x n={common['n']} answers in one request; this server takes at "
                         f"most {MAX_ROWS_PER_REQUEST} (the queue bounds requests, not their size)", "prompt")
    seeds = [(common["seed"] * 1_000_003 + i) % 2**31 for i in range(len(prompts))]
    work = _Work(model=common["model"], prompts=prompts, sampling=common["sampling"],
                 limits=[common["max_tokens"]] * len(prompts), seeds=seeds, score=score, top=top)
    return self.engine.submit(work)

  def _text(self, tokens: list[int], stops: list[str], stop_ids: set[int]) -> tuple[str, int, bool]:
    """(text, answer tokens kept: the stop id that ended it is not, cut at a stop string)."""
    ids = [t for t in tokens if t not in stop_ids]
    text = self.engine.tokenizer.decode(ids)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut < 0:
      return text, len(ids), False
    kept = 0  # the tokens whose text lies before the cut
    while kept < len(ids) and len(self.engine.tokenizer.decode(ids[:kept + 1])) <= cut:
      kept += 1
    return text[:cut], kept, True

  def _token(self, t: int) -> str:
    return self.engine.tokenizer.decode([int(t)])

  def completions(self, body: Mapping) -> dict:
    common = self._common(body, chat_request=False)
    raw = body.get("prompt")
    if isinstance(raw, str):
      items = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
      items = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, (str, list)) for x in raw):
      items = raw
    else:
      raise RequestError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such "
                         "lists", "prompt")
    sc = self.engine.models[common["model"]].config.sample
    prompts, shown = [], []
    for k, item in enumerate(items):
      where = f"prompt[{k}]" if len(items) > 1 else "prompt"
      if isinstance(item, str) and not item:
        raise RequestError(400, f"{where}: the prompt is empty", where)
      # Text is encoded as the sample job encodes a plain prompt (BOS when config.sample.add_bos), no template.
      tokens = list(item) if isinstance(item, list) else (
          ([self.engine.tokenizer.bos_id] if sc.add_bos else []) + list(self.engine.tokenizer.encode(item)))
      prompts.append(self._prompt_checked(tokens, where))
      shown.append(1 if isinstance(item, str) and sc.add_bos else 0)  # the BOS added here is not echoed
    top = body.get("logprobs")
    top = None if top is None else _number(body, "logprobs", int, 0, 0, min(MAX_TOP_LOGPROBS, self._top_cap()))
    echo = bool(body.get("echo", False))
    if not echo and common["max_tokens"] == 0:
      raise RequestError(400, "'max_tokens' must be >= 1 unless echo is true", "max_tokens")
    results = self._run(common, prompts, score=echo and top is not None, top=top or 0)
    choices, used = [], 0
    for k, (prompt, res) in enumerate(zip(prompts, results)):
      samples = res["samples"] or [None] * common["n"]
      for j, s in enumerate(samples):
        text, kept, cut = ("", 0, False) if s is None else self._text(s["tokens"], common["stop"],
                                                                      common["stop_ids"])
        tokens = [] if s is None else s["tokens"][:kept]
        used += len(tokens)
        finish = "length" if s is None else ("stop" if cut or s["finish_reason"] == "stop" else "length")
        if echo:
          text = self.engine.tokenizer.decode(prompt[shown[k]:]) + text
        choice = {"index": k * common["n"] + j, "text": text, "finish_reason": finish, "logprobs": None}
        if top is not None:
          choice["logprobs"] = self._completion_logprobs(prompt if echo else [], res.get("prompt_scores"),
                                                         tokens, s, kept, top, skip=shown[k] if echo else 0)
        choices.append(choice)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": common["model"], "choices": choices,
            "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": used,
                      "total_tokens": sum(map(len, prompts)) + used}}

  def _top_cap(self) -> int:
    return self.engine.sampler.top_logprobs

  def _completion_logprobs(self, prompt, scores, tokens, sample, kept, top, skip: int = 0) -> dict:
    pieces, lps, tops = [], [], []
    if prompt:
      for i, t in enumerate(prompt):
        if i < skip:
          continue
        pieces.append(self._token(t))
        lps.append(scores["logprobs"][i] if scores else None)
        tops.append(None if i == 0 or not top else
                    {self._token(a): float(b) for a, b in zip(scores["top_ids"][i], scores["top_logprobs"][i])})
    for i, t in enumerate(tokens):
      pieces.append(self._token(t))
      lps.append(float(sample["logprobs"][i]))
      tops.append({self._token(a): float(b) for a, b in zip(sample["top_ids"][i][:top], sample["top_logprobs"][i][:top])}
                  if top else None)
    offsets, pos = [], 0
    for p in pieces:
      offsets.append(pos)
      pos += len(p)
    return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": tops if top else None, "text_offset": offsets}

  def chat_completions(self, body: Mapping) -> dict:
    common = self._common(body, chat_request=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages):
      raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    plain = []
    for m in messages:
      content = m.get("content")
      if isinstance(content, list):  # [{"type": "text", "text": ...}]
        content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
      if not isinstance(content, str):
        raise RequestError(400, "each message's 'content' must be text", "messages")
      plain.append({"role": m["role"], "content": content})
    if common["max_tokens"] == 0:
      raise RequestError(400, "'max_tokens' must be >= 1", "max_tokens")
    try:
      tokens = sample_run.apply_chat_template(self.engine.tokenizer, plain)
    except Exception as e:  # noqa: BLE001  (no template, or one that refuses these messages)
      raise RequestError(400, f"the chat template refused these messages: {e}", "messages") from None
    tokens = self._prompt_checked(tokens, "messages")
    want = bool(body.get("logprobs", False))
    top = _number(body, "top_logprobs", int, 0, 0, min(MAX_TOP_LOGPROBS, self._top_cap())) if want else 0
    (res,) = self._run(common, [tokens], score=False, top=top)
    choices, used = [], 0
    for j, s in enumerate(res["samples"]):
      text, kept, cut = self._text(s["tokens"], common["stop"], common["stop_ids"])
      used += kept
      choice = {"index": j, "message": {"role": "assistant", "content": text},
                "finish_reason": "stop" if cut or s["finish_reason"] == "stop" else "length", "logprobs": None}
      if want:
        content = []
        for i, t in enumerate(s["tokens"][:kept]):
          if t in self.stop_ids:
            continue
          piece = self._token(t)
          content.append({"token": piece, "logprob": float(s["logprobs"][i]), "bytes": list(piece.encode()),
                          "top_logprobs": [{"token": self._token(a), "logprob": float(b), "bytes": list(self._token(a).encode())}
                                           for a, b in zip(s["top_ids"][i][:top], s["top_logprobs"][i][:top])]
                          if top else []})
        choice["logprobs"] = {"content": content}
      choices.append(choice)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": common["model"], "choices": choices,
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": used, "total_tokens": len(tokens) + used}}


# ----------------------------------------------------------------------------- HTTP


def make_handler(api: Api, token: str | None):
  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # the job's log, not stderr
      log.info("serve: %s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: Mapping) -> None:
      data = json.dumps(body).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _authorised(self) -> None:
      if token is not None and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                       f"Bearer {token}".encode()):
        raise RequestError(401, "a valid bearer token is required (Authorization: Bearer ...)", code="invalid_api_key")

    def _handle(self, route) -> None:
      try:
        self._authorised()
        self._send(200, route())
      except RequestError as e:
        self._send(e.status, e.body())
      except Exception as e:  # noqa: BLE001  (never a crash: the next request is served)
        log.exception("serve: request failed")
        self._send(500, RequestError(500, f"{type(e).__name__}: {e}").body())

    def _read(self) -> bytes:
      return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    @staticmethod
    def _json(raw: bytes) -> Any:
      try:
        return json.loads(raw or b"null")
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not JSON: {e}") from None

    def do_GET(self):  # noqa: N802
      path = self.path.split("?")[0].rstrip("/")
      if path == "/v1/models":
        self._handle(api.models)
      elif path.startswith("/v1/models/"):
        name = path[len("/v1/models/"):]
        self._handle(lambda: next((m for m in api.models()["data"] if m["id"] == name), None) or
                     (_ for _ in ()).throw(RequestError(404, f"the model {name!r} does not exist", code="model_not_found")))
      elif path == "/health":
        self._handle(lambda: {"status": "ok", "waiting": api.engine.waiting()} if api.engine.worker.is_alive() else
                     (_ for _ in ()).throw(RequestError(503, "the worker has stopped")))
      else:
        self._handle(lambda: (_ for _ in ()).throw(RequestError(404, f"no route {self.path!r}")))

    def do_POST(self):  # noqa: N802
      raw = self._read()  # first, whatever the answer: a kept-alive connection then reads the next request
      path = self.path.split("?")[0].rstrip("/")
      routes = {"/v1/completions": api.completions, "/v1/chat/completions": api.chat_completions}
      if path not in routes:
        self._handle(lambda: (_ for _ in ()).throw(RequestError(404, f"no route {self.path!r}")))
        return
      self._handle(lambda: routes[path](self._json(raw)))

  return Handler


class Server:
  """The HTTP server and its engine; `start()` serves in a thread, `serve_forever()` in this one."""

  def __init__(self, engine: Engine, api: Api, *, host: str, port: int, token: str | None):
    self.engine, self.api = engine, api
    self.httpd = http.server.ThreadingHTTPServer((host, int(port)), make_handler(api, token))
    self.httpd.daemon_threads = True
    self.host, self.port = host, self.httpd.server_address[1]
    self.thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}/v1"

  def start(self) -> "Server":
    self.thread = threading.Thread(target=self.httpd.serve_forever, name="emjax-serve-http", daemon=True)
    self.thread.start()
    return self

  def stop(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()
    self.engine.stop()


def _adapters(spec: str) -> dict[str, str]:
  out = {}
  for part in [p.strip() for p in str(spec or "").split(",") if p.strip()]:
    name, eq, path = part.partition("=")
    if not eq or not name.strip() or not path.strip():
      raise ValueError(f"config.serve.adapters: {part!r} is not 'name=DIR'")
    out[name.strip()] = path.strip()
  return out


def build(config, *, mesh=None) -> Server:
  """The server of `config` (`config.sample` names the first model, `config.serve` the rest), not yet started."""
  sv = config.serve
  if jax.process_count() > 1:
    raise ValueError("the serve job runs in one process (its HTTP server and worker would be one per process, "
                     "and the others would wait in collectives forever); launch it without jax.distributed")
  if sv.host not in ("127.0.0.1", "localhost", "::1"):
    log.warning("serve: listening on %s, reachable from other machines", sv.host)
  token = None
  if sv.api_key_env:
    token = os.environ.get(str(sv.api_key_env))
    if not token:
      raise ValueError(f"config.serve.api_key_env={sv.api_key_env!r}: that environment variable is not set")
  first = sample_run.load_model(config, mesh=mesh)
  name = sv.model_name or os.path.basename(os.path.normpath(config.sample.hf or config.sample.checkpoint))
  models = {name: first}
  for adapter, path in _adapters(sv.adapters).items():
    if adapter in models:
      raise ValueError(f"config.serve.adapters: the model id {adapter!r} is served twice")
    c = config.copy_and_resolve_references()
    with c.unlocked():  # an emjax run (its checkpoints/), else a Hugging Face directory or PEFT adapter
      c.sample.hf, c.sample.checkpoint = ("", path) if os.path.isdir(os.path.join(path, "checkpoints")) else (path, "")
    models[adapter] = sample_run.load_model(c, mesh=first.mesh or mesh)
  engine = Engine(models, slots=int(sv.slots), queue_size=int(sv.queue), cache_bucket=int(sv.cache_bucket),
                  switch_after_s=float(sv.switch_after_s), prefill_rows=int(sv.prefill_rows))
  stops = sample_run.sampling_params(config.sample, first.tokenizer, first.mask).stop_token_ids
  return Server(engine, Api(engine, stop_ids=stops), host=str(sv.host), port=int(sv.port), token=token)


def run_serve(config, workdir: str, *, mesh=None) -> None:
  """The serve job: serves until interrupted (SIGINT / SIGTERM)."""
  server = build(config, mesh=mesh)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.record_launch(workdir, "serve")
  workdir_lib.write_json(os.path.join(workdir, "server.json"),
                         {"url": server.url, "models": sorted(server.engine.models), "pid": os.getpid()})
  log.info("serve: %s (models %s)", server.url, sorted(server.engine.models))
  print(f"[emjax] serving {sorted(server.engine.models)} at {server.url}", flush=True)
  try:
    server.httpd.serve_forever()
  finally:
    server.stop()
