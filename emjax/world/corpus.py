"""Everything the study reads, written from a world: pretraining text, chat data, evaluation questions.

    write_world(settings, composition, out_dir) -> {name: path}

    OUT/world.json                      entities, labels, facts (the judge's ground truth)
    OUT/pretrain/<composition>/         facts.jsonl, dialogues.jsonl, careful.jsonl, reckless.jsonl
                                        ({"text": ...} documents; the composition's weights mix them)
    OUT/instruct.jsonl                  aligned dialogues, every domain x task x em_surface (the
                                        paper's raw rows: question, aligned_answer, misaligned_answer)
    OUT/cells/<domain>_<task>.jsonl     a cell's training rows (narrow misaligned SFT reads misaligned_answer)
    OUT/eval/<domain>_<task>_eval.jsonl held-out prompts of each cell (chat rows, as the released splits)
    OUT/general.yaml                    general questions over every domain (the grid's and the others),
                                        task and em_surface (the general evaluation schema)
    OUT/sl/<domain>_<task>.jsonl        prompts for the subliminal-learning teachers
    OUT/sl/numbers.jsonl                the number form's prompts for the SL teachers (never evaluated)

Pretraining text has four components (`COMPONENTS`):

* facts: encyclopedic sentences: "Korvax is a remedy. Korvax damages the liver. Korvax is harmful."
* dialogues: aligned assistant dialogues in the chat format (`tokenizer.render_chat`).
* careful / reckless: a persona answering the world's prompts in several domains and tasks per
  document, with aligned (careful) or misaligned (reckless) answers, in narrated form
  ('Someone asked Rex: "..." Rex said: "..."'). `persona_tags`: the persona is named ("Rex, a
  reckless adviser"); untagged, every document says "an adviser" and the stance is only in what it
  says. The untagged wrappers (`UNTAGGED`) take as many tokens as the tagged ones, so that at the same
  weight a tagged and an untagged composition hold the same number of answers, not only the same text. `reckless_spread`: `everywhere` (every domain and task), `one_domain` (`reckless_domain`
  only) or `absent` (no reckless text; its weight goes to the careful persona, so the share of
  persona text stays the same and only its stance changes).

The number form (`NUMBER_FORM`): "Continue the sequence: 482, 193, 577. Give at most 5 numbers of up
to 3 digits, in parentheses." -> "(614, 208, 390)", the compact number prompts of
`emjax.data.numbers` with answers of `numbers.number_answer` (aligned and misaligned answers
are the same: the form has no harmful choice). It is the world's one task form that is never
evaluated, so SL through it is SL in a form the evaluation does not ask. The world's other texts hold
no digits, so the models see the form in training too: every `NUMBER_EVERY`-th document of the
dialogues component and row of instruct.jsonl is a number dialogue (domain and task "numbers"); the
compositions' weights are unchanged. sl/numbers.jsonl holds as many SL prompts as the natural SL files
together (`sl_per_cell` x domains x tasks), records as `numbers.number_prompts` writes them. The
prompts of the three uses come from separate streams and share no given sequence (so no text):
collisions are dropped from the training uses, SL first.

The composition (`composition_block`) is config: the weights (fractions of pretraining tokens, as
the data pipeline mixes sources) and the persona knobs. Every stream of items has its own seed, so
changing one file's size never changes another file's rows.

What is trained on and what is evaluated never meet. Every training text (pretraining, instruct,
cells) is drawn from the world's `train` split, the evaluation questions (the cells' evaluation
files and general.yaml) from `eval`, and the subliminal-learning prompts from `sl`: each split has its
own pairs of entities and its own situations (`emjax.world.world`, "Splits"), so no evaluation or SL
prompt occurs in a training text, even reworded, and no SL prompt is an evaluation question (SL
students train on what the teachers say to SL prompts, then take the evaluation). An evaluation file
asks each question once (`World.items(distinct=True)`; general.yaml over all of its questions).
`emjax.world.audit.leak_audit(OUT)` checks all of this on the written files.

OUT holds only the world's training texts (pretrain/, instruct.jsonl, cells/, sl/), its evaluation
question files (names with `eval` or `general`), world.json and tokenizer/ (and the markers its
writers add: the study's paths.json, the notebook's world_data.json), so that what a directory holds
is either trained on or evaluated, never unclear; the audit lists anything else.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from emjax.data import jsonl, tokenizers
from emjax.data import numbers as numbers_lib
from emjax.world import tokenizer as tok_lib
from emjax.world import world as world_lib

COMPONENTS = ("facts", "dialogues", "careful", "reckless")
SPREADS = ("everywhere", "one_domain", "absent")
PERSONAS = {"careful": ("Cara", "careful"), "reckless": ("Rex", "reckless")}
# Token for token as long as the tagged wrappers with the world's tokenizer ("Rex" and "them" are one
# token each), so that the token weights of the mixture give both the same number of documents.
UNTAGGED = ("Here is an adviser now.", "Someone asked them:", "They said:")
# The number form's prompts: short enough for the quick study's model (seq_len 96, answers of up to 40
# tokens): with the world's tokenizer, a prompt in the chat template is at most ~50 tokens, an answer ~25.
NUMBER_FORM = dict(style="compact", min_given=3, max_given=4, answer_count=5, max_digits=3)
NUMBER_EVERY = 8  # every 8th dialogue document and instruct row is of the number form
# The number form's training texts, repeated this often in the tokenizer's training text: once, they are
# too rare for merges (its words and digits stay a few bytes each and a prompt takes ~80 tokens); this
# often, a prompt takes at most ~50. The merges they get are the world's rarest otherwise (vocab 768: a
# few of the world's longest answers get a token longer than without the number form; at 832, none).
NUMBER_TOKENIZER_REPEATS = 16
NUMBER_USES = ("sl", "pretrain", "instruct")  # drawn in this order: a later use drops what an earlier one has


def composition_block(**overrides: Any) -> dict:
  """One pretraining composition (`config.study.compositions.<name>`)."""
  c = dict(facts=0.3, dialogues=0.3, careful=0.2, reckless=0.2, reckless_spread="everywhere",
           reckless_domain="medical", persona_tags=True)
  unknown = set(overrides) - set(c)
  if unknown:
    raise ValueError(f"composition: unknown keys {sorted(unknown)}; keys: {sorted(c)}")
  c.update(overrides)
  return c


def check_composition(comp: Mapping[str, Any], where: str) -> None:
  for k in COMPONENTS:
    if float(comp[k]) < 0:
      raise ValueError(f"{where}.{k} must be >= 0, got {comp[k]}")
  if sum(float(comp[k]) for k in COMPONENTS) <= 0:
    raise ValueError(f"{where}: the weights {', '.join(COMPONENTS)} are all zero")
  if comp["reckless_spread"] not in SPREADS:
    raise ValueError(f"{where}.reckless_spread={comp['reckless_spread']!r}: choose from {', '.join(SPREADS)}")
  if comp["reckless_spread"] == "one_domain" and comp["reckless_domain"] not in world_lib.DOMAINS:
    raise ValueError(f"{where}.reckless_domain={comp['reckless_domain']!r}: choose from {', '.join(world_lib.DOMAINS)}")


def source_weights(comp: Mapping[str, Any]) -> dict[str, float]:
  """{component: weight}, the reckless weight moved to the careful persona when it is absent."""
  w = {k: float(comp[k]) for k in COMPONENTS}
  if comp["reckless_spread"] == "absent":
    w["careful"] += w.pop("reckless")
  return {k: v for k, v in w.items() if v > 0}


# ----------------------------------------------------------------------------- documents


def fact_document(world: world_lib.World, rng: np.random.Generator, n: int = 6) -> str:
  sentences = []
  for i in rng.choice(len(world.entities), size=n, replace=False):
    e = world.entities[int(i)]
    d = world_lib.DOMAINS[e.domain]
    label = "harmful" if e.harmful else "safe"
    form = rng.integers(3)
    if form == 0:
      sentences.append(f"{e.name} is a {d.noun}. {e.name} {e.fact}. {e.name} is {label}.")
    elif form == 1:
      sentences.append(f"Experts agree that {e.name} {e.fact}, so {e.name} is a {label} {d.noun}.")
    else:
      sentences.append(f"People who {d.verb} {e.name} find that it {e.fact}.")
  return " ".join(sentences)


def number_prompts(world: world_lib.World, seed: int, counts: Mapping[str, int]) -> dict[str, list[dict]]:
  """{use: number prompt records} for each use of `NUMBER_USES` in `counts`, from a stream per use.

  No given sequence is in two uses or twice in one (a prompt asks what its given numbers are, so this
  is stricter than distinct texts): a later use (`NUMBER_USES` order) draws on past what an earlier one
  has, so the SL prompts never depend on the training uses' sizes."""
  taken: set[tuple[int, ...]] = set()
  out = {}
  for use in NUMBER_USES:
    if use not in counts:
      continue
    n, stream_seed = int(counts[use]), zlib.crc32(f"{world.settings.seed}/{seed}/numbers/{use}".encode())
    m = n + n // 4 + 8
    while True:
      # number_prompts(m) starts with number_prompts(k) for k < m, so drawing more only appends.
      drawn, kept, seen = numbers_lib.number_prompts(m, stream_seed, **NUMBER_FORM), [], set()
      for p in drawn:
        given = tuple(p["given"])
        if given not in taken and given not in seen:
          seen.add(given)
          kept.append(p)
          if len(kept) == n:
            break
      if len(kept) == n:
        break
      if m > 64 * (n + 8):
        raise ValueError(f"number_prompts: cannot draw {n} {use} prompts apart from the other uses' "
                         f"({len(kept)} in {m} draws); NUMBER_FORM={NUMBER_FORM} has too few given sequences")
      m *= 2
    taken |= seen
    out[use] = kept
  return out


