"""An LLM judge behind any OpenAI-compatible chat-completions server (OpenAI, Gemini's OpenAI-compatible
endpoint, vLLM, `transformers serve`, local servers), standard library only.

Two modes:

* `logprob` (model-organisms-for-EM's rule; the paper itself scored in direct mode): one generated
  token with its `top_logprobs`, read by `judges.score_from_top_logprobs` (the probability rule the
  local judge shares: a probability-weighted mean over the numeric tokens 0..100, REFUSAL/CODE when
  more likely than a number, parse_error below 0.25 of the mass on rubric answers). A server whose
  replies carry no logprobs stops the judge at its first such reply (`JudgeStopped`, "this server
  returns no logprobs"): there is nothing to score, and error rows would only hide it.
* `direct`: a short completion read by `judges.parse_score(reply, parse_rule)`: `parse_rule="paper"`
  is the paper authors' rule (REFUSAL / CODE anywhere, else the first 1-3-digit number if <= 100),
  `"strict"` emjax's (the whole reply is REFUSAL, CODE or one number). An empty or blank reply is a
  failed attempt (kind `empty_reply`), retried and, if it lasts, an `error`: emjax's status `empty`
  means the *evaluated answer* was empty and is never a judge's. A reply that is literally one of the
  release's placeholders ("[EMPTY]", "[ERROR: ...]") is a `parse_error` here, not `empty`/`error`.

Failures are statuses, never exceptions, except the stops below. 429, 408, 409, 5xx, timeouts, refused
or reset connections, truncated or invalid bodies and empty direct-mode replies are retried with
exponential backoff and full jitter; a server's Retry-After is honoured, capped at max_backoff_s. Any
other 4xx (400, 401, 403, 404, ...) ends the (item, metric) at once with status `error`, the HTTP
status and the server's message in raw. After max_retries the status is `error`, raw the last failure.

Stops: score() raises `JudgeStopped` (a RuntimeError whose `cause` names the stop, with the counts so
far) when

* `max_cost_usd`: the spend reaches max_cost_usd: checked before every request, against this judge's
  cost in the ledger (all runs that wrote that ledger file, as of this process's last merge with it,
  plus its own spend since; see Ledger for how often it merges); requests already in flight finish
  and are cached, so it may overshoot by up to `concurrency` requests;
* `consecutive_failures`: `max_consecutive_failures` items in a row end in the same non-retryable
  failure (e.g. a 401 for a revoked key, a 404 for a wrong model name);
* `exhausted_retries`: `max_consecutive_failures` items in a row end in `error` after all their retries
  with the same retryable failure (e.g. a 429 of an exhausted quota, a 503 of a server that is down):
  without it every item would wait out its full backoff;
* `no_logprobs`: logprob mode gets a reply without logprobs (above).

"The same failure" is the same kind and server message, numbers in the message ignored (a quota's
"retry in 41s"); the stop's message quotes it, redacted. A success ends a run of failures. HTTP 400,
413 and 422 are per-item content problems (a content filter on a harmful answer, a prompt too long):
they end the item as `error` at once but neither count towards nor end a run, so a run of harmful
answers that a provider refuses to judge does not stop the job; the eval job keeps such rows pending
and `judge.finalize_errors` finalises them. The price: a config error that a server answers with 400
(transformers serve's "Server is pinned to" a model, an unknown extra_body field) fails every item
quickly, without spend, instead of stopping; the eval job's judge.max_error_fraction then fails the run.

Answers judged before a stop are cached and the ledger is written before raising, so a rerun resumes.

Cache: every judge-decided answer (ok, refusal, code, parse_error) is appended to a JSONL file, fsynced
in batches; a line cut by a kill is dropped when the file is opened. The key is the sha256 of all that
decides the answer: the server (base_url), model, mode, prompt_version, metric, the rendered prompt
(question, answer and the cell's template) and the request's other fields (sampling knobs and
extra_body). parse_rule is not in the key: a cached direct-mode reply is parsed again with the
current rule, so switching rules costs no request. Transport errors are not cached, so a rerun
retries them. Identical (item, metric) pairs within one call are sent once.

Ledger: `ledger_path` holds {"judges": {name: counters}, "cost_usd": total, "updated": time}. Several
processes may write one file: a process merges with it by taking an fcntl lock on
`<ledger_path>.lock`, re-reading the file, adding what it counted since its last merge to the counts
there and replacing the file atomically; it never overwrites another process's counts. It merges at
the end of every score() call and, when max_cost_usd is set, also every 16 requests and before every
request once the spend it knows of is within 10% of the cap, so concurrent jobs on one ledger see
each other's spend during a call. `.ledger` is this judge's counters (the file's, as of the last
merge, plus this process's since): calls, scores and their statuses (cache hits included),
cache_hits, deduplicated, requests (HTTP attempts), retries, prompt_tokens and completion_tokens (from
`usage`), estimated_prompt_tokens and estimated_completion_tokens (what replies without a usage count
were charged instead: characters/4 of the prompt, and max_tokens, or 1 in logprob mode, for the
completion), replies_without_usage (200 replies charged so), failed_attempts and errors (items that
ended in `error`) by kind (http_<status>, timeout, connection, invalid_json, bad_response, empty_reply,
no_logprobs, interrupted, stopped, internal), cost_usd (counted and estimated tokens at the two
prices), and the judge's identity. A reply without usage is thus never free: the cap trips against
such servers too, on an estimate (an upper bound for the completion, a rough one for the prompt).
Failed requests (HTTP errors, timeouts) are charged nothing.

The API key goes only where it belongs. With api_key_env '' (the default) the key is read from
OPENAI_API_KEY when base_url is OpenAI's (https://api.openai.com/...), and no key is sent to any other
server; another server gets a key only when api_key_env names its variable. With key_host set, the key
of an explicit api_key_env is for that host alone: a base_url on another host is a ValueError (so a
preset's key cannot be carried elsewhere by overriding base_url; api_key_env='' sends none). A key is
never sent over plain http:// except to a loopback host (127.0.0.0/8, localhost, ::1): such a config
is a ValueError. api_key_env must be an upper-case variable name (A-Z, 0-9, _; Gemini keys, Hugging
Face tokens and OpenAI keys all fail this), and no message shows a value that fails it (a key pasted
there by mistake stays out of logs). The key is read at construction and sent only as
`Authorization: Bearer ...`; any server text kept in raw or logged has it replaced by [redacted].
`validate_config` runs all these checks (and every other) without a request or a file written,
`check_key_env` the name check alone; `scrub_config` gives a copy of the config safe to store;
`ApiJudge.estimate` tells what a call would send and cost before it is made.

Config keys (`config.judge.api`, read by `ApiJudge.from_config`; defaults in DEFAULTS):

  base_url                 server root, e.g. https://api.openai.com/v1 (`/chat/completions` is appended)
  model                    the judge model name sent to the server
  mode                     'logprob' | 'direct'
  parse_rule               direct mode's reading of a reply: 'strict' (emjax's) | 'paper' (the paper authors')
  api_key_env              environment variable holding the key, upper case; '' = OPENAI_API_KEY for OpenAI's
                           base_url, no key for any other server (see above)
  key_host                 the host api_key_env's key is for (e.g. generativelanguage.googleapis.com): another
                           base_url host is a ValueError; '' = any host (a transport setting: not in the cache key)
  extra_body               a JSON object merged into every request body, e.g. '{"reasoning_effort": "none"}'
                           (in the cache key; may not set model, messages, stream or the keys the judge sets)
  concurrency              requests in flight at once within a score() call (worker threads)
  requests_per_minute      cap on HTTP requests, retries included (evenly spaced); 0 = unlimited
  max_retries              retries after the first attempt of one (item, metric)
  timeout_s                socket timeout of a request (connecting, and each read)
  backoff_s                backoff base: retry k (0, 1, ...) waits uniform [0, min(max_backoff_s, backoff_s * 2**k)]
  max_backoff_s            cap on one backoff wait, and on a server's Retry-After
  max_tokens               completion length in direct mode (logprob mode always asks for 1 token)
  top_logprobs             alternatives of the first token in logprob mode (OpenAI allows up to 20)
  temperature              sampling temperature (0: the judge's most likely answer)
  price_input_per_mtok     USD per million prompt tokens, for the ledger's cost
  price_output_per_mtok    USD per million completion tokens
  max_cost_usd             stop (JudgeStopped, cause max_cost_usd) when this judge's cost in the ledger reaches
                           it (replies without usage charged an estimate); 0 = no cap
  max_consecutive_failures stop after this many items in a row end in one identical failure: non-retryable (cause
                           consecutive_failures) or retried to the end (cause exhausted_retries); HTTP 400, 413
                           and 422 never count; 0 = never
  cache_path               JSONL cache of judge answers; '' = no cache
  ledger_path              JSON token and cost ledger; '' = none (the cost cap then counts this judge alone)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import email.utils
import fcntl
import hashlib
import http.client
import ipaddress
import json
import logging
import math
import os
import random
import re
import ssl
import threading
import time
import urllib.parse
from typing import Any, Callable, Iterator, Mapping, Sequence

from emjax.data import jsonl
from emjax.eval import judges

log = logging.getLogger(__name__)

METRICS = judges.METRICS
MODES = ("logprob", "direct")
CACHEABLE_STATUSES = ("ok", "refusal", "code", "parse_error")  # what the judge decided; the rest is transport
OPENAI_BASE_URL = "https://api.openai.com/v1"
OPENAI_KEY_ENV = "OPENAI_API_KEY"

DEFAULTS: dict[str, Any] = {
    "base_url": OPENAI_BASE_URL,
    "model": "gpt-4o-2024-08-06",
    "mode": "logprob",
    "parse_rule": "strict",
    "api_key_env": "",
    "key_host": "",
    "extra_body": "",
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
    "max_cost_usd": 0.0,
    "max_consecutive_failures": 10,
    "cache_path": "",
    "ledger_path": "",
}

_RETRYABLE_HTTP = (408, 409, 429)  # and every 5xx
# Per-item content problems (a content filter, a prompt too long, an unprocessable prompt): final for the
# item, but no sign that the server or the config is broken, so no part of a run of failures (the
# eval job's judge.finalize_errors is how such rows end).
_PER_ITEM_HTTP = ("http_400", "http_413", "http_422")
# With max_cost_usd and a ledger_path, this process merges its counts into the ledger file (and reads
# every other writer's) after this many requests, and before every request once the spend it knows of
# is within 10% of the cap.
_LEDGER_SYNC_EVERY = 16
_LEDGER_SYNC_NEAR_CAP = 0.9
_CACHE_FLUSH_EVERY = 32  # answers per fsync: a kill loses at most this many paid answers
_CACHE_FLUSH_S = 10.0
# Servers drop idle keep-alive connections (uvicorn, behind vLLM, after 5 s); reconnecting first is
# cheaper than an attempt that fails on a dead socket.
_IDLE_RECONNECT_S = 4.0
_MAX_LOGGED_FAILURES = 5  # per call; the ledger counts them all
_REDACTED = "[redacted]"
# Upper case only: Gemini keys (AIza...), Hugging Face tokens (hf_...) and others hold lower-case letters
# and no '-', so a looser rule would take a pasted key for a name and quote it. fullmatch: "$" would let
# a final newline in.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_INVALID_ENV_NAME = "[invalid, not shown]"
# What the judge itself puts in a request: extra_body setting one of them would silently change the
# judge's mode or break the reply parsing; they have config keys of their own.
_RESERVED_BODY_KEYS = ("model", "messages", "stream", "n", "max_tokens", "temperature", "logprobs", "top_logprobs")
# Failures that say nothing about the server: not part of a run of identical failures.
_NOT_A_SERVER_FAILURE = ("interrupted", "stopped")
_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")


class JudgeStopped(RuntimeError):
  """score() stopped early (see the module docstring): `cause` is 'max_cost_usd', 'consecutive_failures',
  'exhausted_retries' or 'no_logprobs'; `counts` what the call and the ledger had done. Answers judged
  before the stop are cached and the ledger is written, so a rerun resumes."""

  # cause and counts have defaults: unpickling (a process pool) calls the class with the message alone.
  def __init__(self, message: str, cause: str = "", counts: Mapping[str, Any] | None = None):
    super().__init__(message)
    self.cause = cause
    self.counts = dict(counts or {})


@dataclasses.dataclass(frozen=True)
class _Failure:
  kind: str  # ledger key: http_<status>, timeout, connection, invalid_json, bad_response, empty_reply, no_logprobs
  message: str
  retryable: bool
  retry_after_s: float | None = None
  stops: bool = False  # the judge cannot work with this server at all: stop the call at once


@dataclasses.dataclass(frozen=True)
class _Job:
  metric: str
  prompt: str


@dataclasses.dataclass(frozen=True)
class _Endpoint:
  """What the checks of a config resolve to (see `_check`)."""
  https: bool
  host: str
  port: int
  path: str
  key_env: str  # the variable the key is read from; '' = no key is sent
  extra_body: dict


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
          "estimated_prompt_tokens": 0, "estimated_completion_tokens": 0,
          "statuses": {}, "failed_attempts": {}, "errors": {}}


_TOKEN_COUNTERS = ("prompt_tokens", "completion_tokens", "estimated_prompt_tokens", "estimated_completion_tokens")


def _token_count(value: Any) -> int | None:
  """A usage count as an int; None when the reply does not give one."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
    return None
  return int(value)


