"""Evaluation question sets: the paper's general-task set (YAML) with its slicing metadata.

Format (a YAML list): {id, task, domain, em_surface, paraphrases: [str, ...], ...}. The
loader contract follows the paper's: a question is `id` + `paraphrases[0]`; task, domain,
em_surface and any other fields are kept as metadata for slicing the results.
"""

from __future__ import annotations

import os

import yaml

EM_SURFACES = ("low", "medium", "high")
REQUIRED = ("id", "task", "domain", "em_surface", "paraphrases")


def load_general_eval(path: str) -> list[dict]:
  """[{id, prompt, task, domain, em_surface, ...}] from the general evaluation YAML."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  with open(path, encoding="utf-8") as f:
    try:
      items = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ValueError(f"{path}: invalid YAML ({e})") from None
  if not isinstance(items, list) or not items:
    raise ValueError(f"{path}: expected a non-empty YAML list of questions")
  questions, seen = [], set()
  for i, item in enumerate(items):
    where = f"{path}: item {i}"
    if not isinstance(item, dict):
      raise ValueError(f"{where}: expected a mapping")
    missing = [k for k in REQUIRED if k not in item]
    if missing:
      raise ValueError(f"{where} ({item.get('id', '?')}): missing fields {missing}")
    if item["em_surface"] not in EM_SURFACES:
      raise ValueError(f"{where} ({item['id']}): em_surface {item['em_surface']!r} not in {EM_SURFACES}")
    paraphrases = item["paraphrases"]
    if not isinstance(paraphrases, list) or not paraphrases or not all(isinstance(p, str) and p.strip()
                                                                       for p in paraphrases):
      raise ValueError(f"{where} ({item['id']}): paraphrases must be a non-empty list of non-empty strings")
    if item["id"] in seen:
      raise ValueError(f"{where}: duplicate id {item['id']!r}")
    seen.add(item["id"])
    meta = {k: v for k, v in item.items() if k != "paraphrases"}
    questions.append({**meta, "prompt": paraphrases[0], "paraphrases": list(paraphrases)})
  return questions