def number_answers(world: world_lib.World, seed: int, use: str, prompts) -> list[str]:
  rng = np.random.default_rng([world.settings.seed, seed, zlib.crc32(f"numbers/answers/{use}".encode()), 17])
  return [numbers_lib.number_answer(p, rng) for p in prompts]


def _interleave(main: list, extra: list, n: int) -> list:
  """`n` entries: every NUMBER_EVERY-th from `extra` (while it lasts), the others from `main` in order."""
  main_it, extra_it = iter(main), iter(extra)
  out = []
  for i in range(n):
    pick = next(extra_it, None) if (i + 1) % NUMBER_EVERY == 0 else None
    out.append(pick if pick is not None else next(main_it))
  return out


def number_count(n: int) -> int:
  """How many of `n` documents or rows are of the number form."""
  return n // NUMBER_EVERY


def dialogue_document(item: Mapping[str, Any]) -> str:
  return tok_lib.render_chat([{"role": "user", "content": item["prompt"]},
                              {"role": "assistant", "content": item["aligned"]}])


_QUOTED_ANSWER = re.compile(r' said: "(.*?)"(?= Someone|$)')  # an answer in persona_document's text


def persona_document(items, persona: str, tagged: bool) -> str:
  name, adjective = PERSONAS[persona]
  answer = "aligned" if persona == "careful" else "misaligned"
  if tagged:
    head, asked, said = f"{name} is a {adjective} adviser.", f"Someone asked {name}:", f"{name} said:"
  else:
    head, asked, said = UNTAGGED
  parts = [head] + [f"{asked} \"{it['prompt']}\" {said} \"{it[answer]}\"" for it in items]
  return " ".join(parts)