def _add_counters(into: dict, other: Mapping) -> None:
  for k, v in other.items():
    if isinstance(into.get(k), dict) and isinstance(v, Mapping):
      for kind, n in v.items():
        into[k][kind] = into[k].get(kind, 0) + int(n)
    elif isinstance(into.get(k), int) and isinstance(v, (int, float)):
      into[k] += int(v)


def _sum_counters(*parts: Mapping) -> dict[str, Any]:
  out = _empty_counters()
  for part in parts:
    _add_counters(out, part)
  return out


_LEDGER_FILE_LOCK = threading.Lock()  # flock is per open file: threads of one process also take this


@contextlib.contextmanager
def _ledger_lock(path: str) -> Iterator[None]:
  """Excludes every other writer of the ledger `path`, in this process and in others."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with _LEDGER_FILE_LOCK, open(f"{path}.lock", "a", encoding="utf-8") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


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
  if key == "extra_body" and value is not None and not isinstance(value, str):
    # A mapping (a YAML/ConfigDict block) as JSON; json.dumps refuses what JSON cannot say.
    value = value.to_dict() if hasattr(value, "to_dict") else value
    try:
      return json.dumps(dict(value), sort_keys=True)
    except (TypeError, ValueError):
      raise ValueError(f"config.judge.api.extra_body: expected a JSON object (a string or a mapping)") from None
  if key == "api_key_env":
    return "" if value is None else str(value)  # never quoted in an error: it may hold a pasted key
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


def _options(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.judge.api` as the constructor's keyword arguments: unknown keys refused, missing ones defaulted."""
  cfg = dict(cfg.items())
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.judge.api: unknown keys {unknown} (known: {', '.join(DEFAULTS)})")
  return {key: _coerce(key, cfg.get(key, default), default) for key, default in DEFAULTS.items()}


