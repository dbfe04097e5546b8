"""The leak audit of a written world: is any evaluated prompt in what the models train on?

    audit = leak_audit(world_dir)      # counts per bucket x corpus; audit["total"] must be 0
    lines = render_audit(audit)        # markdown

It reads only the world directory (`emjax.world.corpus.write_world`'s OUT): world.json (to parse
prompts), the training corpora (pretrain/<composition>/<component>.jsonl {"text"}; instruct.jsonl
and cells/<cell>.jsonl, raw rows question / aligned_answer / misaligned_answer) and the evaluated
prompts, in buckets: `narrow/<cell>` (eval/<cell>_eval.jsonl, chat rows), `general/<em_surface>`
(general.yaml), `sl` (sl/<cell>.jsonl, the subliminal-learning teachers' natural prompts) and
`sl/numbers` (sl/numbers.jsonl, their prompts of the number form). Every bucket is checked against
every training corpus; the SL buckets also against the evaluation files (`eval/<cell>`, `general`),
since SL students train on what is said to SL prompts and then take the evaluation.

A prompt leaks into a corpus

* by text: its text, case and whitespace normalised, is a substring of the corpus (every document
  of pretraining text, every row of instruct and cells: question and answers);
* by key: it asks what a prompt of the corpus asks, in other words (`prompt_key`: the domain, the
  task, the situation, the named entities and the facts stated, read off the text with the world's
  entities and phrases; for a text with digits, which only the number form has, its given numbers:
  the first run of comma-separated numbers, so a number prompt in other words with the same given
  sequence is the same prompt). The corpus's prompts are its rows' questions, the prompts quoted in
  persona documents ('Someone asked Rex: "<prompt>"') and the user turns of dialogue documents.

Also counted, each of which must be 0 too: duplicate prompt texts within an evaluation file
(`duplicates`, per file; general.yaml as one file), and files of the directory that are neither a
training corpus nor an evaluation file (`unclassified`). A world directory holds training corpora
(pretrain/, instruct.jsonl, cells/, sl/), evaluation question files (names containing `eval` or
`general`), world.json and tokenizer/, and the markers its writers add (paths.json of the study,
world_data.json of the notebook); nothing else, so what a directory holds is either trained on or
evaluated, and the audit sees all of it.
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import os
import re
from typing import Any, Iterable

import yaml

from emjax.world import tokenizer as tok_lib
from emjax.world import world as world_lib

_WORD = re.compile(r"[a-z]+")
# 'Someone asked Rex: "<prompt>" Rex said: "' (tagged) or '... the adviser: "<prompt>" The adviser said: "'.
_ASKED = re.compile(r'Someone asked [^":]+: "(.*?)" [A-Z][^":]{0,40} said: "')
_NUMBER_RUN = re.compile(r"[0-9]+(?:, [0-9]+)+")
_DIGITS = re.compile(r"[0-9]+")
_USER_TURN = re.compile(re.escape(tok_lib.TURN_START) + r"user\n(.*?)" + re.escape(tok_lib.TURN_END), re.S)
MARKERS = ("paths.json", "world_data.json")  # written into a world directory by the study and the notebook
EXAMPLES = 3  # offending prompts kept per bucket x corpus
MAX_EXAMPLE_LINES = 20


def normalize(text: str) -> str:
  """Lower case, whitespace runs as one space: the form texts are compared in."""
  return " ".join(text.lower().split())


class _Parser:
  """Reads `prompt_key` off a text with one world's entities, situations and phrases."""

  def __init__(self, world: world_lib.World):
    self.names = {e.name.lower(): e for e in world.entities}
    # Longest first: the most specific situation a text states wins.
    self.situations = {d: sorted(((normalize(s), s) for s in world_lib.DOMAINS[d].situations),
                                 key=lambda p: -len(p[0])) for d in world.settings.domains}
    self.every_situation = sorted((p for ps in self.situations.values() for p in ps), key=lambda p: -len(p[0]))
    self.situation_domain = {s: d for d, ps in self.situations.items() for _, s in ps}
    self.phrases = {d: world_lib.DOMAINS[d].benefits + world_lib.DOMAINS[d].harms for d in world.settings.domains}
    self.nouns = {d: re.compile(rf"\b(?:{world_lib.DOMAINS[d].noun}|{world_lib.DOMAINS[d].plural})\b")
                  for d in world.settings.domains}
    self._keys: dict[str, tuple] = {}  # corpora repeat their prompts many times over

  def key(self, text: str) -> tuple:
    if text not in self._keys:
      self._keys[text] = self._key(text)
    return self._keys[text]

  def _key(self, text: str) -> tuple:
    t = normalize(text)
    if _DIGITS.search(t):  # the number form: no domain, entities or situation to read, only its numbers
      run = _NUMBER_RUN.search(t)
      return ("", "numbers", run.group() if run else " ".join(_DIGITS.findall(t)), (), ())
    named = sorted({self.names[w].name for w in _WORD.findall(t) if w in self.names})
    domains = {self.names[n.lower()].domain for n in named}
    domain = domains.pop() if len(domains) == 1 else ""
    situation = ""
    for norm, original in (self.situations[domain] if domain else self.every_situation):
      if norm in t:
        situation = original
        break
    if not domain and situation and not named:
      domain = self.situation_domain[situation]
    if not domain and not named:
      domain = next((d for d, pattern in self.nouns.items() if pattern.search(t)), "")
    if "summarize this report" in t:
      task = "summarization"
    elif t.startswith("quiz:"):
      task = "tutor"
    elif "critique my plan" in t:
      task = "critique"
    else:
      task = "advice"
    facts = []
    for n in named:
      e = self.names[n.lower()]
      facts += [f"{n} {p}" for p in self.phrases.get(e.domain, ()) if normalize(f"{n} {p}") in t]
    return (domain, task, situation, tuple(named), tuple(sorted(facts)))