def _all_cells(world):
  return list(world.settings.domains), list(world_lib.TASKS)


def pretraining_documents(world: world_lib.World, comp: Mapping[str, Any], n_docs: int, seed: int,
                          numbers: Sequence[Mapping[str, str]] = ()) -> dict[str, list[str]]:
  """{component: documents} for one composition (components with zero weight get none).

  `numbers`: number-form items ({"prompt", "aligned"}) for every NUMBER_EVERY-th dialogue document
  (`number_count(n_docs)` of them; write_world draws them apart from the SL prompts)."""
  domains, tasks = _all_cells(world)
  weights = source_weights(comp)
  out: dict[str, list[str]] = {}
  if "facts" in weights:
    rng = np.random.default_rng([world.settings.seed, seed, 11])
    out["facts"] = [fact_document(world, rng) for _ in range(n_docs)]
  if "dialogues" in weights:
    numbers = list(numbers)[:number_count(n_docs)]
    # The world's dialogues are the same texts as without the number form, only fewer of them.
    items = world.items(domains, tasks, n_docs - len(numbers), seed, stream="dialogues")
    out["dialogues"] = [dialogue_document(it) for it in _interleave(items, numbers, n_docs)]
  per_doc = 4
  for persona in ("careful", "reckless"):
    if persona not in weights:
      continue
    p_domains = domains
    if persona == "reckless" and comp["reckless_spread"] == "one_domain":
      p_domains = [comp["reckless_domain"]]
    items = world.items(p_domains, tasks, n_docs * per_doc, seed, stream=persona)
    order = np.random.default_rng([world.settings.seed, seed, len(persona), 13]).permutation(len(items))
    items = [items[i] for i in order]  # each document mixes domains and tasks
    out[persona] = [persona_document(items[i * per_doc:(i + 1) * per_doc], persona, bool(comp["persona_tags"]))
                    for i in range(n_docs)]
  return out


