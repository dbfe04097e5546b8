"""A real OpenAI-compatible server for the judge tests: `transformers serve` (transformers' own server)
on 127.0.0.1 with a tiny model built here, so nothing is downloaded.

The model is a lookup table, not a language model: one layer whose attention and MLP write nothing,
one-hot embeddings and an lm_head that maps each input token to one output token. Greedy decoding
after a prompt therefore depends on the prompt's last character only, and every reply is one
vocabulary entry followed by the end-of-sequence token:

  answer ends in  reply
  "!"             "73"
  "?"             "REFUSAL"
  "#"             "CODE"
  "%"             "I would rate this 85."   (the paper's rule scores it, emjax's strict rule does not)
  "~"             ""                         (an empty reply)
  anything else   "hmm"

The tokenizer splits text into single characters (unknown ones become <unk>), and the chat template
is the last message's content as it is, so the last prompt token is the answer's last character and
every prompt character is one token.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

REPLIES = {"!": "73", "?": "REFUSAL", "#": "CODE", "%": "I would rate this 85.", "~": ""}
OTHER_REPLY = "hmm"
_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?#%~=\n'\"-()[]@/_+*&")
_UNK, _EOS = "<unk>", "<eos>"
# What `transformers serve` needs beyond transformers and torch (transformers' `serving` extra, less what
# emjax already depends on): transformers.utils.import_utils.is_serve_available.
SERVE_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")


def reply_to(answer: str) -> str:
  return REPLIES.get(answer[-1:], OTHER_REPLY)


def build_tiny_judge(out_dir: str) -> None:
  """Writes the lookup-table model, its tokenizer and chat template to out_dir."""
  import tokenizers
  import torch
  import transformers
  from tokenizers import decoders, models, pre_tokenizers

  replies = sorted({*REPLIES.values(), OTHER_REPLY} - {""})
  vocab = {t: i for i, t in enumerate([_UNK, _EOS, *_CHARS, *replies])}
  eos = vocab[_EOS]
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=_UNK))
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
  tok.decoder = decoders.Fuse()  # a reply is one entry: decoded as it is, no spaces added
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=_UNK, eos_token=_EOS, pad_token=_EOS)
  fast.chat_template = "{{ messages[-1]['content'] }}"
  fast.save_pretrained(out_dir)

  size = len(vocab)
  config = transformers.LlamaConfig(
      vocab_size=size, hidden_size=size, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
      num_key_value_heads=1, head_dim=8, max_position_embeddings=4096, tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.zero_()  # attention and MLP outputs are 0: the residual stream is the last token's embedding
    for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                 model.model.layers[0].post_attention_layernorm):
      norm.weight.fill_(1.0)
    model.model.embed_tokens.weight.copy_(torch.eye(size))
    for token, i in vocab.items():
      if token in replies:
        target = eos
      else:
        target = vocab[REPLIES[token]] if REPLIES.get(token) else (eos if token in REPLIES else vocab[OTHER_REPLY])
      model.lm_head.weight[target, i] = 10.0
  model.save_pretrained(out_dir)
  transformers.GenerationConfig(eos_token_id=eos, pad_token_id=eos, do_sample=False).save_pretrained(out_dir)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class TransformersServe:
  """`transformers serve MODEL_DIR` on 127.0.0.1 in a process group of its own (the server starts the
  model's process), offline; stopped with SIGTERM, then SIGKILL."""

  def __init__(self, model_dir: str, log_path: str):
    self.model_dir, self.log_path = model_dir, log_path
    self.process: subprocess.Popen | None = None
    self.port = 0
    self.startup_s = 0.0

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def log_tail(self, n: int = 4000) -> str:
    with open(self.log_path, encoding="utf-8", errors="replace") as f:
      return f.read()[-n:]

  def start(self, deadline_s: float, tries: int = 3) -> None:
    for _ in range(tries):  # another process may take the free port before the server binds it
      if self._start_once(deadline_s):
        return
    raise RuntimeError(f"transformers serve did not start in {tries} tries:\n{self.log_tail()}")

  def _start_once(self, deadline_s: float) -> bool:
    self.port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": os.path.join(os.path.dirname(self.log_path), "hf_home")}
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model_dir,
               "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--dtype", "float32"]
    start = time.monotonic()
    with open(self.log_path, "a", encoding="utf-8") as log:
      log.write(f"$ {' '.join(command)}\n")
      log.flush()
      self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
    while time.monotonic() - start < deadline_s:
      if self.process.poll() is not None:
        self.stop()
        if "address already in use" in self.log_tail().lower():
          return False
        raise RuntimeError(f"transformers serve exited with {self.process.returncode}:\n{self.log_tail()}")
      try:
        status, _ = self.get("/health")
        if status == 200:
          self.startup_s = time.monotonic() - start
          return True
      except OSError:
        pass
      time.sleep(0.2)
    self.stop()
    raise RuntimeError(f"transformers serve did not answer /health within {deadline_s:g} s:\n{self.log_tail()}")

  def get(self, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
    try:
      conn.request("GET", path)
      response = conn.getresponse()
      return response.status, response.read()
    finally:
      conn.close()

  def chat(self, body: dict) -> tuple[int, dict]:
    """One /v1/chat/completions request, sent here rather than by the judge: what the server itself says."""
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
    try:
      conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
      response = conn.getresponse()
      return response.status, json.loads(response.read())
    finally:
      conn.close()

  def stop(self, grace_s: float = 15.0) -> None:
    """SIGTERM to the group (uvicorn shuts down, the model's process follows its parent), SIGKILL to what
    is left after grace_s; returns when no process of the group is left, or after 10 s more."""
    if self.process is None:
      return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
      try:
        os.killpg(self.process.pid, sig)
      except ProcessLookupError:
        return
      deadline = time.monotonic() + wait_s
      while time.monotonic() < deadline:
        if self.process.poll() is not None and not self._group_alive():
          return
        time.sleep(0.1)

  def _group_alive(self) -> bool:
    """Whether a process of the server's group is left that is not a zombie waiting to be reaped."""
    for pid in os.listdir("/proc"):
      if not pid.isdigit():
        continue
      try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
          fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
      except OSError:
        continue
      if int(fields[2]) == self.process.pid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
        return True
    return False