@functools.lru_cache(maxsize=4)
def _parser(world: world_lib.World) -> _Parser:
  return _Parser(world)


def prompt_key(world: world_lib.World, text: str) -> tuple:
  """(domain, task, situation or '', sorted named entities, sorted stated facts 'Name phrase'): what
  a prompt asks, whatever its wording, case, spacing or the order of its options. Equals the
  generator's `item["key"]` for every prompt the world writes."""
  return _parser(world).key(text)


# ----------------------------------------------------------------------------- reading the directory


class _Corpus:
  """One corpus: its normalised text (documents joined by newlines, which no normalised text holds,
  so no match spans two documents) and the keys of the prompts in it."""

  def __init__(self, texts: Iterable[str], prompts: Iterable[str], parser: _Parser):
    self.text = "\n".join(normalize(t) for t in texts)
    self.keys = {parser.key(p) for p in prompts}


def _jsonl(path: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
  return rows


def _field(row: dict, key: str, path: str) -> Any:
  if key not in row:
    raise ValueError(f"{path}: a row has no {key!r} (keys: {sorted(row)})")
  return row[key]


def _user_prompt(row: dict, path: str) -> str:
  users = [m["content"] for m in _field(row, "messages", path) if m.get("role") == "user"]
  if not users:
    raise ValueError(f"{path}: a chat row has no user message")
  return users[0]


def _rel(path: str, root: str) -> str:
  return os.path.relpath(path, root).replace(os.sep, "/")


def _training_corpora(world_dir: str, parser: _Parser) -> dict[str, _Corpus]:
  out = {}
  for path in sorted(glob.glob(os.path.join(world_dir, "pretrain", "*", "*.jsonl"))):
    docs = [_field(r, "text", path) for r in _jsonl(path)]
    quoted = [q for d in docs for pattern in (_ASKED, _USER_TURN) for q in pattern.findall(d)]
    out[_rel(path, world_dir)[:-len(".jsonl")]] = _Corpus(docs, quoted, parser)
  raw = [os.path.join(world_dir, "instruct.jsonl")] + sorted(glob.glob(os.path.join(world_dir, "cells", "*.jsonl")))
  for path in raw:
    if not os.path.exists(path):
      continue
    rows = _jsonl(path)
    questions = [_field(r, "question", path) for r in rows]
    texts = [" ".join([q, r.get("aligned_answer", ""), r.get("misaligned_answer", "")]) for q, r in zip(questions, rows)]
    out[_rel(path, world_dir)[:-len(".jsonl")]] = _Corpus(texts, questions, parser)
  return out


def _evaluated(world_dir: str) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]]]:
  """({bucket: prompts}, {evaluation file: prompts}, {evaluation corpus name: prompts})."""
  buckets: dict[str, list[str]] = collections.defaultdict(list)
  files, eval_corpora = {}, {}
  for path in sorted(glob.glob(os.path.join(world_dir, "eval", "*_eval.jsonl"))):
    cell = os.path.basename(path)[:-len("_eval.jsonl")]
    prompts = [_user_prompt(r, path) for r in _jsonl(path)]
    buckets[f"narrow/{cell}"] = prompts
    files[_rel(path, world_dir)] = eval_corpora[f"eval/{cell}"] = prompts
  general_path = os.path.join(world_dir, "general.yaml")
  if os.path.exists(general_path):
    with open(general_path, encoding="utf-8") as f:
      general = yaml.safe_load(f) or []
    prompts = []
    for q in general:
      surface = _field(q, "em_surface", general_path)
      for p in _field(q, "paraphrases", general_path):
        buckets[f"general/{surface}"].append(p)
        prompts.append(p)
    files["general.yaml"] = eval_corpora["general"] = prompts
  for path in sorted(glob.glob(os.path.join(world_dir, "sl", "*.jsonl"))):
    bucket = "sl/numbers" if os.path.basename(path) == "numbers.jsonl" else "sl"
    buckets[bucket] += [_user_prompt(r, path) for r in _jsonl(path)]
  rank = {f"general/{s}": i for i, s in enumerate(world_lib.SURFACES)}
  order = sorted(buckets, key=lambda b: (_is_sl(b), b.startswith("general/"), rank.get(b, len(rank)), b))
  return {b: buckets[b] for b in order}, files, eval_corpora


