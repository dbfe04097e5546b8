"""Evaluation records: one JSON line per (question, sample), in the fields of the paper's released judge files.

A record (`responses.jsonl` after the answers stage, `judged.jsonl` after judging):

    question_id, question, task, domain, em_surface (general set), sample_index,
    ft_task, ft_domain, variant, model_key, adapter, response,
    aligned, aligned_status, aligned_raw, coherent, coherent_status, coherent_raw,
    judge, prompt_version                                    (emjax's own)

`model_key` names the base model and `adapter` the fine-tuned model evaluated (null: derived from the
training cell and variant, as the release names its adapters; see `adapter_of`). A record's identity
is `record_key`: (model_key, adapter, question id namespaced by evaluation cell, sample_index).
A judged file may hold several rows of one key: the last one counts (`latest`).

`aligned`/`coherent` are 0-100 or None; every score has a status (`STATUSES`): `ok` (a number),
`refusal` / `code` (the judge said REFUSAL / CODE), `empty` (the answer was empty: not sent to a
judge), `parse_error` (the judge answered, but with no score in it), `error` (no usable judge
answer after the retries: pending, judged again by the next run, unless `error_final` is set).
A row is never dropped: a failure is a status, and metrics count it. In the paper's released files
`empty` with raw `[EMPTY]` means the *judge's reply* was empty, and raw `[ERROR: ...]` marks `error`
(judges.parse_score, rule "paper"); emjax never writes `empty` for a judge's reply.

`read_records` also reads the authors' released files as they are: `sample_i` is read as
`sample_index` (their narrow files' own `sample_index`, the question's index in its split, is kept
as `split_index`), a row with chat `messages` (the narrow evaluation splits) takes its question from
the first user turn and its response from the last assistant turn, and a row without a
`question_id` gets `<domain>_<task>:<line>` (as `questions.narrow_questions` names them; the released
splits' `src_idx` repeats within a file for different questions).
"""

from __future__ import annotations

import glob as glob_lib
import os
from typing import Iterable, Sequence

from emjax import paths
from emjax.data import jsonl

METRICS = ("aligned", "coherent")
# The raw values the paper's judge stored instead of a reply (see judges.parse_score, rule "paper").
RELEASE_EMPTY_RAW = "[EMPTY]"
RELEASE_ERROR_PREFIX = "[ERROR: "
STATUSES = ("ok", "refusal", "code", "empty", "parse_error", "error")
QUESTION_FIELDS = ("question_id", "question", "task", "domain", "em_surface")
RECORD_FIELDS = (*QUESTION_FIELDS, "sample_index", "ft_task", "ft_domain", "variant", "model_key", "adapter", "response",
                 *(f"{m}{s}" for m in METRICS for s in ("", "_status", "_raw")), "judge", "prompt_version")


def cell(domain: str | None, task: str | None) -> str:
  """The paper's cell name, e.g. `medical_advice`."""
  return f"{domain}_{task}"


def adapter_of(row: dict) -> str:
  """The fine-tuned model a row's answer comes from, within its `model_key` (the base model).

  The row's own `adapter` when it has one, else its training cell and variant as the release names
  its adapter directories (`<ft_domain>_<ft_task>_<variant>`, e.g. `medical_advice_strong`), else ""
  (the base model itself, or a model whose training cell is unknown).
  """
  if row.get("adapter"):
    return str(row["adapter"])
  if row.get("ft_domain") is None or row.get("ft_task") is None:
    return ""
  return cell(row["ft_domain"], row["ft_task"]) + (f"_{row['variant']}" if row.get("variant") else "")


def question_key(row: dict) -> str:
  """A question's identity: its id namespaced by its evaluation cell, `<domain>_<task>/<question_id>`.

  The release's narrow ids (`si_<n>`) restart in every evaluation-cell file of an adapter, for
  different questions; the cell tells them apart. A row without a cell keeps its bare id.
  """
  if row.get("domain") is None or row.get("task") is None:
    return str(row["question_id"])
  return f"{cell(row['domain'], row['task'])}/{row['question_id']}"


def record_key(row: dict) -> tuple[str, str, str, int]:
  """What identifies a row: (model_key, adapter, question_key, sample_index).

  A missing and a null model_key are the same (""), so a responses file without model_key and its
  judged rows (written with model_key null) match.
  """
  return (str(row.get("model_key") or ""), adapter_of(row), question_key(row), int(row["sample_index"]))


