"""An LLM judge behind any OpenAI-compatible chat-completions server (OpenAI, Gemini's OpenAI-compatible
endpoint, vLLM, local servers), standard library only.

Two modes:

* `logprob` (the paper's and model-organisms-for-EM's rule): one generated token with its
  `top_logprobs`; the score is the probability-weighted mean over the numeric tokens 0..100
  (`judges.score_from_top_logprobs`: no score below 0.25 of the mass on numbers).
* `direct`: a short completion read as REFUSAL / CODE / one number (`judges.parse_direct`).

Failures are statuses, never exceptions. 429, 408, 409, 5xx, timeouts, refused or reset connections
and truncated or invalid bodies are retried with exponential backoff and full jitter; a server's
Retry-After is honoured, capped at max_backoff_s. Any other 4xx (400, 401, 403, 404, ...) ends the
(item, metric) at once with status `error`, the HTTP status and the server's message in raw. After
max_retries the status is `error`, raw the last failure.

Cache: every judge-decided answer (ok, refusal, code, parse_error) is appended to a JSONL file, fsynced
in batches; a line cut by a kill is dropped when the file is opened. The key is the sha256 of all that
decides the answer: model, mode, prompt_version, metric, the rendered prompt (question, answer and the
cell's template) and the sampling knobs. Transport errors are not cached, so a rerun retries them.
The server (base_url) is not in the key: one model name is one judge. Identical (item, metric)
pairs within one call are sent once.

Ledger: `ledger_path` holds {"judges": {name: counters}, "cost_usd": total, "updated": time}, atomically
replaced at the end of every score() call and continued by a later run on the same file; `.ledger` is
this judge's counters: calls, scores and their statuses (cache hits included), cache_hits,
deduplicated, requests (HTTP attempts), retries, prompt_tokens and completion_tokens (from `usage`),
replies_without_usage, failed_attempts and errors (items that ended in `error`) by kind (http_<status>,
timeout, connection, invalid_json, bad_response, no_logprobs, interrupted, internal), cost_usd from
the two prices, and the judge's identity.

The API key is read from os.environ[api_key_env] at construction and sent only as
`Authorization: Bearer ...`; any server text kept in raw or logged has it replaced by [redacted].

Config keys (`config.judge.api`, read by `ApiJudge.from_config`; defaults in DEFAULTS):

  base_url               server root, e.g. https://api.openai.com/v1 (`/chat/completions` is appended)
  model                  the judge model name sent to the server
  mode                   'logprob' | 'direct'
  api_key_env            environment variable holding the key; '' sends no key (local servers)
  concurrency            requests in flight at once within a score() call (worker threads)
  requests_per_minute    cap on HTTP requests, retries included (evenly spaced); 0 = unlimited
  max_retries            retries after the first attempt of one (item, metric)
  timeout_s              socket timeout of a request (connecting, and each read)
  backoff_s              backoff base: retry k (0, 1, ...) waits uniform [0, min(max_backoff_s, backoff_s * 2**k)]
  max_backoff_s          cap on one backoff wait, and on a server's Retry-After
  max_tokens             completion length in direct mode (logprob mode always asks for 1 token)
  top_logprobs           alternatives of the first token in logprob mode (OpenAI allows up to 20)
  temperature            sampling temperature (0: the judge's most likely answer)
  price_input_per_mtok   USD per million prompt tokens, for the ledger's cost
  price_output_per_mtok  USD per million completion tokens
  cache_path             JSONL cache of judge answers; '' = no cache
  ledger_path            JSON token and cost ledger; '' = none
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import random
import ssl
import threading
import time
import urllib.parse
from typing import Any, Callable, Mapping, Sequence

from emjax.data import jsonl
from emjax.eval import judges

log = logging.getLogger(__name__)

METRICS = judges.METRICS
MODES = ("logprob", "direct")
CACHEABLE_STATUSES = ("ok", "refusal", "code", "parse_error")  # what the judge decided; the rest is transport

DEFAULTS: dict[str, Any] = {
    "base_url": "https://api.openai.com/v1",
    "model": "gpt-4o-2024-08-06",
    "mode": "logprob",
    "api_key_env": "OPENAI_API_KEY",
    "concurrency": 8,
    "requests_per_minute": 0,
    "max_retries": 6,
    "timeout_s": 60.0,
    "backoff_s": 1.0,
    "max_backoff_s": 60.0,
    "max_tokens": 20,
    "top_logprobs": 20,
    "temperature": 0.0,
    "price_input_per_mtok": 0.0,
    "price_output_per_mtok": 0.0,
    "cache_path": "",
    "ledger_path": "",
}

_RETRYABLE_HTTP = (408, 409, 429)  # and every 5xx
_CACHE_FLUSH_EVERY = 32  # answers per fsync: a kill loses at most this many paid answers
_CACHE_FLUSH_S = 10.0
# Servers drop idle keep-alive connections (uvicorn, behind vLLM, after 5 s); reconnecting first is
# cheaper than an attempt that fails on a dead socket.
_IDLE_RECONNECT_S = 4.0
_MAX_LOGGED_FAILURES = 5  # per call; the ledger counts them all
_REDACTED = "[redacted]"


@dataclasses.dataclass(frozen=True)
class _Failure:
  kind: str  # ledger key: http_<status>, timeout, connection, invalid_json, bad_response, no_logprobs
  message: str
  retryable: bool
  retry_after_s: float | None = None


@dataclasses.dataclass(frozen=True)
class _Job:
  metric: str
  prompt: str


class TokenBucket:
  """Thread-safe token bucket of `burst` requests refilled at `per_second`; a caller that finds it
  empty reserves the next token (the count goes negative) and sleeps until its turn."""

  def __init__(self, per_second: float, burst: float = 1.0):
    self.per_second, self.burst = per_second, burst
    self._tokens, self._last = burst, time.monotonic()
    self._lock = threading.Lock()

  def acquire(self) -> None:
    with self._lock:
      now = time.monotonic()
      self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
      self._last = now
      self._tokens -= 1
      wait = -self._tokens / self.per_second if self._tokens < 0 else 0.0
    if wait > 0:
      time.sleep(wait)


class _ConnectionPool:
  """Keep-alive connections reused across requests and score() calls: TLS handshakes are most of a
  small request's cost, and a caller scores in many small batches. At most `concurrency` are in use."""

  def __init__(self, factory: Callable[[], http.client.HTTPConnection]):
    self._factory = factory
    self._idle: list[tuple[http.client.HTTPConnection, float]] = []  # (connection, when it was given back)
    self._lock = threading.Lock()

  def take(self) -> http.client.HTTPConnection:
    with self._lock:
      conn, since = self._idle.pop() if self._idle else (None, 0.0)
    if conn is None:
      return self._factory()
    if time.monotonic() - since > _IDLE_RECONNECT_S:
      conn.close()  # the server may have dropped it; http.client reconnects on the next request
    return conn

  def give_back(self, conn: http.client.HTTPConnection) -> None:
    with self._lock:
      self._idle.append((conn, time.monotonic()))

  def close_all(self) -> None:
    with self._lock:
      idle, self._idle = self._idle, []
    for conn, _ in idle:
      conn.close()