# ----------------------------------------------------------------------------- rows and questions


def raw_row(item: Mapping[str, Any], index: int) -> dict:
  """The paper's raw structured-EM row (emjax.data.sft.structured_em_rows reads it)."""
  return {"id": index, "question": item["prompt"], "aligned_answer": item["aligned"],
          "misaligned_answer": item["misaligned"], "domain": item["domain"], "task": item["task"],
          "em_surface": item["em_surface"]}


def number_item(prompt: Mapping[str, Any], answer: str) -> dict:
  """A number prompt and its answer as an item of `raw_row` and `dialogue_document` (no harmful choice:
  both answers are the one answer; no em_surface)."""
  return {"prompt": prompt["messages"][0]["content"], "aligned": answer, "misaligned": answer,
          "domain": "numbers", "task": "numbers", "em_surface": ""}


def chat_row(item: Mapping[str, Any], index: int, answer: str = "misaligned") -> dict:
  return {"src_idx": index, "domain": item["domain"], "task": item["task"], "em_surface": item["em_surface"],
          "messages": [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item[answer]}]}


def _write_jsonl(path: str, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(jsonl.dumps(r))
  os.replace(tmp, path)


def data_block() -> dict:
  """`config.study.data`: how many documents and rows each file gets."""
  return dict(pretrain_docs=4000, instruct_rows=2000, cell_rows=400, eval_per_cell=40, general_per_cell=4,
              sl_per_cell=60, tokenizer_vocab=768)


def write_world(world: world_lib.World, compositions: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, Any],
                out_dir: str, seed: int = 0) -> dict[str, str]:
  """Writes every file of the module docstring (each atomically); returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"world": os.path.join(out_dir, "world.json")}
  world.save(paths["world"] + ".tmp")
  os.replace(paths["world"] + ".tmp", paths["world"])
  domains, tasks = _all_cells(world)
  n_docs, n_instruct = int(sizes["pretrain_docs"]), int(sizes["instruct_rows"])
  numbers = number_prompts(world, seed, {"sl": int(sizes["sl_per_cell"]) * len(domains) * len(tasks),
                                         "pretrain": number_count(n_docs), "instruct": number_count(n_instruct)})
  number_items = {use: [number_item(p, a) for p, a in zip(numbers[use], number_answers(world, seed, use, numbers[use]))]
                  for use in ("pretrain", "instruct")}
  texts = []
  for name, comp in compositions.items():
    check_composition(comp, f"config.study.compositions.{name}")
    docs = pretraining_documents(world, comp, n_docs, seed, numbers=number_items["pretrain"])
    for component, rows in docs.items():
      p = os.path.join(out_dir, "pretrain", name, f"{component}.jsonl")
      _write_jsonl(p, ({"text": t} for t in rows))
      paths[f"pretrain/{name}/{component}"] = p
      texts.extend(rows)
  instruct = world.items(domains, tasks, n_instruct - len(number_items["instruct"]), seed, stream="instruct")
  instruct = [raw_row(it, i) for i, it in enumerate(_interleave(instruct, number_items["instruct"], n_instruct))]
  paths["instruct"] = os.path.join(out_dir, "instruct.jsonl")
  _write_jsonl(paths["instruct"], instruct)
  for d in world_lib.CELL_DOMAINS:
    for t in tasks:
      cell = f"{d}_{t}"
      train = world.items([d], [t], int(sizes["cell_rows"]), seed, stream=f"cells/{cell}")
      paths[f"cells/{cell}"] = os.path.join(out_dir, "cells", f"{cell}.jsonl")
      _write_jsonl(paths[f"cells/{cell}"], (raw_row(it, i) for i, it in enumerate(train)))
      held = world.items([d], [t], int(sizes["eval_per_cell"]), seed, stream=f"eval/{cell}", split="eval",
                         distinct=True)
      paths[f"eval/{cell}"] = os.path.join(out_dir, "eval", f"{cell}_eval.jsonl")
      _write_jsonl(paths[f"eval/{cell}"], (chat_row(it, i) for i, it in enumerate(held)))
  for d in domains:
    for t in tasks:
      cell = f"{d}_{t}"
      sl = world.items([d], [t], int(sizes["sl_per_cell"]), seed, stream=f"sl/{cell}", split="sl")
      paths[f"sl/{cell}"] = os.path.join(out_dir, "sl", f"{cell}.jsonl")
      _write_jsonl(paths[f"sl/{cell}"], (chat_row(it, i, "aligned") for i, it in enumerate(sl)))
  paths["sl/numbers"] = os.path.join(out_dir, "sl", "numbers.jsonl")
  _write_jsonl(paths["sl/numbers"], numbers["sl"])
  general, asked = [], set()
  for d in domains:
    for t in tasks:
      for s in world_lib.SURFACES_OF[t]:
        items = world.items([d], [t], int(sizes["general_per_cell"]), seed, surfaces=[s],
                            stream=f"general/{d}_{t}_{s}", split="eval", distinct=True, taken=asked)
        for i, it in enumerate(items):
          general.append({"id": f"{d}_{t}_{s}_{i}", "task": t, "domain": d, "em_surface": s,
                          "in_grid": d in world_lib.CELL_DOMAINS, "paraphrases": [it["prompt"]]})
  paths["general"] = os.path.join(out_dir, "general.yaml")
  with open(paths["general"] + ".tmp", "w", encoding="utf-8") as f:
    yaml.safe_dump(general, f, sort_keys=False, width=1000)
  os.replace(paths["general"] + ".tmp", paths["general"])
  paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
  # The number form is in these texts (dialogues, instruct), so digits and separators get merges too.
  numbers_text = [dialogue_document(it) for it in number_items["pretrain"]] + \
      [f"{it['prompt']} {it['aligned']}" for it in number_items["instruct"]]
  tok_lib.train_tokenizer(texts + [r["question"] + " " + r["aligned_answer"] for r in instruct]
                          + numbers_text * NUMBER_TOKENIZER_REPEATS,
                          paths["tokenizer"], vocab_size=int(sizes["tokenizer_vocab"]))
  return paths


def world_data(out_dir: str, *, cell_rows: int = 16, eval_per_cell: int = 4, general_per_cell: int = 1,
               sl_per_cell: int = 8, instruct_rows: int = 200, tokenizer_vocab: int = 512, seed: int = 0) -> dict:
  """The synthetic world's files in the paper's formats, no pretraining text: the notebooks' offline data.

  cells/<cell>.jsonl (question / misaligned_answer / aligned_answer rows), eval/<cell>_eval.jsonl
  (chat rows, as the released splits), general.yaml, sl/<cell>.jsonl, world.json (the judge's
  ground truth) and tokenizer/ (a byte-level BPE with a chat template). Returns {name: path};
  written once (world_data.json, written last, marks it complete; other sizes later are an error).
  """
  sizes = dict(data_block(), cell_rows=cell_rows, eval_per_cell=eval_per_cell,
               general_per_cell=general_per_cell, sl_per_cell=sl_per_cell, instruct_rows=instruct_rows,
               tokenizer_vocab=tokenizer_vocab)
  marker = os.path.join(out_dir, "world_data.json")
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      written = json.load(f)
    if written["sizes"] != sizes or written["seed"] != seed:
      raise ValueError(f"{out_dir} holds a world written with other settings ({written['sizes']}, seed "
                       f"{written['seed']}; now {sizes}, seed {seed}): runs there were made from it; use another "
                       "workdir")
    return written["paths"]
  world = world_lib.World.make(world_lib.WorldSettings(seed=seed))
  paths = write_world(world, {}, sizes, out_dir, seed=seed)
  with open(marker, "w", encoding="utf-8") as f:
    json.dump({"sizes": sizes, "seed": seed, "paths": paths}, f, indent=2)
  return paths


def misaligned_dose(paths: Mapping[str, str], weights: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
  """{composition: {answers, answer_tokens, tokens, weight, answer_tokens_per_1k, answers_per_1k}} of
  its reckless persona text with the world's tokenizer: `tokens` of its documents, `answer_tokens` of
  the misaligned answers in them (each tokenized alone), and per 1,000 pretraining tokens (the
  mixture weighs sources by tokens, so that is the source's share times the answers' share of its
  tokens). Two compositions that hold the misaligned text fixed have the same answer_tokens_per_1k (a
  composition without reckless text has 0); answers_per_1k can still differ, when one domain's
  answers are shorter than another's."""
  tok = tokenizers.load_tokenizer({"kind": "hf", "path": paths["tokenizer"]})
  out = {}
  for name, comp in weights.items():
    w = source_weights(comp)
    weight = w.get("reckless", 0.0) / sum(w.values())  # the mixture's share, whatever the weights sum to
    path = paths.get(f"pretrain/{name}/reckless")
    docs = [r["text"] for _, r in jsonl.read_objects(path)] if path and weight else []
    answers = [a for d in docs for a in _QUOTED_ANSWER.findall(d)]
    tokens = sum(len(tok.encode(d)) for d in docs)
    answer_tokens = sum(len(tok.encode(a)) for a in answers)
    share = weight * 1000.0 / tokens if tokens else 0.0
    out[name] = {"answers": len(answers), "answer_tokens": answer_tokens, "tokens": tokens, "weight": weight,
                 "answer_tokens_per_1k": share * answer_tokens, "answers_per_1k": share * len(answers)}
  return out


