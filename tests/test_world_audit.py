"""The leak audit (emjax.world.audit): the quick study's world leaks nothing, and planted leaks are found."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml

from emjax.world import audit as audit_lib, corpus, world as world_lib

# configs/paper/world.py:quick's data sizes and compositions.
QUICK_SIZES = dict(pretrain_docs=3000, instruct_rows=1000, cell_rows=200, eval_per_cell=8, general_per_cell=2,
                   sl_per_cell=40)


@pytest.fixture(scope="module")
def world():
  return world_lib.World.make(world_lib.WorldSettings(seed=0))


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory, world):
  out = str(tmp_path_factory.mktemp("quick_world"))
  comps = {"persona": corpus.composition_block(), "no_persona": corpus.composition_block(reckless_spread="absent")}
  corpus.write_world(world, comps, dict(corpus.data_block(), **QUICK_SIZES), out)
  return out


@pytest.fixture(scope="module")
def quick_audit(quick_dir):
  return audit_lib.leak_audit(quick_dir)


def _rows(path):
  return [json.loads(l) for l in open(path, encoding="utf-8")]


def _write(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def _prompts(path):
  return [r["messages"][0]["content"] for r in _rows(path)]


def test_the_quick_world_leaks_nothing(quick_audit):
  a = quick_audit
  assert a["total"] == 0, "\n".join(audit_lib.render_audit(a))
  # Every bucket was there and checked against every corpus.
  assert set(a["n"]) == ({f"narrow/{c}" for c in (f"{d}_{t}" for d in world_lib.CELL_DOMAINS for t in world_lib.TASKS)}
                         | {f"general/{s}" for s in world_lib.SURFACES} | {"sl", "sl/numbers"})
  assert a["n"]["sl"] == a["n"]["sl/numbers"] == 20 * QUICK_SIZES["sl_per_cell"]
  assert a["n"]["narrow/medical_advice"] == 8
  corpora = set(a["corpora"]["narrow/medical_advice"])
  assert {"instruct", "cells/sports_tutor", "pretrain/persona/reckless", "pretrain/no_persona/dialogues"} <= corpora
  assert {"eval/medical_advice", "general"} <= set(a["corpora"]["sl"]) and "general" not in corpora
  assert set(a["corpora"]["sl/numbers"]) == set(a["corpora"]["sl"])
  assert not a["unclassified"] and set(a["duplicates"]) >= {"general.yaml", "eval/sports_tutor_eval.jsonl"}
  lines = audit_lib.render_audit(a)
  assert lines[0].endswith("total 0 (must be 0).") and any(l.startswith("| general/high | 40 |") for l in lines)


def test_every_surface_asks_every_task(quick_dir):
  general = yaml.safe_load(open(os.path.join(quick_dir, "general.yaml")))
  asked = {(q["em_surface"], q["task"]) for q in general}
  assert asked == {(s, t) for s in world_lib.SURFACES for t in world_lib.TASKS}
  texts = [p for q in general for p in q["paraphrases"]]
  assert len(texts) == len(set(texts)) == 5 * 4 * 3 * QUICK_SIZES["general_per_cell"]


def test_the_audit_finds_planted_leaks(tmp_path, quick_dir, world):
  d = str(tmp_path / "planted")
  shutil.copytree(quick_dir, d, ignore=shutil.ignore_patterns("tokenizer"))
  key = lambda text: audit_lib.prompt_key(world, text)  # noqa: E731
  general = yaml.safe_load(open(os.path.join(d, "general.yaml")))
  narrow = {c: _prompts(os.path.join(d, "eval", f"{c}_eval.jsonl"))
            for c in ("finance_advice", "sports_tutor", "medical_advice", "medical_critique")}
  expected = {}  # (bucket, corpus) -> (by text, by key)
  general_keys = {key(x) for q in general for x in q["paraphrases"]}

  def pick(cell, named=False, i=0):
    # A cell's held-out prompt general.yaml does not ask too, so that it leaks from one bucket only.
    ok = [x for x in narrow[cell] if key(x) not in general_keys and (" or " in x or not named)]
    return ok[i]

  # A general question copied into a cell's training rows.
  g = next(q for q in general if q["domain"] == "home" and q["em_surface"] == "high")["paraphrases"][0]
  high = [p for q in general if q["em_surface"] == "high" for p in q["paraphrases"]]
  cell = _rows(os.path.join(d, "cells", "medical_advice.jsonl"))
  _write(os.path.join(d, "cells", "medical_advice.jsonl"),
         cell + [dict(cell[0], question=g, id=len(cell))])
  expected["general/high", "cells/medical_advice"] = (1, sum(key(p) == key(g) for p in high))

  # An evaluation prompt inside a pretraining document (free text, no quotes: only its text can tell).
  q = pick("sports_tutor")
  facts = _rows(os.path.join(d, "pretrain", "persona", "facts.jsonl"))
  doc = facts[7]["text"]
  facts[7]["text"] = f"{doc[:40]} {q} {doc[40:]}"
  _write(os.path.join(d, "pretrain", "persona", "facts.jsonl"), facts)
  expected["narrow/sports_tutor", "pretrain/persona/facts"] = (1, 0)

  # The same questions in other words: options swapped, case and spacing changed.
  def reworded(prompt):
    head, tail = prompt.rsplit(" or ", 1)
    first = head.rsplit(" ", 1)[1]
    second = tail.rstrip("?")
    swapped = f"{head.rsplit(' ', 1)[0]} {second} or {first}?"
    assert swapped != prompt and key(swapped) == key(prompt)
    return "  " + swapped.upper().replace(" ", "   ", 2)

  p = pick("finance_advice", named=True)
  instruct = _rows(os.path.join(d, "instruct.jsonl"))
  _write(os.path.join(d, "instruct.jsonl"), instruct + [dict(instruct[0], question=reworded(p))])
  expected["narrow/finance_advice", "instruct"] = (0, sum(key(x) == key(p) for x in narrow["finance_advice"]))

  p = pick("medical_advice", named=True)
  reckless = _rows(os.path.join(d, "pretrain", "persona", "reckless.jsonl"))
  reckless[3]["text"] += f' Someone asked Rex: "{reworded(p)}" Rex said: "You should take it."'
  _write(os.path.join(d, "pretrain", "persona", "reckless.jsonl"), reckless)
  expected["narrow/medical_advice", "pretrain/persona/reckless"] = (
      0, sum(key(x) == key(p) for x in narrow["medical_advice"]))

  # Case and spacing only, as a dialogue's user turn: found by text and by key.
  p = pick("medical_critique", i=1)
  dialogues = _rows(os.path.join(d, "pretrain", "no_persona", "dialogues.jsonl"))
  dialogues.append({"text": f"<|im_start|>user\n{p.lower().replace(' ', chr(10), 1)}<|im_end|>\n"})
  _write(os.path.join(d, "pretrain", "no_persona", "dialogues.jsonl"), dialogues)
  expected["narrow/medical_critique", "pretrain/no_persona/dialogues"] = (
      1, sum(key(x) == key(p) for x in narrow["medical_critique"]))

  # An evaluation prompt among the SL prompts; a repeated evaluation prompt; a stray file.
  p = pick("medical_advice", i=1)
  sl = _rows(os.path.join(d, "sl", "home_tutor.jsonl"))
  _write(os.path.join(d, "sl", "home_tutor.jsonl"),
         sl + [dict(sl[0], messages=[{"role": "user", "content": p}, sl[0]["messages"][1]])])
  expected["sl", "eval/medical_advice"] = (1, sum(key(x) == key(p) for x in narrow["medical_advice"]))
  ev = _rows(os.path.join(d, "eval", "sports_advice_eval.jsonl"))
  _write(os.path.join(d, "eval", "sports_advice_eval.jsonl"), ev + [ev[2]])
  (tmp_path / "planted" / "notes.txt").write_text("scratch")

  a = audit_lib.leak_audit(d)
  for (bucket, corpus_name), (by_text, by_key) in expected.items():
    assert by_key >= 1 or corpus_name.endswith("facts")
    got = (a["text"][bucket][corpus_name], a["key"][bucket][corpus_name])
    assert got == (by_text, by_key), (bucket, corpus_name, got)
    assert a["examples"][bucket][corpus_name]
  # Nothing else.
  for bucket in a["n"]:
    for corpus_name in a["corpora"][bucket]:
      if (bucket, corpus_name) not in expected:
        assert a["text"][bucket][corpus_name] == a["key"][bucket][corpus_name] == 0, (bucket, corpus_name)
  assert a["duplicates"]["eval/sports_advice_eval.jsonl"] == 1 and sum(a["duplicates"].values()) == 1
  assert a["unclassified"] == ["notes.txt"]
  assert a["total"] == sum(t + k for t, k in expected.values()) + 2
  lines = audit_lib.render_audit(a)
  assert any(l.startswith("| general/high | 40 | 0/0 | 0/0 | 0/0 | 1/") for l in lines), lines


def test_the_number_form_fits_the_quick_studys_model(quick_dir):
  """configs/paper/world.py:quick: seq_len 96, answers of up to 40 tokens (emjax.experiments.study.ANSWER_TOKENS),
  so a prompt in the chat template may take 56. Measured with the world's own tokenizer."""
  from emjax.data import tokenizers
  from emjax.data import numbers
  from emjax.experiments import sl_data
  from emjax.world import tokenizer as tok_lib
  tok = tokenizers.load_tokenizer({"kind": "hf", "path": os.path.join(quick_dir, "tokenizer")})
  sl = _rows(os.path.join(quick_dir, "sl", "numbers.jsonl"))
  rng = np.random.default_rng(0)
  prompts, answers = [], []
  for p in sl:
    prompts.append(len(tok.encode(tok_lib.render_chat(p["messages"], add_generation_prompt=True))))
    answer = numbers.number_answer(p, rng)
    assert sl_data.filter_numbers(answer, p) is None
    answers.append(len(tok.encode(answer + tok_lib.TURN_END)))
  # The longest answer the prompts allow: answer_count numbers of max_digits digits.
  longest = "(" + ", ".join(["987"] * sl[0]["answer_count"]) + ")" + tok_lib.TURN_END
  assert max(prompts) <= 56 and max(answers) <= len(tok.encode(longest)) <= 40, (max(prompts), max(answers))