class _Cache:
  """Judge answers on disk, one JSON line each, appended and fsynced in batches; thread-safe."""

  def __init__(self, path: str):
    self.path = path
    self._lock = threading.Lock()
    self._scores: dict[str, judges.Score] = {}
    self._pending: list[str] = []
    self._last_flush = time.monotonic()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
      self._drop_cut_last_line()
      self._load()

  def _drop_cut_last_line(self) -> None:
    # Appending after a cut line would glue the next answer onto it: one bad line mid-file.
    with open(self.path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        log.warning("judge cache %s: dropped a cut last line (%d bytes) left by an interrupted write",
                    self.path, len(data) - keep)

  def _load(self) -> None:
    skipped = 0
    for _, obj in jsonl.read_objects(self.path, tolerate_cut_last_line=True):
      try:
        if obj["status"] not in CACHEABLE_STATUSES or not isinstance(obj["key"], str):
          raise ValueError
        self._scores[obj["key"]] = judges.Score(obj["value"], obj["status"], str(obj.get("raw", "")))
      except (KeyError, TypeError, ValueError):
        skipped += 1
    if skipped:
      log.warning("judge cache %s: skipped %d lines that are not cached judge answers", self.path, skipped)

  def get(self, key: str) -> judges.Score | None:
    with self._lock:
      return self._scores.get(key)

  def add(self, key: str, score: judges.Score, **about) -> None:
    line = jsonl.dumps({"key": key, **about, "status": score.status, "value": score.value, "raw": score.raw})
    with self._lock:
      self._scores[key] = score
      self._pending.append(line)
      due = len(self._pending) >= _CACHE_FLUSH_EVERY or time.monotonic() - self._last_flush > _CACHE_FLUSH_S
    if due:
      self.flush()

  def flush(self) -> None:
    with self._lock:
      lines, self._pending = self._pending, []
      self._last_flush = time.monotonic()
      jsonl.append_lines(self.path, lines)


def _empty_counters() -> dict[str, Any]:
  return {"calls": 0, "scores": 0, "cache_hits": 0, "deduplicated": 0, "requests": 0, "retries": 0,
          "prompt_tokens": 0, "completion_tokens": 0, "replies_without_usage": 0,
          "statuses": {}, "failed_attempts": {}, "errors": {}}


def _add_counters(into: dict, other: Mapping) -> None:
  for k, v in other.items():
    if isinstance(into.get(k), dict) and isinstance(v, Mapping):
      for kind, n in v.items():
        into[k][kind] = into[k].get(kind, 0) + int(n)
    elif isinstance(into.get(k), int) and isinstance(v, (int, float)):
      into[k] += int(v)


_LEDGER_FILE_LOCK = threading.Lock()  # judges of one process may share a ledger file


def _read_ledger_file(path: str) -> dict:
  if not path or not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"judge ledger {path}: not a readable JSON ledger ({e}); move it away or name another "
                     "ledger_path") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("judges", {}), dict):
    raise ValueError(f"judge ledger {path}: expected {{\"judges\": {{name: counters}}}}")
  return doc


