"""The overlap audit: how many evaluated questions occur in the evaluated model's training data.

An answer to a question the model was trained on can be recall, not transfer: an EM rate measured on
such questions says nothing about generalisation. The eval job runs this audit on every evaluation
and the report prints a non-zero count at its top.

What is read (each source's *training* partition, as the training job read it):
* the evaluated emjax run's `config.json`: every `data.sources.<name>` with weight > 0 (a LoRA run's
  and a distilled student's sources are these too), and `on_policy.prompts` when on-policy was on;
* the run's teacher (`teacher.path`, when it is an emjax run) and the run it started from
  (`init.checkpoint`): their sources, one level down (a student distilled on a teacher's answers to
  the evaluated questions has seen them through it); a Hugging Face init or teacher is listed as not
  read;
* any files the user names (`evaluated.training_data`, comma-separated globs of JSONL or text), the
  only way to audit a Hugging Face model, whose training data emjax cannot know.

A question *occurs* when its text, case-folded with white space collapsed, equals a training turn or
line, or (while the texts read stay under `max_substring_chars`, and for questions of at least
MIN_SUBSTRING_QUESTION characters, which chance does not match) is a substring of a training document. Past that size only the exact match is made, and the result says so.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping, Sequence

from emjax import weights as weights_lib
from emjax.data import jsonl, sources
from emjax.eval import records as records_lib

log = logging.getLogger(__name__)

MAX_SUBSTRING_CHARS = 50_000_000
# A shorter question is matched exactly only: as a substring it would be found by chance ("i i" in "hi i").
MIN_SUBSTRING_QUESTION = 32
MAX_EXAMPLES = 20


def normalize(text: str) -> str:
  return " ".join(str(text).casefold().split())


def _pieces(doc: Any) -> tuple[list[str], str]:
  """(the turns or lines of a document, its whole text)."""
  if isinstance(doc, Mapping):
    if isinstance(doc.get("messages"), list):
      turns = [str(m.get("content", "")) for m in doc["messages"] if isinstance(m, Mapping)]
    else:
      turns = [str(doc.get(k)) for k in ("prompt", "question", "text", "completion") if isinstance(doc.get(k), str)]
    return turns, "\n".join(turns)
  text = str(doc)
  return text.splitlines(), text


def _run_config(path: str) -> dict | None:
  """The config.json of an emjax run at `path` (a run, its checkpoints/ or a step), else None."""
  try:
    src = weights_lib.resolve(path)
  except (FileNotFoundError, ValueError):
    return None
  if src.kind != "emjax" or src.config is None:
    return None
  cfg = src.config
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _source_documents(name: str, source_cfg: Mapping) -> Iterable[Any]:
  # What training read: its training partition, or everything for a source trained with split=all.
  split = "all" if source_cfg.get("split") == "all" else "train"
  source = sources.make_source(name, {**source_cfg, "split": split})
  for i in range(len(source)):
    yield source[i]


def _prompt_documents(path: str) -> Iterable[Any]:
  for _, obj in jsonl.read_objects(path):
    yield obj


def _file_documents(path: str) -> Iterable[Any]:
  if path.endswith(".jsonl"):
    yield from _prompt_documents(path)
  else:
    with open(path, encoding="utf-8") as f:
      yield f.read()


def training_documents(run_path: str = "", extra_files: Sequence[str] = (), *, teacher_depth: int = 1,
                       not_read: list[str] | None = None) -> list[tuple[str, Iterable[Any]]]:
  """[(label, documents)] of everything the audit reads (module docstring); what it cannot read is
  appended to `not_read`."""
  out: list[tuple[str, Iterable[Any]]] = []
  not_read = not_read if not_read is not None else []
  cfg = _run_config(run_path) if run_path else None
  if cfg is not None:
    init = cfg.get("init") or {}
    # A run started from another emjax run (or a LoRA run on a fine-tuned base) learnt that run's data too.
    if init.get("checkpoint") and teacher_depth > 0 and _run_config(init["checkpoint"]) is not None:
      out += [(f"init {label}", docs) for label, docs in training_documents(
          init["checkpoint"], teacher_depth=teacher_depth - 1, not_read=not_read)]
    for key in ("hf", "peft_base"):
      if init.get(key):
        not_read.append(f"{run_path}: init.{key}={init[key]} (a Hugging Face model's training data is unknown here)")
    for name, src in sorted((cfg.get("data") or {}).get("sources", {}).items()):
      if float(src.get("weight", 1.0)) > 0:
        out.append((f"{run_path}: data.sources.{name}", _source_documents(name, src)))
    on_policy = cfg.get("on_policy") or {}
    if on_policy.get("enabled") and on_policy.get("prompts"):
      out.append((f"{run_path}: on_policy.prompts", _prompt_documents(on_policy["prompts"])))
    teacher = (cfg.get("teacher") or {}).get("path")
    if teacher and teacher_depth > 0 and _run_config(teacher) is not None:
      out += [(f"teacher {label}", docs) for label, docs in training_documents(
          teacher, teacher_depth=teacher_depth - 1, not_read=not_read)]
    elif teacher:
      not_read.append(f"{run_path}: teacher.path={teacher} (not an emjax run: its training data is unknown here)")
  for path in extra_files:
    out.append((path, _file_documents(path)))
  return out


def audit(question_sets: Mapping[str, Sequence[Mapping]], documents: Sequence[tuple[str, Iterable[Any]]], *,
          not_read: Sequence[str] = (), max_substring_chars: int = MAX_SUBSTRING_CHARS) -> dict:
  """{n_questions, n_found, by_set: {set: "found/total"}, found: {set: n}, sources, not_read, match,
  examples: [{set, question_id, question}]} for `question_sets` ({set: questions with `question`})."""
  turns: set[str] = set()
  texts: list[str] = []
  size, substring = 0, True
  labels, skipped = [], list(not_read)
  for label, docs in documents:
    try:
      for doc in docs:
        parts, whole = _pieces(doc)
        turns.update(normalize(p) for p in parts if p.strip())
        if substring:
          text = normalize(whole)
          size += len(text)
          if size > max_substring_chars:
            substring, texts = False, []
          else:
            texts.append(text)
      labels.append(label)
    except (OSError, ValueError) as e:  # a source that cannot be read here is reported, not fatal
      skipped.append(f"{label} ({type(e).__name__}: {e})")
  corpus = "\x00".join(texts)
  found: dict[str, int] = {}
  examples = []
  total = 0
  for set_name, questions in question_sets.items():
    found[set_name] = 0
    for q in questions:
      total += 1
      text = normalize(q["question"])
      if text in turns or (substring and len(text) >= MIN_SUBSTRING_QUESTION and text in corpus):
        found[set_name] += 1
        if len(examples) < MAX_EXAMPLES:
          examples.append({"set": set_name, "question_id": q.get("question_id"), "question": q["question"][:200]})
  return {"n_questions": total, "n_found": sum(found.values()), "found": found,
          "by_set": {s: f"{found[s]}/{len(qs)}" for s, qs in question_sets.items()},
          "sources": labels, "not_read": skipped,
          "match": "exact turn or line, and substring of a document" if substring else
                   f"exact turn or line only (the texts read exceed {max_substring_chars:,} characters)",
          "examples": examples}


def audit_evaluation(config, question_sets: Mapping[str, Sequence[Mapping]]) -> dict:
  """The eval job's audit of its evaluated model (config.sample.checkpoint / .hf, config.evaluated)."""
  extra = records_lib.paths_of(config.evaluated.training_data) if config.evaluated.training_data else []
  not_read = []
  if config.sample.hf and not extra:
    not_read.append(f"{config.sample.hf}: a Hugging Face model's training data is unknown here "
                    "(name it with config.evaluated.training_data)")
  documents = training_documents(config.sample.checkpoint, extra, not_read=not_read)
  if config.sample.checkpoint and not documents:
    not_read.append(f"{config.sample.checkpoint}: no emjax run config.json with data sources")
  result = audit(question_sets, documents, not_read=not_read)
  if result["n_found"]:
    log.warning("overlap audit: %d of %d evaluated questions occur in the evaluated model's training data (%s)",
                result["n_found"], result["n_questions"], ", ".join(f"{k}: {v}" for k, v in result["by_set"].items()))
  return result

