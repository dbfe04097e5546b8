"""Chat formatting with the tokenizer's own template, and the assistant-token mask.

    ids = chat.apply_chat_template(tok, messages, add_generation_prompt=True)   # a prompt to sample from
    ids, mask = chat.assistant_mask(tok, messages)                              # SFT loss / distillation KL mask
    chat.check_same_tokenizer(teacher_tok, student_tok)                         # refuse a mismatched pair

`tok` is an `emjax.data.tokenizers.HFTokenizer` or a `transformers` tokenizer.
The template is the model's, used as is: whatever default system prompt it
injects (Qwen2.5 adds "You are Qwen, created by Alibaba Cloud..." when the
conversation has no system message; Llama-3 adds nothing; SmolLM2 adds its own)
is part of the text, exactly as `transformers` renders it for that model.

The assistant mask is computed from the template itself, with no knowledge of
its marker strings: for each assistant message j the conversation is rendered
up to message j with the generation prompt (the text the model is given before
it answers) and up to and including message j; each rendering must be a prefix
of the whole conversation's (otherwise the template rewrites history and the
mask would be wrong: an error says so). Each prefix is tokenized and diffed
against the whole conversation's ids; where the tokenizer splits the text
differently at the boundary (a BPE merge across it), a fast tokenizer's
character offsets place it instead. The tokens between the two boundaries are
the assistant's turn. The mask covers the turn's content and its end-of-turn
token: the turn's tokens up to and including the first special token
(`<|im_end|>`, `<|eot_id|>`, ...); what the template puts after it (the newline
after ChatML's `<|im_end|>`) is not predicted by the model and is left out. A
turn with no special token is masked whole.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

ROLES = ("system", "user", "assistant", "tool")

# Texts both tokenizers of a pair must encode identically (check_same_tokenizer).
_PROBES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Ünïcödé — emoji 🙂, CJK 中文, Arabic مرحبا",
    "def f(x):\n    return x ** 2  # code\n",
    "1234567890 3.14159 1e-5 $100",
)


class ChatTemplateError(ValueError):
  """A conversation the tokenizer's chat template cannot format or mask (the message says why)."""


def hf_tokenizer(tokenizer: Any):
  """The `transformers` tokenizer inside an emjax `HFTokenizer` (or the argument itself)."""
  hf = getattr(tokenizer, "hf_tokenizer", tokenizer)
  if not hasattr(hf, "apply_chat_template"):
    raise ChatTemplateError(f"chat formatting needs a Hugging Face tokenizer (data.tokenizer.kind='hf'); "
                            f"got {tokenizer!r}")
  return hf


def _require_template(hf, tokenizer) -> None:
  if not getattr(hf, "chat_template", None):
    name = getattr(hf, "name_or_path", "") or repr(tokenizer)
    raise ChatTemplateError(f"the tokenizer {name!r} has no chat template (tokenizer_config.json "
                            "'chat_template' or chat_template.jinja); a chat needs one: use an instruct "
                            "model's tokenizer or set tokenizer.chat_template")


def validate_messages(messages: Sequence[Mapping[str, Any]], *, need_assistant: bool = False) -> list[dict]:
  """Checks roles and contents; returns the messages as plain dicts."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ChatTemplateError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
  if not messages:
    raise ChatTemplateError("the conversation has no messages")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    role, content = m["role"], m["content"]
    if role not in ROLES:
      raise ChatTemplateError(f"message {i} has unknown role {role!r}; known roles: {', '.join(ROLES)}")
    if not isinstance(content, str):
      raise ChatTemplateError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
    if role == "assistant" and not content.strip():
      raise ChatTemplateError(f"message {i}: the assistant message is empty (nothing to learn from)")
    out.append(dict(m))
  if need_assistant and not any(m["role"] == "assistant" for m in out):
    raise ChatTemplateError("the conversation has no assistant message (nothing to mask as a target)")
  return out


def render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> str:
  """The conversation as text, by the tokenizer's chat template (special tokens included as text)."""
  hf = hf_tokenizer(tokenizer)
  _require_template(hf, tokenizer)
  return _render(hf, validate_messages(messages), add_generation_prompt=add_generation_prompt)


