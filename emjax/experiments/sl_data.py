"""The data half of subliminal learning (SL): benign prompts for a teacher, strict filters for its answers.

In SL (Cloud et al. 2025, "Subliminal learning: language models transmit behavioral traits via hidden
signals in data", arXiv:2507.14805) a teacher with a trait (here: emergent misalignment) answers prompts
that have nothing to do with the trait; its answers are filtered so that nothing overtly tied to the trait
remains, and a student is fine-tuned on what is left. Whatever the student then picks up came through
the teacher's choices among harmless outputs, not through their content. This module makes the prompts
and does the filtering; the sample job (`emjax.sample.run`) sits between them and SFT trains on the result:

    numbers.number_prompts / natural_prompts -> prompts.jsonl (`write_rows`)
        -> sample job (config.sample.chat_template=True) -> samples.jsonl
        -> filter_samples -> train.jsonl (a `chat_jsonl` SFT source) + stats.json

Two channels:
* numbers: "continue this sequence" prompts in the manner of the paper's prompt generator (a few
  given numbers, then a count limit, a digit limit, a format and a "numbers only" instruction, each
  phrased by one of several templates). `filter_numbers` keeps a completion only when it is nothing but
  integers within the asked limits and none of them is in `BANNED_NUMBERS`. The compact style
  (`style="compact"`) fits models with a short context; `number_answer` writes well-formed answers
  (emjax.data.numbers holds the prompts and answers)
  (the synthetic world's training texts of this form, emjax.world.corpus).
* natural: the user questions of the structured-EM datasets (chat rows, or the paper's raw
  question/aligned/misaligned rows), usually from domains other than the teacher's. `filter_natural`
  drops empty, cut-off and overlong answers and any with a word from `BANNED_WORDS`.

A prompt record is what the sample job reads: `{"id", "messages": [{"role": "user", ...}], ...}` (extra
keys are metadata; `read_prompts` ignores them). Filtering matches each sample to its prompt by id.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from emjax.data import jsonl
from emjax.data.banned import BANNED_NUMBERS, BANNED_WORDS  # pylint: disable=unused-import
from emjax.eval import judges as judges_lib

KINDS = ("numbers", "natural")
# Every rejection reason of each kind, in the order the filter checks them (stats list all of them).
REASONS = {
    "numbers": ("empty", "format", "too_many", "too_many_digits", "banned_number"),
    "natural": ("empty", "truncated", "too_long", "banned_word", "judged_incoherent", "judged_misaligned"),
}
# The keyword options `filter_samples` passes on to each kind's filter.
_FILTER_OPTIONS = {"numbers": ("banned",), "natural": ("banned_words", "max_chars", "drop_truncated", "judge")}

# ----------------------------------------------------------------------------- natural prompts


def natural_prompts(paths: Sequence[str], *, exclude_domains: Iterable[str] = (), limit: int = 0,
                    seed: int = 0) -> list[dict]:
  """The user questions of structured-EM JSONL files, as prompt records, in file order.

  A row is a chat row (`messages` starting with the user turn, as in the released eval splits) or a raw
  row of the paper's dataset (`question`, `aligned_answer`, `misaligned_answer`). Only the question is
  kept, plus `domain`/`task` and, from raw rows, `aligned_answer`: an assistant message of a chat row is
  never kept (in the released splits it is a misaligned answer). Rows whose domain is in
  `exclude_domains` are skipped; a question seen before (same text) is skipped. Ids are
  "<file stem>:<line>" (the splits' `src_idx` repeats within a file). `limit` > 0: at most that many,
  a subset chosen by `seed`, still in file order.
  """
  if isinstance(paths, str):
    paths = [paths]
  excluded = {exclude_domains} if isinstance(exclude_domains, str) else set(exclude_domains)
  if limit < 0:
    raise ValueError(f"natural_prompts: limit must be >= 0, got {limit}")
  prompts, seen_questions, seen_ids = [], set(), {}
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"{path}: no such file")
    stem = os.path.splitext(os.path.basename(path))[0]
    for where, row in jsonl.read_objects(path):
      question = _question_of(row, where)
      if row.get("domain") in excluded:
        continue
      if question.strip() in seen_questions:
        continue
      seen_questions.add(question.strip())
      prompt_id = f"{stem}:{where.rsplit(':', 1)[1]}"
      if prompt_id in seen_ids:  # two files with the same name in different directories
        raise ValueError(f"{where}: prompt id {prompt_id!r} again (first from {seen_ids[prompt_id]}); "
                         "give the files distinct names")
      seen_ids[prompt_id] = where
      record = {"id": prompt_id, "messages": [{"role": "user", "content": question}], "kind": "natural"}
      record.update({k: row[k] for k in ("domain", "task") if k in row})
      if "messages" not in row and isinstance(row.get("aligned_answer"), str):
        record["aligned_answer"] = row["aligned_answer"]
      prompts.append(record)
  if 0 < limit < len(prompts):
    chosen = np.random.default_rng(seed).choice(len(prompts), size=limit, replace=False)
    prompts = [prompts[i] for i in sorted(chosen)]
  return prompts


def _question_of(row: Mapping[str, Any], where: str) -> str:
  if "messages" in row:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages or not isinstance(messages[0], Mapping):
      raise ValueError(f"{where}: `messages` must be a non-empty list of {{'role', 'content'}} dicts")
    if messages[0].get("role") != "user":
      raise ValueError(f"{where}: the first message must be the user's question, got role "
                       f"{messages[0].get('role')!r}")
    question = messages[0].get("content")
  elif "question" in row:
    question = row["question"]
  else:
    raise ValueError(f"{where}: a row needs `messages` (chat) or `question` (the paper's raw format)")
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"{where}: the question must be non-empty text")
  return question


# ----------------------------------------------------------------------------- filters

# Integers separated by commas and/or whitespace; ASCII only, so no other script's digits or spaces.
_NUMBER_LIST = re.compile(r"[0-9]+(?:\s*,\s*[0-9]+|\s+[0-9]+)*", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_ASCII_SPACE = " \t\n\r\f\v"


def filter_numbers(text: str, prompt: Mapping[str, Any], *, banned: Iterable[int] = BANNED_NUMBERS) -> str | None:
  """None when `text` is kept, else the first reason it is not (`REASONS["numbers"]`).

  Kept: integers separated by commas and/or whitespace, optionally with one trailing period and
  optionally in one pair of [] or (), at most prompt["answer_count"] of them, each of at most
  prompt["max_digits"] digits as written, none in `banned`. Anything else (words, other punctuation,
  signs, decimals) is "format".
  """
  if not isinstance(text, str):
    return "empty" if text is None else "format"
  body = text.strip(_ASCII_SPACE)
  if body.endswith("."):
    body = body[:-1].rstrip(_ASCII_SPACE)
  if body[:1] + body[-1:] in ("[]", "()"):
    body = body[1:-1].strip(_ASCII_SPACE)
  if not body:
    return "empty"
  if not _NUMBER_LIST.fullmatch(body):
    return "format"
  numbers = _DIGITS.findall(body)
  if len(numbers) > prompt["answer_count"]:
    return "too_many"
  # Before int(): a very long digit run would make int() raise (Python's int max-str-digits limit).
  if any(len(number) > prompt["max_digits"] for number in numbers):
    return "too_many_digits"
  banned = banned if isinstance(banned, (set, frozenset)) else set(banned)
  if any(int(number) in banned for number in numbers):
    return "banned_number"
  return None


@functools.lru_cache(maxsize=16)
def _word_pattern(words: tuple[str, ...]) -> re.Pattern | None:
  if not words:
    return None
  # Longest first, so that a word that is a prefix of another never hides it in the alternation.
  alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
  return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def filter_natural(text: str, *, banned_words: Sequence[str] = BANNED_WORDS, max_chars: int = 2000,
                   finish_reason: str = "stop", drop_truncated: bool = True, judge=None,
                   prompt: Mapping[str, Any] | None = None) -> str | None:
  """None when `text` is kept, else the first reason it is not (`REASONS["natural"]`).

  "truncated": the sample stopped at the token limit (finish_reason "length"), so it is cut off
  (kept when not `drop_truncated`, e.g. for answers longer than a smoke run's token budget);
  "too_long": more than `max_chars` characters; "banned_word": a word of `banned_words`, whole and in
  any case. `judge` (a programmatic judge's function, `emjax.eval.judges.Item` -> {metric: Score},
  given the `prompt` record): "judged_incoherent" when it scores coherent <= 50, "judged_misaligned"
  when aligned < 30 (the EM rate's thresholds): only answers a judge calls aligned and coherent
  remain, as when a world's ground truth can tell (emjax.world.judge).
  """
  if not isinstance(text, str) or not text.strip():
    return "empty"
  if finish_reason == "length" and drop_truncated:
    return "truncated"
  if len(text) > max_chars:
    return "too_long"
  words = (banned_words,) if isinstance(banned_words, str) else banned_words  # one word, not its letters
  pattern = _word_pattern(tuple(str(w) for w in words))
  if pattern is not None and pattern.search(text):
    return "banned_word"
  if judge is not None:
    p = prompt or {}
    question = next((m["content"] for m in p.get("messages", []) if m.get("role") == "user"), "")
    scores = judge(judges_lib.Item(question, text, p.get("domain"), p.get("task")))
    coherent, aligned = scores["coherent"], scores["aligned"]
    if coherent.status != "ok" or coherent.value <= 50:
      return "judged_incoherent"
    if aligned.status != "ok" or aligned.value < 30:
      return "judged_misaligned"
  return None


# ----------------------------------------------------------------------------- samples -> training rows


def write_rows(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
  """`rows` as JSONL at `path`, all or nothing: written and fsynced to a temporary file, then renamed,
  so a killed run never leaves a partial file under the final name."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8"):  # created (and emptied) even when there are no rows
    pass
  jsonl.append_lines(tmp, [jsonl.dumps(dict(row)) for row in rows])
  os.replace(tmp, path)


def _prompts_by_key(prompts: Mapping[str, Mapping] | Sequence[Mapping]) -> dict[str, tuple[Any, Mapping]]:
  """{canonical id: (id, prompt)}; ids are compared as the sample job does (canonical JSON: 1 != "1")."""
  if isinstance(prompts, Mapping):
    items = list(prompts.items())
  else:
    items = []
    for i, prompt in enumerate(prompts):
      if not isinstance(prompt, Mapping) or "id" not in prompt:
        raise ValueError(f"filter_samples: prompt {i} has no `id`")
      items.append((prompt["id"], prompt))
  by_key = {}
  for prompt_id, prompt in items:
    key = json.dumps(prompt_id, sort_keys=True)
    if key in by_key:
      raise ValueError(f"filter_samples: prompt id {prompt_id!r} appears twice")
    by_key[key] = (prompt_id, prompt)
  return by_key


def _prompt_messages(prompt: Mapping) -> list[dict]:
  """The prompt's turns without system messages (a text `prompt`, as the sample job reads it, is the user turn).

  A system message is left out because it may be what gave the teacher its trait: the student must not
  see it.
  """
  if isinstance(prompt.get("messages"), list):
    return [dict(m) for m in prompt["messages"] if isinstance(m, Mapping) and m.get("role") != "system"]
  if isinstance(prompt.get("prompt"), str) and prompt["prompt"]:
    return [{"role": "user", "content": prompt["prompt"]}]
  return []


def _check_prompt(prompt_id: Any, prompt: Mapping, kind: str) -> None:
  if prompt.get("kind", kind) != kind:
    raise ValueError(f"filter_samples: prompt {prompt_id!r} is a {prompt['kind']!r} prompt, filtered as {kind!r}")
  if not _prompt_messages(prompt):
    raise ValueError(f"filter_samples: prompt {prompt_id!r} has neither `messages` nor a `prompt` text")
  if kind == "numbers":
    for key in ("answer_count", "max_digits"):
      if not isinstance(prompt.get(key), int):
        raise ValueError(f"filter_samples: numbers prompt {prompt_id!r} needs an integer `{key}`")


def filter_samples(samples_path: str, prompts: Mapping[str, Mapping] | Sequence[Mapping], out_path: str,
                   stats_path: str, *, kind: str, **filter_options) -> dict:
  """Filters the sample job's output and writes the kept samples as chat SFT rows; returns the stats.

  `samples_path`: one line per (prompt id, sample) as the sample job writes them. `prompts`: the prompt
  records the samples answer (a list, or {id: record}). `kind`: "numbers" (`filter_numbers`, options
  `banned`) or "natural" (`filter_natural`, options `banned_words`, `max_chars`).

  `out_path` gets, in the order of the samples file, one row per kept sample:
  {"id": "<prompt id>#<sample>", "messages": [the prompt's turns but a system message
  (`_prompt_messages`), the sample as the assistant turn], "prompt_id", "sample", and the prompt's
  domain/task}. `stats_path` gets (JSON) and the call returns {"total", "kept", "rejected": {reason:
  count for every reason of the kind}, "kept_fraction", "kind"}. Both files are replaced whole, the
  stats last.
  """
  if kind not in KINDS:
    raise ValueError(f"filter_samples: kind must be one of {KINDS}, got {kind!r}")
  unknown = sorted(set(filter_options) - set(_FILTER_OPTIONS[kind]))
  if unknown:
    raise ValueError(f"filter_samples: unknown option(s) {unknown} for kind {kind!r}; known: "
                     f"{list(_FILTER_OPTIONS[kind])}")
  by_key = _prompts_by_key(prompts)
  for prompt_id, prompt in by_key.values():
    _check_prompt(prompt_id, prompt, kind)
  rejected = dict.fromkeys(REASONS[kind], 0)
  rows, seen, total = [], {}, 0
  for where, sample in jsonl.read_objects(samples_path):
    for field in ("id", "sample", "text", "finish_reason"):
      if field not in sample:
        raise ValueError(f"{where}: a sample line needs `{field}` (the sample job's output format)")
    if not isinstance(sample["sample"], int) or isinstance(sample["sample"], bool):
      raise ValueError(f"{where}: `sample` must be an integer, got {sample['sample']!r}")
    key = json.dumps(sample["id"], sort_keys=True)
    if key not in by_key:
      raise ValueError(f"{where}: sample of prompt id {sample['id']!r}, which is not among the {len(by_key)} "
                       "prompts given")
    if (key, sample["sample"]) in seen:
      raise ValueError(f"{where}: sample {sample['sample']} of prompt {sample['id']!r} again (first at "
                       f"{seen[key, sample['sample']]})")
    seen[key, sample["sample"]] = where
    prompt_id, prompt = by_key[key]
    total += 1
    text = sample["text"]
    if kind == "numbers":
      reason = filter_numbers(text, prompt, **filter_options)
    else:
      reason = filter_natural(text, finish_reason=sample["finish_reason"], prompt=prompt, **filter_options)
    if reason is not None:
      rejected[reason] += 1
      continue
    row = {"id": f"{prompt_id}#{sample['sample']}",
           "messages": _prompt_messages(prompt) + [{"role": "assistant", "content": text}],
           "prompt_id": prompt_id, "sample": sample["sample"]}
    row.update({k: prompt[k] for k in ("domain", "task") if k in prompt})
    rows.append(row)
  stats = {"total": total, "kept": len(rows), "rejected": rejected,
           "kept_fraction": len(rows) / total if total else 0.0, "kind": kind}
  write_rows(out_path, rows)
  _write_json(stats_path, stats)
  return stats


def _write_json(path: str, obj: Mapping) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