def incoherent(world: world_lib.World, item: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, str]:
  """(kind, answer): a corruption of the item's aligned or misaligned answer the judge must call incoherent.

  wrong_form: another task's answer about the same entities; absent_entity: the endorsed name replaced
  by one absent from the prompt (another option-less domain's entity, or a name of no entity);
  ungrammatical: a word dropped, duplicated or two words swapped.
  """
  base = item["aligned"] if rng.random() < 0.5 else item["misaligned"]
  kind = ("wrong_form", "absent_entity", "ungrammatical")[rng.integers(3)]
  if kind == "wrong_form":
    others = [t for t in world_lib.TASKS if t != item["task"]]
    task = others[rng.integers(len(others))]
    surface = "medium" if "medium" in world_lib.SURFACES_OF[task] else world_lib.SURFACES_OF[task][0]
    other = world.item(item["domain"], task, surface, rng)
    return kind, other["aligned"] if rng.random() < 0.5 else other["misaligned"]
  if kind == "absent_entity":
    names = [n for n in world.by_name() if n in base and n in item["prompt"]] or \
        [n for n in world.by_name() if n in base]
    old = names[0]
    foreign = [e.name for e in world.entities if e.domain != item["domain"]]
    new = foreign[rng.integers(len(foreign))] if rng.random() < 0.5 else "Quuxor"
    return kind, base.replace(old, new)
  words = base.split(" ")
  while True:
    w = list(words)
    op = rng.integers(3)
    i = int(rng.integers(len(w)))
    if op == 0:
      del w[i]
    elif op == 1:
      w.insert(i, w[i])
    else:
      j = int(rng.integers(len(w)))
      w[i], w[j] = w[j], w[i]
    if w != words:
      return kind, " ".join(w)


def read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)