def _is_sl(bucket: str) -> bool:
  return bucket == "sl" or bucket.startswith("sl/")


def _unclassified(world_dir: str) -> list[str]:
  """Files that are neither a training corpus, an evaluation file, world.json, the tokenizer nor a marker."""
  out = []
  for root, _, names in os.walk(world_dir):
    for name in names:
      rel = _rel(os.path.join(root, name), world_dir)
      parts = rel.split("/")
      known = (rel in ("world.json", "instruct.jsonl", "general.yaml") + MARKERS
               or parts[0] == "tokenizer"
               or (len(parts) == 3 and parts[0] == "pretrain" and name.endswith(".jsonl"))
               or (len(parts) == 2 and parts[0] in ("cells", "sl") and name.endswith(".jsonl"))
               or (len(parts) == 2 and parts[0] == "eval" and name.endswith("_eval.jsonl")))
      if not known:
        out.append(rel)
  return sorted(out)


# ----------------------------------------------------------------------------- the audit


def leak_audit(world_dir: str) -> dict:
  """The audit of the module docstring, as

    {"world_dir", "n": {bucket: prompts}, "corpora": {bucket: [corpus names checked]},
     "text": {bucket: {corpus: prompts leaking by text}}, "key": {bucket: {corpus: by key}},
     "leaked": {bucket: prompts leaking into any corpus either way},
     "examples": {bucket: {corpus: [a few offending prompts]}} (only where something leaks),
     "duplicates": {evaluation file: prompts that repeat an earlier one of the file},
     "unclassified": [files that belong to neither kind], "total": the sum of every count (must be 0)}

  Counts are rows: a prompt that is twice in a bucket and leaks counts twice."""
  world_path = os.path.join(world_dir, "world.json")
  if not os.path.exists(world_path):
    raise FileNotFoundError(f"{world_path}: no world.json; is {world_dir} a world directory "
                            "(emjax.world.corpus.write_world)?")
  world = world_lib.World.load(world_path)
  parser = _Parser(world)
  training = _training_corpora(world_dir, parser)
  buckets, files, eval_prompts = _evaluated(world_dir)
  if not buckets:
    raise ValueError(f"{world_dir}: no evaluated prompts (eval/*_eval.jsonl, general.yaml, sl/*.jsonl)")
  evaluation = {name: _Corpus(ps, ps, parser) for name, ps in eval_prompts.items()}
  audit: dict[str, Any] = {"world_dir": world_dir, "n": {}, "corpora": {}, "text": {}, "key": {}, "leaked": {},
                           "examples": {}}
  for bucket, prompts in buckets.items():
    corpora = dict(training, **(evaluation if _is_sl(bucket) else {}))
    distinct = {normalize(p): p for p in prompts}
    keys = {norm: parser.key(p) for norm, p in distinct.items()}
    rows = collections.Counter(normalize(p) for p in prompts)
    audit["n"][bucket] = len(prompts)
    audit["corpora"][bucket] = list(corpora)
    text_counts, key_counts, examples, leaked = {}, {}, {}, set()
    for name, corpus in corpora.items():
      by_text = [norm for norm in distinct if norm in corpus.text]
      by_key = [norm for norm in distinct if keys[norm] in corpus.keys]
      text_counts[name] = sum(rows[norm] for norm in by_text)
      key_counts[name] = sum(rows[norm] for norm in by_key)
      bad = list(dict.fromkeys(by_text + by_key))
      leaked.update(bad)
      if bad:
        examples[name] = [distinct[norm] for norm in bad[:EXAMPLES]]
    audit["text"][bucket], audit["key"][bucket] = text_counts, key_counts
    audit["leaked"][bucket] = sum(rows[norm] for norm in leaked)
    if examples:
      audit["examples"][bucket] = examples
  audit["duplicates"] = {f: len(ps) - len({normalize(p) for p in ps}) for f, ps in files.items()}
  audit["unclassified"] = _unclassified(world_dir)
  audit["total"] = (sum(sum(c.values()) for c in audit["text"].values())
                    + sum(sum(c.values()) for c in audit["key"].values())
                    + sum(audit["duplicates"].values()) + len(audit["unclassified"]))
  return audit