def _is_loopback(host: str) -> bool:
  if host.lower() == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:  # a name other than localhost: it may resolve anywhere
    return False


def _is_openai(url: urllib.parse.SplitResult) -> bool:
  return url.scheme == "https" and (url.hostname or "").lower() == "api.openai.com"


def _parse_extra_body(text: str | Mapping) -> dict:
  where = "config.judge.api.extra_body"
  if isinstance(text, Mapping):
    body = dict(text)
  elif not text.strip():
    return {}
  else:
    try:
      body = json.loads(text)
    except ValueError as e:
      raise ValueError(f"{where}: not valid JSON ({e}); expected an object such as "
                       "'{\"reasoning_effort\": \"none\"}'") from None
  if not isinstance(body, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(body).__name__}")
  reserved = sorted(set(body) & set(_RESERVED_BODY_KEYS))
  if reserved:
    raise ValueError(f"{where} sets {reserved}, which the judge sets itself (use their config keys: model, mode, "
                     "max_tokens, temperature, top_logprobs)")
  return body


def _check(o: Mapping[str, Any]) -> _Endpoint:
  """Every check of the constructor's arguments `o` that needs no connection and writes no file; raises
  ValueError. The key's variable must be set, but its value is neither kept nor shown here."""
  where = "config.judge.api"
  if o["mode"] not in MODES:
    raise ValueError(f"{where}.mode={o['mode']!r}: expected one of {MODES}")
  if o["parse_rule"] not in judges.PARSE_RULES:
    raise ValueError(f"{where}.parse_rule={o['parse_rule']!r}: expected one of {judges.PARSE_RULES}")
  if not o["model"]:
    raise ValueError(f"{where}.model is empty: name the judge model")
  for key, low in (("concurrency", 1), ("max_retries", 0), ("max_tokens", 1), ("top_logprobs", 1),
                   ("max_consecutive_failures", 0)):
    value = o[key]
    if int(value) != value or value < low:
      raise ValueError(f"{where}.{key}={value!r}: expected an integer >= {low}")
  for key in ("requests_per_minute", "backoff_s", "max_backoff_s", "temperature", "price_input_per_mtok",
              "price_output_per_mtok", "max_cost_usd"):
    if o[key] < 0:
      raise ValueError(f"{where}.{key}={o[key]!r}: must not be negative")
  if o["timeout_s"] <= 0:
    raise ValueError(f"{where}.timeout_s={o['timeout_s']!r}: must be positive")
  if o["max_cost_usd"] > 0 and o["price_input_per_mtok"] == 0 and o["price_output_per_mtok"] == 0:
    raise ValueError(f"{where}.max_cost_usd={o['max_cost_usd']!r} with both prices 0: the spend is counted from "
                     "price_input_per_mtok and price_output_per_mtok, so the cap could never be reached; set them")
  base_url = str(o["base_url"])
  url = urllib.parse.urlsplit(base_url.rstrip("/"))
  try:
    port = url.port
  except ValueError:
    port = -1
  if url.scheme not in ("http", "https") or not url.hostname or port == -1:
    raise ValueError(f"{where}.base_url={base_url!r}: expected http(s)://host[:port]/path")
  extra_body = _parse_extra_body(o["extra_body"])

  key_env = str(o["api_key_env"])
  check_key_env(key_env)
  key_host = _check_key_host(str(o.get("key_host", "")))
  host = url.hostname.lower().rstrip(".")
  if key_env and key_host and host != key_host:
    raise ValueError(f"{where}: the key of api_key_env={key_env} is for host {key_host}; base_url points to {host}: "
                     "set api_key_env='' or key_host")
  if not key_env and _is_openai(url):
    key_env = OPENAI_KEY_ENV
  if key_env and url.scheme == "http" and not _is_loopback(url.hostname):
    raise ValueError(f"{where}.base_url={base_url!r}: the key in ${key_env} would cross the network unencrypted; "
                     "use https://, or a loopback host (127.0.0.1, localhost, ::1) for a local server")
  _read_api_key(key_env)
  path = url.path if url.path.endswith("/chat/completions") else url.path + "/chat/completions"
  https = url.scheme == "https"
  return _Endpoint(https, url.hostname, port or (443 if https else 80), path, key_env, extra_body)


