"""A local OpenAI-compatible /v1/chat/completions server whose every reply is decided by markers in the
prompt, so judge tests are deterministic, and which records every request it receives.

Markers (anywhere in the prompt; `[[name@metric:value]]` applies to that metric only and wins over
`[[name:value]]`; the metric is read from the prompt's first line, `metric=<name>`):

  [[say:TEXT]]                 the reply text (direct mode) or the one sure first token (logprob mode); default 50
  [[sayq:TEXT]]                as say, TEXT percent-encoded (urllib.parse.quote): newlines, brackets, blanks
  [[logprobs:80=0.5,90=0.3]]   logprob mode: the first token's top_logprobs, as probabilities
  [[delay:S]]                  sleep S seconds before every reply
  [[retry_after:S]]            the Retry-After header of a 429
  [[errmsg:TEXT]]              the message of an HTTP fault (default "fault <status>")
  [[nousage:1]]                a good reply without `usage` (as some local servers answer)
  [[fault:KINDxN]]             the first N requests of this prompt fail as KIND; without xN every one does.
      KIND: an HTTP status (429, 500, 503, 400, 401, 403, 404; a 401's message echoes the Authorization
      header, as a careless server might), timeout (sleep TIMEOUT_SLEEP_S, then nothing), drop (close
      without a reply), reset (close with a TCP RST), badjson (a 200 with a cut JSON body), trunc (a 200
      whose body is shorter than its Content-Length), nologprobs (a 200 without logprobs), empty (a 200
      whose content is ""), null (a 200 whose content is null, as a thinking model's cut-off reply)

Replies keep the connection open (HTTP/1.1) unless the fault breaks it; `Request.client_port` tells
connections apart. Usage of a good reply: 100 prompt tokens, 1 completion token (logprob) or 2 (direct).
`FaultServer.state.on_request`, when set, is called with each Request before it is answered (a test
acting between requests, e.g. as another job writing the ledger).
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import math
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
from typing import Callable

TIMEOUT_SLEEP_S = 1.5
PROMPT_TOKENS = 100
_MARKER = re.compile(r"\[\[(\w+)(?:@(\w+))?:(.*?)\]\]")
_FAULT = re.compile(r"^(\w+?)(?:x(\d+))?$")


@dataclasses.dataclass
class Request:
  prompt: str
  metric: str
  body: dict
  authorization: str | None
  client_port: int
  start: float
  end: float = 0.0
  outcome: str = ""


def markers(prompt: str) -> dict[str, str]:
  metric_match = re.match(r"metric=(\w+)", prompt)
  metric = metric_match.group(1) if metric_match else ""
  generic, specific = {}, {}
  for name, only, value in _MARKER.findall(prompt):
    if not only:
      generic[name] = value
    elif only == metric:
      specific[name] = value
  return {**generic, **specific, "metric": metric}


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive, as real servers: the judge reuses its connections
  disable_nagle_algorithm = True  # headers and body are two writes; with Nagle each reply waits ~40 ms
  server: "_Server"

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin -- keep test output quiet
    pass

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    prompt = body["messages"][0]["content"]
    m = markers(prompt)
    state = self.server.state
    record = Request(prompt, m["metric"], body, self.headers.get("Authorization"), self.client_address[1],
                     time.monotonic())
    with state.lock:
      state.requests.append(record)
      state.seen[prompt] = attempt = state.seen.get(prompt, 0) + 1
      state.in_flight += 1
      state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
      if state.on_request is not None:
        state.on_request(record)
      record.outcome = self._reply(body, prompt, m, attempt)
    except (BrokenPipeError, ConnectionResetError):
      record.outcome += "+client-gone"
    finally:
      record.end = time.monotonic()
      with state.lock:
        state.in_flight -= 1

  def _reply(self, body: dict, prompt: str, m: dict, attempt: int) -> str:
    if "delay" in m:
      time.sleep(float(m["delay"]))
    if "fault" in m:
      kind, times = _FAULT.match(m["fault"]).groups()
      if times is None or attempt <= int(times):
        self._fault(kind, m)
        return kind
    logprob_mode = bool(body.get("logprobs"))
    text = urllib.parse.unquote(m["sayq"]) if "sayq" in m else m.get("say", "50")
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1 if logprob_mode else 2}
    choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprob_mode:
      if "logprobs" in m:
        pairs = [p.split("=") for p in m["logprobs"].split(",")]
        top = [{"token": t, "logprob": math.log(float(p)), "bytes": None} for t, p in pairs]
      else:
        top = [{"token": text, "logprob": 0.0, "bytes": None}]
      top = top[:body.get("top_logprobs", 20)]
      choice["message"]["content"] = top[0]["token"]
      choice["logprobs"] = {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "bytes": None,
                                         "top_logprobs": top}]}
    reply = {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"], "choices": [choice]}
    if "nousage" not in m:
      reply["usage"] = usage
    self._send(200, reply)
    return "ok"

  def _fault(self, kind: str, m: dict) -> None:
    if kind.isdigit():
      status = int(kind)
      message = m.get("errmsg", f"fault {status}")
      if status == 401:
        message = f"Incorrect API key provided: {self.headers.get('Authorization')}"
      headers = {"Retry-After": m["retry_after"]} if status == 429 and "retry_after" in m else {}
      self._send(status, {"error": {"message": message, "type": "test", "code": status}}, headers)
    elif kind == "timeout":
      time.sleep(TIMEOUT_SLEEP_S)
      self.close_connection = True
    elif kind == "drop":
      self.close_connection = True
      self.connection.shutdown(socket.SHUT_RDWR)
    elif kind == "reset":
      self.close_connection = True
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif kind == "badjson":
      self._send_bytes(200, b'{"choices": [{"message": {"content": "5')
    elif kind == "trunc":
      data = b'{"choices": [{"message": {"content": "50"}}]}'
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data) + 100))
      self.end_headers()
      self.wfile.write(data)
      self.wfile.flush()
      self.close_connection = True
      self.connection.shutdown(socket.SHUT_RDWR)
    elif kind in ("empty", "null"):
      content = "" if kind == "empty" else None
      self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "length"}],
                       "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2}})
    elif kind == "nologprobs":
      self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "50"}}],
                       "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1}})
    else:
      raise ValueError(f"fault server: unknown fault {kind!r}")

  def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
    self._send_bytes(status, json.dumps(obj).encode(), headers)

  def _send_bytes(self, status: int, data: bytes, headers: dict | None = None) -> None:
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.end_headers()
    self.wfile.write(data)


class _State:
  def __init__(self):
    self.lock = threading.Lock()
    self.requests: list[Request] = []
    self.seen: dict[str, int] = {}
    self.in_flight = 0
    self.max_in_flight = 0
    self.handler_errors: list[str] = []
    self.on_request: Callable[[Request], None] | None = None


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 64
  state: _State

  def handle_error(self, request, client_address):
    # The faults break connections on purpose; anything else is a bug in this server, kept for the tests.
    error = sys.exc_info()[1]
    if not isinstance(error, OSError):
      with self.state.lock:
        self.state.handler_errors.append(repr(error))


class FaultServer:
  """Started on 127.0.0.1 on a free port; `reset()` forgets the requests and the fault counters."""

  def __init__(self):
    self._server = _Server(("127.0.0.1", 0), _Handler)
    self._server.state = _State()
    self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    self._thread.start()
    self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

  @property
  def state(self) -> _State:
    return self._server.state

  @property
  def requests(self) -> list[Request]:
    with self.state.lock:
      return list(self.state.requests)

  def requests_with(self, text: str) -> list[Request]:
    return [r for r in self.requests if text in r.prompt]

  def reset(self) -> None:
    self._server.state = _State()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