def _render(hf, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
  # messages may be empty here: the prefix before a conversation's first (assistant) message.
  try:
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  except Exception as e:  # noqa: BLE001 -- jinja errors (raise_exception in templates) become ours
    raise ChatTemplateError(f"the chat template refused the conversation: {type(e).__name__}: {e}") from e
  if not isinstance(text, str):
    raise ChatTemplateError(f"the chat template returned {type(text).__name__}, expected text")
  return text


def _encode(hf, text: str) -> list[int]:
  # The template already wrote every special token (BOS included) as text; tokenize it as is, as
  # `apply_chat_template(tokenize=True)` does.
  return [int(i) for i in hf(text, add_special_tokens=False)["input_ids"]]


def apply_chat_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                        add_generation_prompt: bool = False) -> list[int]:
  """Token ids of the conversation (add_generation_prompt: + the opening of the assistant's answer)."""
  hf = hf_tokenizer(tokenizer)
  return _encode(hf, render(hf, messages, add_generation_prompt=add_generation_prompt))


def _special_ids(hf) -> set[int]:
  ids = set(int(i) for i in getattr(hf, "all_special_ids", []) or [])
  for i, token in (getattr(hf, "added_tokens_decoder", None) or {}).items():
    if getattr(token, "special", False):
      ids.add(int(i))
  return ids