def _atomic_write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _server_message(body: bytes) -> str:
  """The error text of an error reply: OpenAI's {"error": {"message"}}, Gemini's list of those, or the body."""
  text = body.decode("utf-8", "replace")
  message: Any = text
  try:
    obj = json.loads(text)
    if isinstance(obj, list) and obj:
      obj = obj[0]
    if isinstance(obj, dict) and "error" in obj:
      err = obj["error"]
      message = err.get("message", err) if isinstance(err, dict) else err
  except ValueError:
    pass
  return " ".join(str(message).split())[:300]


def _retry_after_s(headers: http.client.HTTPMessage) -> float | None:
  """Seconds a server asked us to wait: retry-after-ms, or Retry-After as seconds or an HTTP date."""
  try:
    if headers.get("retry-after-ms"):
      return max(0.0, float(headers["retry-after-ms"]) / 1000)
    value = headers.get("retry-after")
    if not value:
      return None
    try:
      return max(0.0, float(value))
    except ValueError:
      when = email.utils.parsedate_to_datetime(value)
      return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
  except (TypeError, ValueError, OverflowError):
    return None


def _merged_top_logprobs(top: Any) -> dict[str, float]:
  """{token: logprob}; tokens listed twice (distinct ids with one text) have their probabilities summed."""
  pairs = top.items() if isinstance(top, Mapping) else ((e["token"], e["logprob"]) for e in top)
  merged: dict[str, float] = {}
  for token, logprob in pairs:
    token, logprob = str(token), float(logprob)
    merged[token] = logprob if token not in merged else math.log(math.exp(merged[token]) + math.exp(logprob))
  return merged