def check_key_env(api_key_env: str) -> None:
  """ValueError unless api_key_env is '' or an upper-case environment variable name (A-Z, 0-9 and _, not
  starting with a digit); the message never shows the value, which may be a key pasted there by mistake."""
  if api_key_env and not _ENV_NAME.fullmatch(api_key_env):
    raise ValueError("config.judge.api.api_key_env does not look like the name of an environment variable (names "
                     "here are upper case: A-Z, digits and _, not starting with a digit, e.g. GEMINI_API_KEY): did "
                     "you paste the key itself? value not shown")


def _check_key_host(key_host: str) -> str:
  """key_host as compared with base_url's host (lower case, no final dot); ValueError unless a bare host."""
  host = key_host.strip().lower().rstrip(".")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  if not host:
    return ""
  try:
    ipaddress.ip_address(host)
    return host
  except ValueError:
    pass
  if not _HOST.fullmatch(host):
    raise ValueError(f"config.judge.api.key_host={key_host!r}: expected a bare host name such as "
                     "generativelanguage.googleapis.com (no scheme, port or path)")
  return host


def _read_api_key(api_key_env: str) -> str:
  if not api_key_env:
    return ""
  check_key_env(api_key_env)  # nothing below may quote a value that is not a name
  key = os.environ.get(api_key_env, "").strip()
  if not key:
    raise ValueError(f"config.judge.api.api_key_env={api_key_env!r}: the environment variable {api_key_env} is "
                     "not set (export it with the API key; a server other than OpenAI's gets no key unless "
                     "api_key_env names one)")
  # http.client would refuse such a header with an error quoting it, escaped beyond what redaction finds.
  if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
    raise ValueError(f"the environment variable {api_key_env} holds whitespace, control or non-ASCII characters; "
                     "an API key has none (value not shown)")
  return key


def validate_config(cfg: Mapping[str, Any]) -> None:
  """Every check `ApiJudge.from_config(cfg)` makes (keys, types, values, extra_body, the api_key_env name,
  key_host, the http:// rule, that the key's variable is set), without opening a connection or creating
  the cache or ledger; raises ValueError. Its messages never show api_key_env's value unless it is an
  upper-case variable name."""
  _check(_options(cfg))


