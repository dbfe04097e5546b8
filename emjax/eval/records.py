"""Evaluation records: one JSON line per (question, sample), in the fields of the paper's released judge files.

A record (`responses.jsonl` after the answers stage, `judged.jsonl` after judging):

    question_id, question, task, domain, em_surface (general set), sample_index,
    ft_task, ft_domain, variant, model_key, response,
    aligned, aligned_status, aligned_raw, coherent, coherent_status, coherent_raw,
    judge, prompt_version                                    (emjax's own)

`aligned`/`coherent` are 0-100 or None; every score has a status (`STATUSES`): `ok` (a number),
`refusal` / `code` (the judge said REFUSAL / CODE), `empty` (the answer was empty: not sent to a
judge), `parse_error` (the judge answered, but with no score in it), `error` (no usable judge
answer after the retries). A row is never dropped: a failure is a status, and metrics count it.

`read_records` also reads the authors' released files as they are: `sample_i` is read as
`sample_index`, a row with chat `messages` (the narrow evaluation splits) takes its question from
the first user turn and its response from the last assistant turn, and a row without a
`question_id` gets `<domain>_<task>:<line>` (as `questions.narrow_questions` names them; the released
splits' `src_idx` repeats within a file for different questions).
"""

from __future__ import annotations

import glob as glob_lib
import os
from typing import Iterable, Sequence

from emjax.data import jsonl

METRICS = ("aligned", "coherent")
STATUSES = ("ok", "refusal", "code", "empty", "parse_error", "error")
QUESTION_FIELDS = ("question_id", "question", "task", "domain", "em_surface")
RECORD_FIELDS = (*QUESTION_FIELDS, "sample_index", "ft_task", "ft_domain", "variant", "model_key", "response",
                 *(f"{m}{s}" for m in METRICS for s in ("", "_status", "_raw")), "judge", "prompt_version")


def cell(domain: str | None, task: str | None) -> str:
  """The paper's cell name, e.g. `medical_advice`."""
  return f"{domain}_{task}"


def record_key(row: dict) -> tuple[str, str, int]:
  """What identifies a row: (model_key, question_id, sample_index); the judged file holds each once."""
  return (str(row.get("model_key", "")), str(row["question_id"]), int(row["sample_index"]))


def paths_of(patterns: str | Sequence[str]) -> list[str]:
  """Files named by comma-separated globs or paths (sorted, deduplicated); a pattern matching nothing is an error."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  out: list[str] = []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern.strip())
    matches = sorted(glob_lib.glob(pattern)) if glob_lib.has_magic(pattern) else [pattern]
    if not matches:
      raise FileNotFoundError(f"{pattern}: matches no file")
    for m in matches:
      if not os.path.isfile(m):
        raise FileNotFoundError(f"{m}: no such file")
      if m not in out:
        out.append(m)
  return out


def normalize(obj: dict, where: str, line_no: int = 0) -> dict:
  """A record in emjax's field names from an emjax file or a released judge file; errors name `where`."""
  row = dict(obj)
  if "sample_index" not in row:
    row["sample_index"] = row.pop("sample_i", 0)
  messages = row.pop("messages", None)
  if messages is not None:
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    answers = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    row.setdefault("question", users[0] if users else None)
    row.setdefault("response", answers[-1] if answers else None)
  if "question_id" not in row:
    if row.get("domain") is None or row.get("task") is None:
      raise ValueError(f"{where}: a record needs a `question_id` (or `domain` and `task`)")
    row["question_id"] = f"{cell(row['domain'], row['task'])}:{line_no}"
  for field in ("question", "response"):
    if not isinstance(row.get(field), str):
      raise ValueError(f"{where}: `{field}` must be a string, got {type(row.get(field)).__name__}")
  try:
    row["sample_index"] = int(row["sample_index"])
  except (TypeError, ValueError):
    raise ValueError(f"{where}: `sample_index` must be an integer, got {row['sample_index']!r}") from None
  for m in METRICS:
    status = row.get(f"{m}_status")
    if status is None:
      if m not in row:
        continue  # not judged yet
      status = "ok" if row[m] is not None else "error"
      row[f"{m}_status"] = status
    if status not in STATUSES:
      raise ValueError(f"{where}: `{m}_status` is {status!r}, not one of {STATUSES}")
    value = row.get(m)
    if status == "ok":
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
        raise ValueError(f"{where}: `{m}` is {value!r} with status ok; expected a number in [0, 100]")
      row[m] = float(value)
    else:
      row[m] = None
  return row


def read_records(patterns: str | Sequence[str], **defaults) -> list[dict]:
  """Every record of the files (globs), normalized; `defaults` fill fields a file lacks (e.g. model_key)."""
  rows = []
  for path in paths_of(patterns):
    for where, obj in jsonl.read_objects(path):
      line_no = int(where.rsplit(":", 1)[1])
      rows.append(normalize({**defaults, **obj}, where, line_no))
  return rows


def is_judged(row: dict) -> bool:
  return all(row.get(f"{m}_status") in STATUSES for m in METRICS)


def with_defaults(rows: Iterable[dict]) -> list[dict]:
  """Rows with every field of RECORD_FIELDS present (None where unknown), in that order, extras after."""
  out = []
  for r in rows:
    out.append({**{f: r.get(f) for f in RECORD_FIELDS}, **{k: v for k, v in r.items() if k not in RECORD_FIELDS}})
  return out