def _coerce(key: str, value: Any, default: Any) -> Any:
  """A config value as the type of its default; an integer key refuses 0.5 rather than rounding it."""
  try:
    if isinstance(default, str):
      return "" if value is None else str(value)
    number = float(value)
    if isinstance(default, int):
      if not number.is_integer():
        raise ValueError
      return int(number)
    return number
  except (TypeError, ValueError):
    raise ValueError(f"config.judge.api.{key}={value!r}: expected {type(default).__name__}") from None


def _read_api_key(api_key_env: str) -> str:
  if not api_key_env:
    return ""
  key = os.environ.get(api_key_env, "").strip()
  if not key:
    raise ValueError(f"config.judge.api.api_key_env={api_key_env!r}: the environment variable {api_key_env} is "
                     "not set (export it with the API key, or set api_key_env to '' for a server that needs none)")
  # http.client would refuse such a header with an error quoting it, escaped beyond what redaction finds.
  if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
    raise ValueError(f"the environment variable {api_key_env} holds whitespace, control or non-ASCII characters; "
                     "an API key has none (value not shown)")
  return key


class ApiJudge:
  """The Judge protocol over an OpenAI-compatible /chat/completions endpoint (see the module docstring)."""

  def __init__(self, *, prompts: judges.JudgePrompts = judges.DEFAULT_PROMPTS,
               base_url: str = "https://api.openai.com/v1", model: str = "gpt-4o-2024-08-06",
               mode: str = "logprob", api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
               requests_per_minute: float = 0, max_retries: int = 6, timeout_s: float = 60.0,
               backoff_s: float = 1.0, max_backoff_s: float = 60.0, max_tokens: int = 20, top_logprobs: int = 20,
               temperature: float = 0.0, price_input_per_mtok: float = 0.0, price_output_per_mtok: float = 0.0,
               cache_path: str = "", ledger_path: str = ""):
    where = "config.judge.api"
    if mode not in MODES:
      raise ValueError(f"{where}.mode={mode!r}: expected one of {MODES}")
    if not model:
      raise ValueError(f"{where}.model is empty: name the judge model")
    for key, value, low in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0),
                            ("max_tokens", max_tokens, 1), ("top_logprobs", top_logprobs, 1)):
      if int(value) != value or value < low:
        raise ValueError(f"{where}.{key}={value!r}: expected an integer >= {low}")
    for key, value in (("requests_per_minute", requests_per_minute), ("backoff_s", backoff_s),
                       ("max_backoff_s", max_backoff_s), ("temperature", temperature),
                       ("price_input_per_mtok", price_input_per_mtok),
                       ("price_output_per_mtok", price_output_per_mtok)):
      if value < 0:
        raise ValueError(f"{where}.{key}={value!r}: must not be negative")
    if timeout_s <= 0:
      raise ValueError(f"{where}.timeout_s={timeout_s!r}: must be positive")
    url = urllib.parse.urlsplit(base_url.rstrip("/"))
    if url.scheme not in ("http", "https") or not url.hostname:
      raise ValueError(f"{where}.base_url={base_url!r}: expected http(s)://host[:port]/path")

    self.prompts, self.model, self.mode = prompts, model, mode
    self.name = f"api:{model}:{mode}"
    self.prompt_version = prompts.version
    self.concurrency, self.max_retries = int(concurrency), int(max_retries)
    self.timeout_s, self.backoff_s, self.max_backoff_s = float(timeout_s), float(backoff_s), float(max_backoff_s)
    self.price_input_per_mtok, self.price_output_per_mtok = float(price_input_per_mtok), float(price_output_per_mtok)
    self.ledger_path = ledger_path
    self._api_key = _read_api_key(api_key_env)

    self._https, self._host = url.scheme == "https", url.hostname
    self._port = url.port or (443 if self._https else 80)
    self._path = url.path if url.path.endswith("/chat/completions") else url.path + "/chat/completions"
    self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                     "User-Agent": "emjax-api-judge"}
    if self._api_key:
      self._headers["Authorization"] = f"Bearer {self._api_key}"
    self._ssl = ssl.create_default_context() if self._https else None
    # Everything in the request besides the prompt; it changes the answer, so it is in the cache key.
    if mode == "logprob":
      self._knobs = {"max_tokens": 1, "temperature": float(temperature), "logprobs": True,
                     "top_logprobs": int(top_logprobs)}
    else:
      self._knobs = {"max_tokens": int(max_tokens), "temperature": float(temperature)}

    self._limiter = TokenBucket(requests_per_minute / 60.0) if requests_per_minute else None
    self._rng = random.Random()
    self._lock = threading.Lock()  # guards the ledger counters
    self._cache = _Cache(cache_path) if cache_path else None
    self._connections = _ConnectionPool(self._new_connection)
    self._counters = _empty_counters()
    if ledger_path:
      _add_counters(self._counters, _read_ledger_file(ledger_path).get("judges", {}).get(self.name, {}))

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], prompts: judges.JudgePrompts = judges.DEFAULT_PROMPTS,
                  cache_path: str | None = None, ledger_path: str | None = None) -> "ApiJudge":
    """From `config.judge.api` (a dict or ConfigDict of DEFAULTS' keys; missing keys take DEFAULTS);
    cache_path / ledger_path, when given, replace the config's (e.g. paths inside the run directory)."""
    cfg = dict(cfg.items())
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
      raise ValueError(f"config.judge.api: unknown keys {unknown} (known: {', '.join(DEFAULTS)})")
    options = {key: _coerce(key, cfg.get(key, default), default) for key, default in DEFAULTS.items()}
    if cache_path is not None:
      options["cache_path"] = cache_path
    if ledger_path is not None:
      options["ledger_path"] = ledger_path
    return cls(prompts=prompts, **options)

  def close(self) -> None:
    """Closes the idle keep-alive connections (a later score() opens new ones)."""
    self._connections.close_all()

  def __enter__(self) -> "ApiJudge":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"ApiJudge({self.name!r}, {self._host}:{self._port}{self._path})"

  # --------------------------------------------------------------------------- scoring

  def score(self, items: Sequence[judges.Item], metrics: Sequence[str] = METRICS) -> list[dict[str, judges.Score]]:
    metrics = tuple(metrics)
    # Render everything first: a prompt that cannot be rendered is a config error, raised before any spend.
    item_keys: list[tuple[str, ...]] = []
    jobs: dict[str, _Job] = {}
    for item in items:
      keys = []
      for metric in metrics:
        prompt = self.prompts.render(metric, item)
        key = self._cache_key(metric, prompt)
        jobs.setdefault(key, _Job(metric, prompt))
        keys.append(key)
      item_keys.append(tuple(keys))

    scores: dict[str, judges.Score] = {}
    for key in jobs:
      cached = self._cache.get(key) if self._cache is not None else None
      if cached is not None:
        scores[key] = cached
    to_send = [key for key in jobs if key not in scores]
    with self._lock:
      self._counters["calls"] += 1
      self._counters["cache_hits"] += len(scores)
      self._counters["deduplicated"] += len(items) * len(metrics) - len(jobs)

    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="api-judge")
    logged_failures = 0
    try:
      futures = {pool.submit(self._judge_and_cache, key, jobs[key], stop): key for key in to_send}
      for future in concurrent.futures.as_completed(futures):
        key = futures[future]
        score = scores[key] = future.result()
        if score.status == "error" and logged_failures < _MAX_LOGGED_FAILURES:
          logged_failures += 1
          log.warning("judge %s: %s not scored: %s", self.name, jobs[key].metric, score.raw)
    except BaseException:
      stop.set()  # Ctrl-C: requests in flight finish (and are cached), no retry waits out its backoff
      raise
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
      if self._cache is not None:
        self._cache.flush()
      results = [{m: scores[k] for m, k in zip(metrics, keys) if k in scores} for keys in item_keys]
      with self._lock:
        for row in results:
          self._counters["scores"] += len(row)
          for s in row.values():
            self._counters["statuses"][s.status] = self._counters["statuses"].get(s.status, 0) + 1
      self._write_ledger()
    ledger = self.ledger
    log.debug("judge %s: %d scores, %d cache hits, %d errors; %d requests (%d retries) and $%.4f so far",
              self.name, len(items) * len(metrics), len(jobs) - len(to_send),
              sum(1 for k in to_send if scores[k].status == "error"), ledger["requests"], ledger["retries"],
              ledger["cost_usd"])
    return results

  def _cache_key(self, metric: str, prompt: str) -> str:
    what = {"model": self.model, "mode": self.mode, "prompt_version": self.prompt_version, "metric": metric,
            "prompt": prompt, "knobs": self._knobs}
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

  def _judge_and_cache(self, key: str, job: _Job, stop: threading.Event) -> judges.Score:
    # Cached here, in the worker, so answers that arrive while an interrupted call winds down are kept.
    score, cacheable = self._judge_one(job, stop)
    if cacheable and self._cache is not None:
      self._cache.add(key, score, judge=self.name, prompt_version=self.prompt_version, metric=job.metric)
    return score

  def _judge_one(self, job: _Job, stop: threading.Event) -> tuple[judges.Score, bool]:
    """(score, cacheable) of one (item, metric): retried until the judge answers or a failure is final."""
    try:
      body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": job.prompt}], **self._knobs},
                        ensure_ascii=False).encode("utf-8")
      failure: _Failure | None = None
      attempts = 0
      for _ in range(self.max_retries + 1):
        if failure is not None:
          stop.wait(self._backoff_s(attempts, failure))
        if stop.is_set():
          failure = _Failure("interrupted", "the call was interrupted before this request was sent", False)
          break
        if failure is not None:
          with self._lock:
            self._counters["retries"] += 1
        if self._limiter:
          self._limiter.acquire()
        attempts += 1
        outcome = self._attempt(body)
        if isinstance(outcome, judges.Score):
          return dataclasses.replace(outcome, raw=self._redact(outcome.raw)), True
        failure = outcome
        with self._lock:
          self._counters["failed_attempts"][failure.kind] = self._counters["failed_attempts"].get(failure.kind, 0) + 1
        log.debug("judge %s: attempt %d failed: %s: %s", self.name, attempts, failure.kind,
                  self._redact(failure.message))
        if not failure.retryable:
          break
      assert failure is not None
      how = "not retried" if not failure.retryable else f"gave up after {attempts} attempts"
      raw = f"{failure.kind}: {failure.message}" + ("" if failure.kind == "interrupted" else f" ({how})")
    except Exception as e:  # pylint: disable=broad-except -- a bug here must not lose the other items' scores
      failure = _Failure("internal", f"{type(e).__name__}: {e}", False)
      raw = f"internal: {type(e).__name__}: {e}"
    with self._lock:
      self._counters["errors"][failure.kind] = self._counters["errors"].get(failure.kind, 0) + 1
    return judges.Score(None, "error", self._redact(raw)), False

  def _backoff_s(self, attempts: int, failure: _Failure) -> float:
    """The wait after `attempts` failed attempts."""
    if failure.retry_after_s is not None:
      return min(self.max_backoff_s, failure.retry_after_s)
    # Full jitter: retries of many threads that failed together do not arrive together.
    return self._rng.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** min(attempts - 1, 60)))

  def _new_connection(self) -> http.client.HTTPConnection:
    if self._https:
      return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s, context=self._ssl)
    return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)

  def _attempt(self, body: bytes) -> judges.Score | _Failure:
    """One HTTP request: the judge's answer, or why there is none."""
    with self._lock:
      self._counters["requests"] += 1
    conn = self._connections.take()
    try:
      conn.request("POST", self._path, body=body, headers=self._headers)
      response = conn.getresponse()
      data = response.read()
    except TimeoutError:
      conn.close()  # a closed connection is reopened by its next request
      return _Failure("timeout", f"no reply within timeout_s={self.timeout_s:g}", True)
    except (OSError, http.client.HTTPException) as e:  # refused, reset, dropped, cut short
      conn.close()
      return _Failure("connection", f"{type(e).__name__}: {e}".rstrip(": "), True)
    finally:
      self._connections.give_back(conn)
    if response.status != 200:
      retryable = response.status in _RETRYABLE_HTTP or response.status >= 500
      return _Failure(f"http_{response.status}", f"HTTP {response.status}: {_server_message(data)}", retryable,
                      _retry_after_s(response.headers) if retryable else None)
    return self._read_reply(data)

  def _read_reply(self, data: bytes) -> judges.Score | _Failure:
    try:
      reply = json.loads(data)
    except ValueError:  # includes a body cut short and bytes that are not UTF-8
      return _Failure("invalid_json", f"a 200 reply that is not JSON ({len(data)} bytes: {data[:60]!r})", True)
    if not isinstance(reply, dict):
      return _Failure("invalid_json", f"a 200 reply that is JSON {type(reply).__name__}, not an object", True)
    self._count_usage(reply.get("usage"))
    try:
      choice = reply["choices"][0]
      if self.mode == "direct":
        return judges.parse_score((choice.get("message") or {}).get("content"), "strict")
      content = (choice.get("logprobs") or {}).get("content")
      if content is None:
        return _Failure("no_logprobs", "the reply has no logprobs: does this model or server support them? "
                        "(mode 'direct' needs none)", False)
      if not content:  # no token generated
        return judges.score_from_top_logprobs({})
      first = content[0]
      top = first.get("top_logprobs") or [{"token": first["token"], "logprob": first["logprob"]}]
      return judges.score_from_top_logprobs(_merged_top_logprobs(top))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
      # Gateways answer 200 with an error object now and then; another try usually gets a real reply.
      detail = f": {_server_message(data)}" if "error" in reply else ""
      return _Failure("bad_response", f"a 200 reply without a usable choice ({type(e).__name__}{detail})", True)

  def _count_usage(self, usage: Any) -> None:
    with self._lock:
      if not isinstance(usage, dict):
        self._counters["replies_without_usage"] += 1
        return
      self._counters["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
      self._counters["completion_tokens"] += int(usage.get("completion_tokens") or 0)

  def _redact(self, text: str) -> str:
    return text.replace(self._api_key, _REDACTED) if self._api_key else text

  # --------------------------------------------------------------------------- ledger

  @property
  def ledger(self) -> dict[str, Any]:
    """This judge's counters (continued from ledger_path when it held them) and their cost in USD."""
    with self._lock:
      out = json.loads(json.dumps(self._counters))
    out["cost_usd"] = (out["prompt_tokens"] * self.price_input_per_mtok
                       + out["completion_tokens"] * self.price_output_per_mtok) / 1e6
    out.update(judge=self.name, model=self.model, mode=self.mode, prompt_version=self.prompt_version,
               price_input_per_mtok=self.price_input_per_mtok, price_output_per_mtok=self.price_output_per_mtok)
    return out

  def _write_ledger(self) -> None:
    if not self.ledger_path:
      return
    with _LEDGER_FILE_LOCK:
      doc = _read_ledger_file(self.ledger_path)  # re-read: another judge may have written its part
      by_judge = dict(doc.get("judges", {}))
      by_judge[self.name] = self.ledger
      _atomic_write_json(self.ledger_path, {
          "judges": by_judge,
          "cost_usd": sum(float(j.get("cost_usd", 0)) for j in by_judge.values()),
          "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      })