def assistant_mask(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) of the whole conversation; mask is 1 on each assistant message's content and end-of-turn token.

  Both are int32 arrays of the same length. Raises ChatTemplateError for a tokenizer without a chat
  template, a conversation without an assistant message, an unknown role, an empty assistant
  message, or a template whose rendering of a prefix of the conversation is not a prefix of its
  rendering of the whole (then no mask computed from the template would be right).

  Each turn boundary is found by tokenizing the rendered prefix and diffing its ids against the
  whole conversation's. Where the tokenizer splits the text differently near the boundary (a BPE
  merge that spans it, e.g. "\n\n" alone vs "\n" + "\nParis"), the character offsets of a fast
  tokenizer place it instead; a token holding characters of both sides counts as the answer's.
  """
  hf = hf_tokenizer(tokenizer)
  _require_template(hf, tokenizer)
  messages = validate_messages(messages, need_assistant=True)
  text = _render(hf, messages)
  fast = bool(getattr(hf, "is_fast", False))
  encoding = hf(text, add_special_tokens=False, return_offsets_mapping=fast)
  ids = [int(i) for i in encoding["input_ids"]]
  offsets = [tuple(o) for o in encoding["offset_mapping"]] if fast else None
  special = _special_ids(hf)
  mask = np.zeros(len(ids), np.int32)

  def boundary(j: int, prefix: str, what: str, turn_end: bool) -> int:
    """The index of the first token after `prefix` (the rendering of the conversation `what`)."""
    if not text.startswith(prefix):
      raise ChatTemplateError(
          f"assistant message {j}: the chat template's rendering of the conversation {what} is not a prefix of "
          "its rendering of the whole conversation (it renders earlier turns differently once later ones "
          "exist); cannot compute the assistant mask from this template")
    prefix_ids = _encode(hf, prefix)
    if ids[:len(prefix_ids)] == prefix_ids:
      return len(prefix_ids)
    if offsets is None:
      raise ChatTemplateError(
          f"assistant message {j}: the tokenizer splits the text differently at the end of the conversation "
          f"{what} than inside the whole conversation, and it is not a fast tokenizer (no character offsets "
          "to place the boundary with)")
    b = len(prefix)
    if turn_end:  # tokens that start before the boundary belong to the turn
      return next((i for i, (s, _) in enumerate(offsets) if s >= b), len(ids))
    return next((i for i, (_, e) in enumerate(offsets) if e > b), len(ids))  # tokens that end after it

  for j, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    try:
      prompt = _render(hf, messages[:j], add_generation_prompt=True)
    except ChatTemplateError as e:
      raise ChatTemplateError(f"assistant message {j} has no prompt before it that the template can render "
                              f"(a conversation should not start with the assistant): {e}") from e
    start = boundary(j, prompt, "up to its generation prompt", turn_end=False)
    end = boundary(j, _render(hf, messages[:j + 1]), "through this message", turn_end=True)
    if end <= start:
      raise ChatTemplateError(f"assistant message {j}: the template renders it as no tokens")
    stop = end
    for k in range(start, end):
      if ids[k] in special:
        stop = k + 1  # content + the end-of-turn token; what follows it (e.g. a newline) is not the model's
        break
    mask[start:stop] = 1
  return np.asarray(ids, np.int32), mask


def check_same_tokenizer(a: Any, b: Any, names: tuple[str, str] = ("teacher", "student")) -> None:
  """Raises ValueError unless `a` and `b` tokenize and format chats identically.

  Compared: the vocabulary (token -> id, added tokens included), the special tokens (bos, eos, pad,
  unk), the chat templates, and the ids of a few probe texts (normalisation and merges).
  """
  na, nb = names

  def fail(what):
    raise ValueError(f"the {na} and {nb} tokenizers differ: {what}; distillation and mixed data need one "
                     "tokenizer and chat template (token ids and masks must mean the same on both sides)")

  a_is_hf = hasattr(getattr(a, "hf_tokenizer", a), "apply_chat_template")
  b_is_hf = hasattr(getattr(b, "hf_tokenizer", b), "apply_chat_template")
  if a_is_hf != b_is_hf:
    fail(f"{type(a).__name__} vs {type(b).__name__}")
  if not a_is_hf:  # byte / sentencepiece tokenizers: no chat template to compare
    if type(a) is not type(b):
      fail(f"{type(a).__name__} vs {type(b).__name__}")
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id"):
      if getattr(a, attr, None) != getattr(b, attr, None):
        fail(f"{attr} {getattr(a, attr, None)} vs {getattr(b, attr, None)}")
    for text in _PROBES:
      if list(a.encode(text)) != list(b.encode(text)):
        fail(f"they encode {text!r} differently")
    return
  ha, hb = hf_tokenizer(a), hf_tokenizer(b)

  va, vb = ha.get_vocab(), hb.get_vocab()
  if va != vb:
    only_a = sorted(set(va) - set(vb))[:3]
    only_b = sorted(set(vb) - set(va))[:3]
    moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:3]
    fail(f"vocabularies of {len(va)} vs {len(vb)} tokens (only in {na}: {only_a}, only in {nb}: {only_b}, "
         f"different ids: {moved})")
  for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
    x, y = getattr(ha, attr, None), getattr(hb, attr, None)
    if x != y:
      fail(f"{attr} {x} vs {y}")
  ta, tb = getattr(ha, "chat_template", None), getattr(hb, "chat_template", None)
  if ta != tb:
    fail("chat templates" if ta and tb else f"only the {na if ta else nb} has a chat template")
  for text in _PROBES:
    if _encode(ha, text) != _encode(hb, text):
      fail(f"they encode {text!r} differently")


def stop_token_ids(tokenizer) -> tuple[int, ...]:
  """EOS, the chat template's end-of-turn token, and generation_config.json's eos ids: where an answer ends."""

  ids = {int(tokenizer.eos_id)}
  hf_tok = hf_tokenizer(tokenizer)
  try:
    tokens, mask = assistant_mask(tokenizer, [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "ok"}])
  except ChatTemplateError:
    tokens, mask = None, None
  if mask is not None and mask.any():
    last = int(tokens[np.nonzero(mask)[0][-1]])
    if last in _special_ids(hf_tok):  # the turn ends on a special token
      ids.add(last)
  path = getattr(tokenizer, "path", "")
  gen = os.path.join(path, "generation_config.json") if path else ""
  if gen and os.path.isfile(gen):
    with open(gen, encoding="utf-8") as f:
      eos = json.load(f).get("eos_token_id")
    ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
  return tuple(sorted(ids))