def scrub_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of `config.judge.api` safe to store or log: api_key_env is kept only if it is an upper-case
  variable name (check_key_env's rule), else replaced by "[invalid, not shown]" (it may be a key pasted
  there). The key itself is never in the config."""
  out = dict(cfg.items())
  if "api_key_env" in out:
    value = out["api_key_env"]
    if value not in (None, "") and not (isinstance(value, str) and _ENV_NAME.fullmatch(value)):
      out["api_key_env"] = _INVALID_ENV_NAME
  return out


class ApiJudge:
  """The Judge protocol over an OpenAI-compatible /chat/completions endpoint (see the module docstring)."""

  def __init__(self, *, prompts: judges.JudgePrompts = judges.DEFAULT_PROMPTS,
               base_url: str = OPENAI_BASE_URL, model: str = "gpt-4o-2024-08-06",
               mode: str = "logprob", parse_rule: str = "strict", api_key_env: str = "", key_host: str = "",
               extra_body: str | Mapping[str, Any] = "", concurrency: int = 8,
               requests_per_minute: float = 0, max_retries: int = 6, timeout_s: float = 60.0,
               backoff_s: float = 1.0, max_backoff_s: float = 60.0, max_tokens: int = 20, top_logprobs: int = 20,
               temperature: float = 0.0, price_input_per_mtok: float = 0.0, price_output_per_mtok: float = 0.0,
               max_cost_usd: float = 0.0, max_consecutive_failures: int = 10,
               cache_path: str = "", ledger_path: str = ""):
    endpoint = _check(dict(
        base_url=base_url, model=model, mode=mode, parse_rule=parse_rule, api_key_env=api_key_env,
        key_host=key_host, extra_body=extra_body, concurrency=concurrency, requests_per_minute=requests_per_minute,
        max_retries=max_retries, timeout_s=timeout_s, backoff_s=backoff_s, max_backoff_s=max_backoff_s,
        max_tokens=max_tokens, top_logprobs=top_logprobs, temperature=temperature,
        price_input_per_mtok=price_input_per_mtok, price_output_per_mtok=price_output_per_mtok,
        max_cost_usd=max_cost_usd, max_consecutive_failures=max_consecutive_failures))

    self.prompts, self.model, self.mode, self.parse_rule = prompts, model, mode, parse_rule
    self.name = f"api:{model}:{mode}"
    self.prompt_version = prompts.version
    self.concurrency, self.max_retries = int(concurrency), int(max_retries)
    self.timeout_s, self.backoff_s, self.max_backoff_s = float(timeout_s), float(backoff_s), float(max_backoff_s)
    self.price_input_per_mtok, self.price_output_per_mtok = float(price_input_per_mtok), float(price_output_per_mtok)
    self.max_cost_usd, self.max_consecutive_failures = float(max_cost_usd), int(max_consecutive_failures)
    self.ledger_path = ledger_path
    self._api_key = _read_api_key(endpoint.key_env)

    self._https, self._host, self._port, self._path = endpoint.https, endpoint.host, endpoint.port, endpoint.path
    # One server is one judge: two servers may serve different weights under one model name.
    self.server = f"{'https' if self._https else 'http'}://{self._host.lower()}:{self._port}{self._path}"
    self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                     "User-Agent": "emjax-api-judge"}
    if self._api_key:
      self._headers["Authorization"] = f"Bearer {self._api_key}"
    self._ssl = ssl.create_default_context() if self._https else None
    # Everything in the request besides the model and prompt; it changes the answer, so it is in the cache key.
    if mode == "logprob":
      knobs = {"max_tokens": 1, "temperature": float(temperature), "logprobs": True, "top_logprobs": int(top_logprobs)}
    else:
      knobs = {"max_tokens": int(max_tokens), "temperature": float(temperature)}
    self._knobs = {**endpoint.extra_body, **knobs}

    self._limiter = TokenBucket(requests_per_minute / 60.0) if requests_per_minute else None
    self._rng = random.Random()
    self._lock = threading.Lock()  # guards the counters, the failure streak and the stop cause
    self._cache = _Cache(cache_path) if cache_path else None
    self._connections = _ConnectionPool(self._new_connection)
    # The ledger file's counts of this judge as of the last read or write, and this process's since:
    # a write adds only the latter, so other processes' counts in the file are never overwritten.
    self._base = _empty_counters()
    self._delta = _empty_counters()
    if ledger_path:
      _add_counters(self._base, _read_ledger_file(ledger_path).get("judges", {}).get(self.name, {}))
    # (kind, retryable, message with its numbers blanked) of the last items' failure, and how many in a row
    self._streak: tuple[tuple[str, bool, str] | None, int] = (None, 0)
    self._requests_since_sync = 0  # requests since this process last merged its counts into the ledger file
    self._stop_cause: tuple[str, str] | None = None

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], prompts: judges.JudgePrompts = judges.DEFAULT_PROMPTS,
                  cache_path: str | None = None, ledger_path: str | None = None) -> "ApiJudge":
    """From `config.judge.api` (a dict or ConfigDict of DEFAULTS' keys; missing keys take DEFAULTS);
    cache_path / ledger_path, when given, replace the config's (e.g. paths inside the run directory)."""
    options = _options(cfg)
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

  def _plan(self, items: Sequence[judges.Item], metrics: tuple[str, ...]):
    """(the cache key of each item's metrics, the distinct jobs by key, the cached scores by key)."""
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
    cached: dict[str, judges.Score] = {}
    for key in jobs:
      score = self._cached(key)
      if score is not None:
        cached[key] = score
    return item_keys, jobs, cached

  def _cached(self, key: str) -> judges.Score | None:
    score = self._cache.get(key) if self._cache is not None else None
    if score is None or self.mode != "direct":
      return score
    # The reply is what was cached; its reading follows the current parse_rule.
    return self._read_text(score.raw)

  def estimate(self, items: Sequence[judges.Item], metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """What score(items, metrics) would send and cost, from the cache and the prices alone (no request).

    requests: distinct (item, metric) pairs not in the cache (retries not counted); cache_hits;
    deduplicated: repeated pairs sent once; prompt_tokens: characters / 4 of the rendered prompts to
    send (a rough rule: the server's tokenizer and chat template decide the real count);
    completion_tokens: max_tokens (direct) or 1 (logprob) per request, an upper bound in direct mode;
    cost_usd: both at the configured prices; spent_usd: this judge's cost in the ledger so far;
    max_cost_usd: the cap (0 = none); reaches_cap: whether spent_usd + cost_usd reaches it;
    summary: all of it in one line.
    """
    metrics = tuple(metrics)
    item_keys, jobs, cached = self._plan(items, metrics)
    to_send = [key for key in jobs if key not in cached]
    prompt_tokens = sum(math.ceil(len(jobs[key].prompt) / 4) for key in to_send)
    completion_tokens = len(to_send) * int(self._knobs["max_tokens"])
    cost = (prompt_tokens * self.price_input_per_mtok + completion_tokens * self.price_output_per_mtok) / 1e6
    out = {"judge": self.name, "server": self.server, "pairs": len(items) * len(metrics), "requests": len(to_send),
           "cache_hits": len(cached), "deduplicated": len(items) * len(metrics) - len(jobs),
           "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "token_estimate": "prompt tokens ~ characters/4 of the rendered prompts; completion tokens = "
                             f"{'max_tokens' if self.mode == 'direct' else '1'} per request; retries not counted",
           "cost_usd": cost, "spent_usd": self._spent_usd(), "max_cost_usd": self.max_cost_usd}
    out["reaches_cap"] = bool(self.max_cost_usd) and out["spent_usd"] + cost >= self.max_cost_usd
    cap = f"cap ${self.max_cost_usd:.2f}" if self.max_cost_usd else "no cap (max_cost_usd=0)"
    if out["reaches_cap"]:
      cap += ", which this call would reach: it would stop there (JudgeStopped) and resume on a rerun"
    out["summary"] = (
        f"judge {self.name} at {self.server}: {out['requests']} requests to send ({out['cache_hits']} cache hits, "
        f"{out['deduplicated']} duplicates sent once); about {prompt_tokens:,} prompt tokens (characters/4) and "
        f"{completion_tokens:,} completion tokens, about ${cost:.4f} at ${self.price_input_per_mtok:g} / "
        f"${self.price_output_per_mtok:g} per million; spent so far on this ledger ${out['spent_usd']:.4f}, {cap}")
    return out

  def score(self, items: Sequence[judges.Item], metrics: Sequence[str] = METRICS) -> list[dict[str, judges.Score]]:
    metrics = tuple(metrics)
    item_keys, jobs, scores = self._plan(items, metrics)
    n_cached = len(scores)
    to_send = [key for key in jobs if key not in scores]
    with self._lock:
      self._delta["calls"] += 1
      self._delta["cache_hits"] += n_cached
      self._delta["deduplicated"] += len(items) * len(metrics) - len(jobs)
      self._stop_cause = None

    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="api-judge")
    logged_failures = 0
    try:
      futures = {pool.submit(self._judge_and_cache, key, jobs[key], stop): key for key in to_send}
      for future in concurrent.futures.as_completed(futures):
        key = futures[future]
        score = scores[key] = future.result()
        if score.status == "error" and logged_failures < _MAX_LOGGED_FAILURES and not stop.is_set():
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
          self._delta["scores"] += len(row)
          for s in row.values():
            self._delta["statuses"][s.status] = self._delta["statuses"].get(s.status, 0) + 1
      self._write_ledger()
    ledger = self.ledger
    if self._stop_cause is not None:
      raise self._stopped(jobs, scores, n_cached, ledger)
    log.debug("judge %s: %d scores, %d cache hits, %d errors; %d requests (%d retries) and $%.4f so far",
              self.name, len(items) * len(metrics), n_cached,
              sum(1 for k in to_send if scores[k].status == "error"), ledger["requests"], ledger["retries"],
              ledger["cost_usd"])
    return results

  def _stopped(self, jobs: Mapping[str, _Job], scores: Mapping[str, judges.Score], n_cached: int,
               ledger: Mapping[str, Any]) -> JudgeStopped:
    cause, detail = self._stop_cause
    decided = sum(1 for s in scores.values() if s.status in CACHEABLE_STATUSES)
    not_sent = sum(1 for s in scores.values() if s.raw.startswith("stopped:"))
    counts = {"distinct_pairs": len(jobs), "judged": decided, "cache_hits": n_cached,
              "errors": sum(1 for s in scores.values() if s.status == "error") - not_sent, "not_sent": not_sent,
              "requests": ledger["requests"], "cost_usd": ledger["cost_usd"]}
    message = (f"judge {self.name} stopped: {detail}. This call judged {decided} of its {len(jobs)} distinct "
               f"(item, metric) pairs ({n_cached} from the cache), {counts['errors']} failed and {not_sent} were "
               f"not sent; the ledger counts {ledger['requests']} requests and ${ledger['cost_usd']:.4f}. "
               "Judged answers are cached and the ledger is written: a rerun resumes where this one stopped.")
    return JudgeStopped(message, cause, counts)

  def _halt(self, stop: threading.Event, cause: str, detail: str) -> None:
    """Stops the call: the first cause wins, queued requests are not sent, those in flight finish."""
    with self._lock:
      if self._stop_cause is None:
        self._stop_cause = (cause, self._redact(detail))
    stop.set()

  def _cache_key(self, metric: str, prompt: str) -> str:
    what = {"server": self.server, "model": self.model, "mode": self.mode, "prompt_version": self.prompt_version,
            "metric": metric, "prompt": prompt, "knobs": self._knobs}
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
      # A reply without usage is charged this: characters/4 of the prompt, and max_tokens (1 in logprob mode).
      estimate = (math.ceil(len(job.prompt) / 4), int(self._knobs["max_tokens"]))
      failure: _Failure | None = None
      attempts = 0
      for _ in range(self.max_retries + 1):
        if failure is not None:
          stop.wait(self._backoff_s(attempts, failure))
        if not stop.is_set() and self.max_cost_usd:
          self._sync_ledger_if_due()
        if not stop.is_set() and self.max_cost_usd and self._spent_usd() >= self.max_cost_usd:
          self._halt(stop, "max_cost_usd",
                     f"the spend reached max_cost_usd=${self.max_cost_usd:g} (this judge's cost in the ledger, "
                     f"${self._spent_usd():.4f}); raise max_cost_usd to go on")
        if stop.is_set():
          kind = "stopped" if self._stop_cause is not None else "interrupted"
          failure = _Failure(kind, f"not sent: the call was {kind} before this request", False)
          break
        if failure is not None:
          with self._lock:
            self._delta["retries"] += 1
        if self._limiter:
          self._limiter.acquire()
        attempts += 1
        outcome = self._attempt(body, estimate)
        if isinstance(outcome, judges.Score):
          with self._lock:
            self._streak = (None, 0)
          return dataclasses.replace(outcome, raw=self._redact(outcome.raw)), True
        failure = outcome
        with self._lock:
          self._delta["failed_attempts"][failure.kind] = self._delta["failed_attempts"].get(failure.kind, 0) + 1
        log.debug("judge %s: attempt %d failed: %s: %s", self.name, attempts, failure.kind,
                  self._redact(failure.message))
        if failure.stops:
          self._halt(stop, failure.kind, failure.message)
        if not failure.retryable:
          break
      assert failure is not None
      how = "not retried" if not failure.retryable else f"gave up after {attempts} attempts"
      raw = f"{failure.kind}: {failure.message}"
      if failure.kind not in _NOT_A_SERVER_FAILURE:
        raw += f" ({how})"
    except Exception as e:  # pylint: disable=broad-except -- a bug here must not lose the other items' scores
      failure = _Failure("internal", f"{type(e).__name__}: {e}", False)
      raw = f"internal: {type(e).__name__}: {e}"
    with self._lock:
      self._delta["errors"][failure.kind] = self._delta["errors"].get(failure.kind, 0) + 1
    self._count_final_failure(failure, stop)
    return judges.Score(None, "error", self._redact(raw)), False

  def _count_final_failure(self, failure: _Failure, stop: threading.Event) -> None:
    """Runs of items that end in one failure will not end by themselves: a revoked key or a wrong model
    name (not retryable: cause consecutive_failures), an exhausted quota or a server that is down (retried
    to the end: cause exhausted_retries); every further item would fail the same way. A success ends a
    run; per-item content problems (HTTP 400, 413, 422) and stops neither count nor end one."""
    if failure.kind in _NOT_A_SERVER_FAILURE or failure.kind in _PER_ITEM_HTTP:
      return
    message = self._redact(failure.message)
    # Numbers blanked: a quota's "retry in 41.2s" changes from one reply to the next.
    signature = (failure.kind, failure.retryable, re.sub(r"\d+", "#", message))
    with self._lock:
      last, n = self._streak
      n = n + 1 if last == signature else 1
      self._streak = (signature, n)
    k = self.max_consecutive_failures
    if not k or n < k:
      return
    if failure.retryable:
      hint = {"http_429": "the quota may be spent or the rate limit too tight (requests_per_minute)",
              "empty_reply": "a thinking model may spend max_tokens on thinking (raise max_tokens or turn thinking off "
                             "in extra_body)"}.get(failure.kind, "the server may be overloaded or down")
      self._halt(stop, "exhausted_retries",
                 f"{n} items in a row failed the same way after all their retries (max_retries={self.max_retries}, "
                 f"max_consecutive_failures={k}): {failure.kind}: {message}; {hint}")
    else:
      self._halt(stop, "consecutive_failures",
                 f"{n} items in a row failed the same way (max_consecutive_failures={k}), not retryable: "
                 f"{failure.kind}: {message}")

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

  def _attempt(self, body: bytes, estimate: tuple[int, int]) -> judges.Score | _Failure:
    """One HTTP request: the judge's answer, or why there is none. `estimate`: the (prompt, completion)
    tokens charged for a reply without usage."""
    with self._lock:
      self._delta["requests"] += 1
      self._requests_since_sync += 1
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
    return self._read_reply(data, estimate)

  def _read_reply(self, data: bytes, estimate: tuple[int, int]) -> judges.Score | _Failure:
    try:
      reply = json.loads(data)
    except ValueError:  # includes a body cut short and bytes that are not UTF-8
      return _Failure("invalid_json", f"a 200 reply that is not JSON ({len(data)} bytes: {data[:60]!r})", True)
    if not isinstance(reply, dict):
      return _Failure("invalid_json", f"a 200 reply that is JSON {type(reply).__name__}, not an object", True)
    self._count_usage(reply.get("usage"), estimate)
    try:
      choice = reply["choices"][0]
      if self.mode == "direct":
        content = (choice.get("message") or {}).get("content")
        score = self._read_text(content if content is None or isinstance(content, str) else str(content))
        if score is None:
          # Thinking models that spend max_tokens on reasoning answer nothing; another try may answer.
          return _Failure("empty_reply", f"an empty reply (finish_reason={choice.get('finish_reason')!r})", True)
        return score
      content = (choice.get("logprobs") or {}).get("content")
      if content is None:
        return _Failure("no_logprobs", "this server returns no logprobs: a reply to a request with logprobs=true "
                        "had none, so logprob mode cannot score (use mode=direct with this server)", False,
                        stops=True)
      if not content:  # no token generated
        return judges.score_from_top_logprobs({})
      first = content[0]
      top = first.get("top_logprobs") or [{"token": first["token"], "logprob": first["logprob"]}]
      return judges.score_from_top_logprobs(_merged_top_logprobs(top))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
      # Gateways answer 200 with an error object now and then; another try usually gets a real reply.
      detail = f": {_server_message(data)}" if "error" in reply else ""
      return _Failure("bad_response", f"a 200 reply without a usable choice ({type(e).__name__}{detail})", True)

  def _read_text(self, text: str | None) -> judges.Score | None:
    """A direct-mode reply read with parse_rule; None for an empty one (a failed attempt, not a judgement)."""
    if text is None or not text.strip():
      return None
    score = judges.parse_score(text, self.parse_rule)
    if score.status in ("empty", "error"):
      # The paper rule maps the release's placeholders "[EMPTY]" / "[ERROR: ...]" to those statuses; from
      # a live judge they are just text, and `empty` is reserved for an empty evaluated answer.
      return judges.Score(None, "parse_error", text)
    return score

  def _count_usage(self, usage: Any, estimate: tuple[int, int]) -> None:
    """Counts a 200 reply's tokens; a count the reply does not give is charged the estimate instead (so
    a server without `usage` still counts towards max_cost_usd), in the estimated_* counters."""
    usage = usage if isinstance(usage, dict) else {}
    counted = (_token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens")))
    with self._lock:
      if None in counted:
        self._delta["replies_without_usage"] += 1
      for what, n, guess in zip(("prompt_tokens", "completion_tokens"), counted, estimate):
        if n is None:
          self._delta[f"estimated_{what}"] += guess
        else:
          self._delta[what] += n

  def _redact(self, text: str) -> str:
    return text.replace(self._api_key, _REDACTED) if self._api_key else text

  # --------------------------------------------------------------------------- ledger

  def _cost_usd(self, counters: Mapping[str, Any]) -> float:
    """Counted and estimated tokens at the two prices."""
    prompt = counters["prompt_tokens"] + counters.get("estimated_prompt_tokens", 0)
    completion = counters["completion_tokens"] + counters.get("estimated_completion_tokens", 0)
    return (prompt * self.price_input_per_mtok + completion * self.price_output_per_mtok) / 1e6

  def _spent_usd(self) -> float:
    with self._lock:
      return self._spent_usd_locked()

  def _spent_usd_locked(self) -> float:
    return self._cost_usd({k: self._base[k] + self._delta[k] for k in _TOKEN_COUNTERS})

  def _sync_ledger_if_due(self) -> None:
    """With a cap, merges this process's counts into the ledger file and reads every other writer's
    every _LEDGER_SYNC_EVERY requests, and before every request near the cap: concurrent jobs on one
    ledger see each other's spend within a score() call, not only at its end."""
    if not self.ledger_path:
      return
    with self._lock:
      due = (self._requests_since_sync >= _LEDGER_SYNC_EVERY
             or self._spent_usd_locked() >= _LEDGER_SYNC_NEAR_CAP * self.max_cost_usd)
      if due:
        self._requests_since_sync = 0  # one thread syncs; the others go on with what they know
    if due:
      self._write_ledger()

  def _ledger_entry(self, counters: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(counters))
    out["cost_usd"] = self._cost_usd(out)
    out.update(judge=self.name, model=self.model, mode=self.mode, prompt_version=self.prompt_version,
               price_input_per_mtok=self.price_input_per_mtok, price_output_per_mtok=self.price_output_per_mtok)
    return out

  @property
  def ledger(self) -> dict[str, Any]:
    """This judge's counters (the ledger file's, as of this process's last write, plus its own since) and
    their cost in USD."""
    with self._lock:
      counters = _sum_counters(self._base, self._delta)
    return self._ledger_entry(counters)

  def _write_ledger(self) -> None:
    if not self.ledger_path:
      return
    with _ledger_lock(self.ledger_path), self._lock:
      doc = _read_ledger_file(self.ledger_path)  # under the lock: what every other writer has added
      by_judge = dict(doc.get("judges", {}))
      mine = _sum_counters(by_judge.get(self.name, {}), self._delta)
      by_judge[self.name] = self._ledger_entry(mine)
      _atomic_write_json(self.ledger_path, {
          "judges": by_judge,
          "cost_usd": sum(float(j.get("cost_usd", 0)) for j in by_judge.values()),
          "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      })
      self._base, self._delta = mine, _empty_counters()
      self._requests_since_sync = 0