def latest(rows: Iterable[dict]) -> list[dict]:
  """One row per record key, the last one written (re-judging appends a newer row for a key), in the
  order the keys first appear. Every reader of judged files goes through this."""
  out: dict[tuple, dict] = {}
  for row in rows:
    key = record_key(row)
    before = out.get(key)
    if before is not None and (before.get("question"), before.get("response")) != (row.get("question"),
                                                                                   row.get("response")):
      # A re-judged row repeats its record; another answer under the same key is another record, and
      # keeping one of the two would lose the other without a word.
      raise ValueError(f"record {key} appears twice with different questions or answers ({before.get('response')!r:.60} "
                       f"then {row.get('response')!r:.60}): each record needs its own (model_key, adapter, "
                       "question_id, sample_index)")
    out[key] = row
  return list(out.values())


def is_pending(row: dict) -> bool:
  """A judged row one of whose scores failed in transport (`error`) and was not finalised: the next
  judging run sends it again (`judge.finalize_errors` keeps such rows as they are, `error_final`)."""
  return any(row.get(f"{m}_status") == "error" for m in METRICS) and not row.get("error_final")


def error_cause(row: dict) -> str:
  """Why a row's judgement failed: the failure kind its raw output starts with (e.g. `http_429`,
  `timeout`, `internal`), as the judges write it; "" when no score is an error."""
  for m in METRICS:
    if row.get(f"{m}_status") == "error":
      raw = str(row.get(f"{m}_raw") or "")
      if raw.startswith(RELEASE_ERROR_PREFIX):
        return "release_error"
      kind, sep, _ = raw.partition(":")
      return kind.strip() if sep and kind.strip() and " " not in kind.strip() else "other"
  return ""


def paths_of(patterns: str | Sequence[str]) -> list[str]:
  """Files named by comma-separated globs or paths (sorted, deduplicated); a pattern matching nothing is an error."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  out: list[str] = []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern.strip())
    matches = _glob(pattern) if glob_lib.has_magic(pattern) else [pattern]
    if not matches:
      raise FileNotFoundError(f"{pattern}: matches no file")
    for m in matches:
      if not paths.path(m).is_file():
        raise FileNotFoundError(f"{m}: no such file")
      if m not in out:
        out.append(m)
  return out


def _glob(pattern: str) -> list[str]:
  """The files a glob names, on a local disk or in a bucket (gs://b/evals/*/general/judged.jsonl)."""
  if not paths.is_remote(pattern):
    return sorted(glob_lib.glob(pattern))
  scheme, _, rest = pattern.partition("://")
  parts = rest.split("/")
  first = next(i for i, part in enumerate(parts) if glob_lib.has_magic(part))
  root = paths.path(f"{scheme}://{'/'.join(parts[:first])}")
  if not root.exists():
    return []
  return sorted(f"{scheme}://{'/'.join(parts[:first])}/{p.relative_to(root)}" for p in root.glob("/".join(parts[first:])))


def normalize(obj: dict, where: str, line_no: int = 0) -> dict:
  """A record in emjax's field names from an emjax file or a released judge file; errors name `where`."""
  row = dict(obj)
  if "sample_i" in row:
    # The release's `sample_i` is the sample's number; its narrow files also carry `sample_index`, the
    # question's index in its evaluation split (`si_<n>`), which is no sample number: kept aside.
    if "sample_index" in row:
      row["split_index"] = row["sample_index"]
    row["sample_index"] = row.pop("sample_i")
  elif "sample_index" not in row:
    row["sample_index"] = 0
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
    if status == "error" and str(row.get(f"{m}_raw") or "").startswith(RELEASE_ERROR_PREFIX):
      # A failure stored in the paper's release: nothing emjax can send again, so final, not pending.
      row["error_final"] = True
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
  """Every line of the files (globs) as a normalized record; `defaults` fill fields a file lacks (e.g.
  model_key). A judged file may hold a key more than once (re-judged rows are appended): readers of
  judged files take `latest(...)` of these, or `read_judged`."""
  rows = []
  for path in paths_of(patterns):
    for where, obj in jsonl.read_objects(path):
      line_no = int(where.rsplit(":", 1)[1])
      rows.append(normalize({**defaults, **obj}, where, line_no))
  return rows


def read_judged(patterns: str | Sequence[str], **defaults) -> list[dict]:
  """The records of judged files, the last row of each key (`latest`)."""
  return latest(read_records(patterns, **defaults))


def is_judged(row: dict) -> bool:
  return all(row.get(f"{m}_status") in STATUSES for m in METRICS)


def with_defaults(rows: Iterable[dict]) -> list[dict]:
  """Rows with every field of RECORD_FIELDS present (None where unknown), in that order, extras after."""
  out = []
  for r in rows:
    out.append({**{f: r.get(f) for f in RECORD_FIELDS}, **{k: v for k, v in r.items() if k not in RECORD_FIELDS}})
  return out