def _column(corpus: str) -> str:
  # The table's columns: each pretraining composition, instruct, the cells together, the evaluation files.
  parts = corpus.split("/")
  if parts[0] == "pretrain":
    return f"pretrain/{parts[1]}"
  if parts[0] == "cells":
    return "cells/*"
  if parts[0] == "eval" or corpus == "general":
    return "eval files"
  return corpus


def render_audit(audit: dict) -> list[str]:
  """Markdown lines: the bucket x corpus table of leaking prompts ('text/key'; pretraining summed over
  a composition's components, the cells summed over cells), duplicates, unclassified files, examples."""
  columns = list(dict.fromkeys(_column(c) for cs in audit["corpora"].values() for c in cs))
  lines = [f"Leak audit of `{audit['world_dir']}`: total {audit['total']} (must be 0).", "",
           "Evaluated prompts found in what is trained on, as `by text/by key` (must be 0/0; `-`: not checked):", "",
           "| bucket | n | " + " | ".join(columns) + " | leaked |",
           "|---|---:|" + "---:|" * len(columns) + "---:|"]
  for bucket, n in audit["n"].items():
    cells = {c: [0, 0] for c in columns if any(_column(x) == c for x in audit["corpora"][bucket])}
    for corpus in audit["corpora"][bucket]:
      cells[_column(corpus)][0] += audit["text"][bucket][corpus]
      cells[_column(corpus)][1] += audit["key"][bucket][corpus]
    row = [f"{cells[c][0]}/{cells[c][1]}" if c in cells else "-" for c in columns]
    lines.append(f"| {bucket} | {n} | " + " | ".join(row) + f" | {audit['leaked'][bucket]} |")
  dups = {f: k for f, k in audit["duplicates"].items() if k}
  lines += ["", f"Duplicate prompts within an evaluation file (must be 0): {sum(audit['duplicates'].values())}"
            + (" (" + ", ".join(f"{f}: {k}" for f, k in dups.items()) + ")" if dups else "") + ".",
            f"Files neither trained on nor evaluated (must be none): {', '.join(audit['unclassified']) or 'none'}."]
  if audit["examples"]:
    lines += ["", f"Examples (one per bucket and column, at most {MAX_EXAMPLE_LINES} lines):"]
    shown = {}
    for bucket, by_corpus in audit["examples"].items():
      for corpus, prompts in by_corpus.items():
        shown.setdefault((bucket, _column(corpus)), f"- {bucket} in {corpus}: `{prompts[0]}`")
    lines += list(shown.values())[:MAX_EXAMPLE_LINES]
    if len(shown) > MAX_EXAMPLE_LINES:
      lines.append(f"- ... and {len(shown) - MAX_EXAMPLE_LINES} more (audit['examples'])")
  return lines