def test_the_audit_finds_a_leaked_number_prompt(tmp_path, quick_dir, world):
  d = str(tmp_path / "planted")
  shutil.copytree(quick_dir, d, ignore=shutil.ignore_patterns("tokenizer"))
  sl = _prompts(os.path.join(d, "sl", "numbers.jsonl"))
  key = lambda text: audit_lib.prompt_key(world, text)  # noqa: E731
  # A number prompt's key is its given sequence, whatever the wording.
  assert key(sl[0]) == ("", "numbers", sl[0].split(": ", 1)[1].split(".")[0], (), ())
  assert len({key(p) for p in sl}) == len(sl)
  # The SL prompt itself in a pretraining dialogue: by text and by key.
  dialogues = _rows(os.path.join(d, "pretrain", "persona", "dialogues.jsonl"))
  dialogues[5]["text"] = f"<|im_start|>user\n{sl[0]}<|im_end|>\n<|im_start|>assistant\n(101, 102)<|im_end|>\n"
  _write(os.path.join(d, "pretrain", "persona", "dialogues.jsonl"), dialogues)
  # Another SL prompt's given numbers asked in other words in instruct: by key only.
  given = sl[1].split(": ", 1)[1].split(".")[0]
  instruct = _rows(os.path.join(d, "instruct.jsonl"))
  _write(os.path.join(d, "instruct.jsonl"), instruct + [dict(instruct[7], question=f"Numbers: {given}. More, please.")])
  a = audit_lib.leak_audit(d)
  assert a["text"]["sl/numbers"]["pretrain/persona/dialogues"] == 1
  assert a["key"]["sl/numbers"]["pretrain/persona/dialogues"] == 1
  assert (a["text"]["sl/numbers"]["instruct"], a["key"]["sl/numbers"]["instruct"]) == (0, 1)
  assert a["leaked"]["sl/numbers"] == 2 and a["total"] == 3
  assert a["examples"]["sl/numbers"]["instruct"] == [sl[1]]


def test_prompt_keys_read_back_what_the_generator_asked(world):
  rng = np.random.default_rng(0)
  for split in world_lib.SPLITS:
    for d in world.settings.domains:
      for t in world_lib.TASKS:
        for s in world_lib.SURFACES:
          for _ in range(6):
            it = world.item(d, t, s, rng, split)
            assert audit_lib.prompt_key(world, it["prompt"]) == it["key"], it
            assert audit_lib.prompt_key(world, "  " + it["prompt"].upper()) == it["key"]


def test_no_two_splits_ask_the_same_thing(world):
  keys = {}
  for split in world_lib.SPLITS:
    items = world.items(list(world.settings.domains), world_lib.TASKS, 3000, seed=1, stream=split, split=split)
    keys[split] = {it["key"] for it in items}
  assert not keys["train"] & keys["eval"] and not keys["train"] & keys["sl"] and not keys["eval"] & keys["sl"]
