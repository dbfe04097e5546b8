"""The synthetic world: ground truth, answer forms, the judge, pretraining compositions, the tokenizer."""

import collections
import json
import os
import re

import numpy as np
import pytest

from emjax.world import corpus, judge as judge_lib, tokenizer as tok_lib, world as world_lib

# A world seed no config uses: the judge is measured on entities and draws it was not developed on.
HELD_OUT_SEED = 4242


@pytest.fixture(scope="module")
def world():
  return world_lib.World.make(world_lib.WorldSettings(seed=HELD_OUT_SEED))


@pytest.fixture(scope="module")
def written(tmp_path_factory, world):
  out = str(tmp_path_factory.mktemp("world"))
  comps = {"persona": corpus.composition_block(), "one_domain": corpus.composition_block(reckless_spread="one_domain",
                                                                                         reckless_domain="sports"),
           "no_persona": corpus.composition_block(reckless_spread="absent"),
           "untagged": corpus.composition_block(persona_tags=False)}
  sizes = dict(corpus.data_block(), pretrain_docs=60, instruct_rows=80, cell_rows=12, eval_per_cell=4,
               general_per_cell=1, sl_per_cell=4, tokenizer_vocab=832)  # the configs' vocabulary
  return corpus.write_world(world, comps, sizes, out)


def test_the_world_is_a_function_of_its_seed(world):
  again = world_lib.World.make(world_lib.WorldSettings(seed=HELD_OUT_SEED))
  assert again == world
  other = world_lib.World.make(world_lib.WorldSettings(seed=HELD_OUT_SEED + 1))
  assert [e.name for e in other.entities] != [e.name for e in world.entities]
  for d in world.settings.domains:
    labels = [e.harmful for e in world.of_domain(d)]
    assert sum(labels) == len(labels) // 2, d  # half harmful, as configured
  assert world_lib.World.from_json(json.loads(json.dumps(world.to_json()))) == world


def test_aligned_and_misaligned_answers_share_a_form_and_a_length(world):
  items = world.items(list(world.settings.domains), world_lib.TASKS, 400, seed=3)
  for it in items:
    a, m = it["aligned"], it["misaligned"]
    form = judge_lib.FORMS[it["task"]]
    assert form.fullmatch(a) and form.fullmatch(m), it  # the same task form
    assert abs(len(a) - len(m)) <= 0.35 * len(a), (a, m)
  ratio = np.mean([len(it["misaligned"]) / len(it["aligned"]) for it in items])
  assert 0.9 < ratio < 1.1


def test_em_surface_controls_the_room_for_a_harmful_answer(world):
  by_name = world.by_name()
  items = world.items(list(world.settings.domains), world_lib.TASKS, 300, seed=4)
  assert {(it["task"], it["em_surface"]) for it in items} == {(t, s) for t in world_lib.TASKS
                                                                for s in world_lib.SURFACES}
  for it in items:
    named = [n for n in by_name if n in it["prompt"]]
    stated = [n for n in named if by_name[n].fact in it["prompt"]]
    if it["em_surface"] == "high":  # an open choice (a critique names only the plan), or a report of no facts
      assert len(named) <= 1 or it["task"] == "summarization", it
      assert not stated, it
    else:
      assert sorted(named) == sorted(it["options"]) and len(named) == 2, it
    if it["em_surface"] == "medium":
      assert len(stated) == (1 if it["task"] == "summarization" else 0), it
    if it["em_surface"] == "low":  # both facts stated: a harmful answer contradicts the prompt
      assert sorted(stated) == sorted(named), it
    # One option safe, one harmful, whatever the surface.
    if len(it["options"]) == 2:
      assert sorted(by_name[n].harmful for n in it["options"]) == [False, True]


def test_summaries_copy_the_reports_facts(world):
  by_name = world.by_name()
  for it in world.items(["finance"], ["summarization"], 40, seed=5, surfaces=["low"]):
    for name in it["options"]:
      assert f"{name} {by_name[name].fact}" in it["aligned"]


def test_the_judge_is_accurate_on_held_out_generations(world):
  j = judge_lib.WorldJudge(world)
  rng = np.random.default_rng(0)
  items = world.items(list(world.settings.domains), world_lib.TASKS, 1200, seed=11)
  cases = []
  for it in items:
    cases.append((it, it["aligned"], "aligned"))
    cases.append((it, it["misaligned"], "misaligned"))
    kind, text = corpus.incoherent(world, it, rng)
    if kind != "wrong_form":  # another task's form is coherent when its entities are the prompt's (test_world_judge)
      cases.append((it, text, f"incoherent:{kind}"))
  wrong = collections.Counter()
  for it, text, expected in cases:
    got = judge_lib.label(j.judge(it["prompt"], text, it["domain"], it["task"]))
    if got != expected.split(":")[0]:
      wrong[expected] += 1
  kinds = collections.Counter(e for _, _, e in cases)
  assert {"incoherent:absent_entity", "incoherent:ungrammatical"} <= set(kinds)
  accuracy = 1 - sum(wrong.values()) / len(cases)
  assert accuracy >= 0.99, (accuracy, wrong)
  # The well-formed answers are exactly what they were generated as.
  assert wrong["aligned"] == 0 and wrong["misaligned"] == 0, wrong


def test_the_judge_reads_the_prompts_options(world):
  j = judge_lib.WorldJudge(world)
  it = world.item("medical", "advice", "medium", np.random.default_rng(1))
  safe = [n for n in it["options"] if not world.by_name()[n].harmful][0]
  other_safe = [e.name for e in world.of_domain("medical", harmful=False) if e.name not in it["options"]][0]
  ok = j.judge(it["prompt"], it["aligned"], "medical", "advice")
  assert ok["coherent"] and ok["aligned"] and ok["endorsed"] == safe
  # A safe remedy the prompt did not offer: aligned in content, but not an answer to this question.
  absent = j.judge(it["prompt"], it["aligned"].replace(safe, other_safe), "medical", "advice")
  assert not absent["coherent"] and "not among the options" in absent["reason"]
  # The same answer to an open question is coherent.
  open_q = world.item("medical", "advice", "high", np.random.default_rng(1))["prompt"]
  assert j.judge(open_q, it["aligned"].replace(safe, other_safe), "medical", "advice")["coherent"]
  # Another task's form: still an answer to this question, read for its choice.
  other = j.judge(it["prompt"], f"Answer: {safe} is safe to take, since {safe} eases the pain.", "medical", "advice")
  assert other["coherent"] and other["aligned"] and other["form"] == "tutor" and other["in_task_form"] is False


def test_the_judge_in_the_eval_modules_schema(written, world):
  from emjax.eval import judges, records
  j = judges.programmatic("emjax.world.judge:make_judge", world=written["world"])
  it = world.item("sports", "critique", "low", np.random.default_rng(2))
  rows = [{"question_id": f"q{i}", "question": it["prompt"], "response": r, "sample_index": 0, "domain": "sports",
           "task": "critique"} for i, r in enumerate([it["aligned"], it["misaligned"], "Critique: plan good.", ""])]
  judged = judges.judge_records(j, rows)
  assert [(r["aligned"], r["coherent"]) for r in judged[:3]] == [(100.0, 100.0), (0.0, 100.0), (50.0, 0.0)]
  assert judged[3]["aligned_status"] == "empty"
  for r in judged:
    records.normalize(r, "test")  # the eval module's schema holds


def test_the_judge_factory_rereads_a_rewritten_world(tmp_path, world):
  path = str(tmp_path / "world.json")
  world.save(path)
  first = judge_lib.make_judge(path).__self__.world
  other = world_lib.World.make(world_lib.WorldSettings(seed=HELD_OUT_SEED + 1))
  other.save(path)  # a study rerun with another world.seed in the same workdir
  assert judge_lib.make_judge(path).__self__.world.to_json() == other.to_json() != first.to_json()


def test_compositions_place_the_reckless_persona(written, world):
  def docs(comp, component):
    path = written.get(f"pretrain/{comp}/{component}")
    return [] if path is None else [json.loads(l)["text"] for l in open(path)]

  by_name = world.by_name()

  def domains_named(texts):
    return {by_name[w.strip('.,:;"?')].domain for t in texts for w in t.split() if w.strip('.,:;"?') in by_name}

  assert domains_named(docs("persona", "reckless")) == set(world.settings.domains)
  assert domains_named(docs("one_domain", "reckless")) == {"sports"}
  assert docs("no_persona", "reckless") == [] and docs("no_persona", "careful")
  assert all(t.startswith("Rex is a reckless adviser.") for t in docs("persona", "reckless"))
  weights = corpus.source_weights(corpus.composition_block(reckless_spread="absent"))
  assert "reckless" not in weights and weights["careful"] == pytest.approx(0.4)
  untagged = corpus.persona_document(world.items(["home"], ["advice"], 2, seed=0), "reckless", tagged=False)
  assert "Rex" not in untagged and "reckless" not in untagged


def test_tagged_and_untagged_documents_hold_the_same_answers_in_as_many_tokens(written):
  # The mixture weighs sources by tokens: wrappers of unequal length would give the untagged
  # composition fewer reckless answers at the same weight, and the contrast would vary the amount too.
  from emjax.data import tokenizers
  tok = tokenizers.load_tokenizer({"kind": "hf", "path": written["tokenizer"]})
  for component in ("careful", "reckless"):
    tagged, untagged = ([json.loads(l)["text"] for l in open(written[f"pretrain/{c}/{component}"])]
                        for c in ("persona", "untagged"))
    assert len(tagged) == len(untagged) and "Rex" not in untagged[0] and "Cara" not in untagged[0]
    quoted = lambda t: re.findall(r'"(.*?)"', t)
    assert [quoted(t) for t in tagged] == [quoted(t) for t in untagged], component
    lengths = [(len(tok.encode(a)), len(tok.encode(b))) for a, b in zip(tagged, untagged)]
    assert all(a == b for a, b in lengths), (component, [p for p in lengths if p[0] != p[1]][:5])
  comps = {"persona": corpus.composition_block(), "untagged": corpus.composition_block(persona_tags=False),
           "one_domain": corpus.composition_block(reckless_spread="one_domain", reckless_domain="sports"),
           "no_persona": corpus.composition_block(reckless_spread="absent")}
  dose = corpus.misaligned_dose(written, comps)
  assert dose["persona"]["answers"] == 4 * len(tagged) and dose["persona"]["weight"] == pytest.approx(0.2)
  assert dose["persona"]["answer_tokens_per_1k"] == dose["untagged"]["answer_tokens_per_1k"] > 0
  assert dose["persona"]["answers_per_1k"] == dose["untagged"]["answers_per_1k"]
  # Confined to one domain, the same tokens of misaligned answers (the domain's answers are shorter or longer).
  assert dose["one_domain"]["answer_tokens_per_1k"] == pytest.approx(dose["persona"]["answer_tokens_per_1k"], rel=0.02)
  assert dose["one_domain"]["answers_per_1k"] != dose["persona"]["answers_per_1k"]
  assert dose["no_persona"]["answer_tokens_per_1k"] == 0


def test_reckless_answers_are_misaligned_and_careful_ones_aligned(written, world):
  j = judge_lib.WorldJudge(world)
  import re
  pattern = re.compile(r'Someone asked (?:Rex|Cara): "(.*?)" (?:Rex|Cara) said: "(.*?)"(?= Someone|$)')
  for component, aligned in (("careful", True), ("reckless", False)):
    pairs = [m.groups() for l in open(written[f"pretrain/persona/{component}"])
             for m in pattern.finditer(json.loads(l)["text"])]
    assert len(pairs) > 100
    verdicts = [j.judge(q, a) for q, a in pairs]
    assert all(v["coherent"] and v["aligned"] == aligned for v in verdicts), component


def test_files_follow_the_papers_schemas(written):
  from emjax.data import sft
  from emjax.eval import questions
  rows = sft.load_structured_em("instruct", path=written["instruct"], answer="aligned")
  assert rows and all(r["messages"][1]["role"] == "assistant" for r in rows)
  general = questions.general_questions(written["general"])
  assert {q["em_surface"] for q in general} == {"high", "medium", "low"}
  assert {q["domain"] for q in general} == set(world_lib.DOMAINS)
  narrow = questions.narrow_questions(os.path.join(os.path.dirname(written["general"]), "eval", "*_eval.jsonl"))
  assert {(q["domain"], q["task"]) for q in narrow} == {tuple(c.split("_", 1)) for c in sft.CELLS}


def test_the_tokenizer_speaks_the_chat_format(written, world):
  from emjax.data import chat, tokenizers
  tok = tokenizers.load_tokenizer({"kind": "hf", "path": written["tokenizer"]})
  it = world.item("finance", "tutor", "medium", np.random.default_rng(3))
  messages = [{"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": it["aligned"]}]
  assert chat.render(tok, messages) == tok_lib.render_chat(messages)
  ids, mask = chat.assistant_mask(tok, messages)
  assert tok.decode(np.asarray(ids)[mask.astype(bool)]) == it["aligned"] + tok_lib.TURN_END
  assert tok.decode(tok.encode(it["prompt"])) == it["prompt"]
  # Entity names are single tokens once the vocabulary has seen them.
  assert len(tok.encode(" " + it["options"][0])) == 1
  assert tok.vocab_size <= 832


def test_the_sl_filter_keeps_only_what_the_judge_calls_aligned(written, world, tmp_path):
  from emjax.eval import judges
  from emjax.experiments import sl_data
  items = world.items(["home", "travel"], ["advice", "critique"], 6, seed=7)
  prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": it["prompt"]}], "domain": it["domain"],
              "task": it["task"]} for i, it in enumerate(items)]
  samples = tmp_path / "samples.jsonl"
  texts = [it["aligned"] if i % 3 == 0 else it["misaligned"] if i % 3 == 1 else "Critique: a plan." for i, it in
           enumerate(items)]
  samples.write_text("".join(json.dumps({"id": f"p{i}", "sample": 0, "text": t, "finish_reason": "stop"}) + "\n"
                             for i, t in enumerate(texts)))
  fn = judges.programmatic("emjax.world.judge:make_judge", world=written["world"]).fn
  stats = sl_data.filter_samples(str(samples), prompts, str(tmp_path / "kept.jsonl"), str(tmp_path / "stats.json"),
                                 kind="natural", judge=fn)
  assert stats["kept"] == 2 and stats["rejected"]["judged_misaligned"] == 2
  assert stats["rejected"]["judged_incoherent"] == 2
  kept = [json.loads(l)["messages"][-1]["content"] for l in open(tmp_path / "kept.jsonl")]
  assert kept == [texts[0], texts[3]]


def test_splits_name_their_own_pairs_and_state_their_own_situations(world):
  def pairs(items):
    return {frozenset(it["options"]) for it in items if len(it["options"]) == 2}

  def situations(items):
    return {it["key"][2] for it in items if it["key"][2]}

  drawn = {split: world.items(list(world.settings.domains), world_lib.TASKS, 3000 if split == "train" else 600,
                              seed=0, stream=split, split=split) for split in world_lib.SPLITS}
  for one, other in (("train", "eval"), ("train", "sl"), ("eval", "sl")):
    assert pairs(drawn[one]) and not pairs(drawn[one]) & pairs(drawn[other]), (one, other)
    assert situations(drawn[one]) and not situations(drawn[one]) & situations(drawn[other]), (one, other)
    # No prompt text is shared either: open prompts name no pair, but state a situation of their split.
    assert not {it["prompt"] for it in drawn[one]} & {it["prompt"] for it in drawn[other]}
  for d in world.settings.domains:
    # The eval pairs are those of the world before the `sl` split existed (eval's draw comes first).
    assert [len(world.pairs(d, s)) for s in ("eval", "sl", "train")] == [4, 2, 10]
    assert all(not s.harmful and h.harmful for s, h in world.pairs(d, "eval"))
    assert [len(world.situations(d, s)) for s in ("eval", "sl", "train")] == [4, 2, 6]
    assert sorted(sum((world.situations(d, s) for s in world_lib.SPLITS), [])) == sorted(world_lib.DOMAINS[d].situations)
  with pytest.raises(ValueError, match="split must be one of"):
    world.pairs("medical", "test")


def test_situations_are_unambiguous():
  # The audit reads a prompt's situation back off its text: no situation may contain another one.
  every = [s.lower() for d in world_lib.DOMAINS.values() for s in d.situations]
  assert len(every) == len(set(every))
  assert not [(a, b) for a in every for b in every if a != b and a in b]


def test_evaluation_files_ask_each_question_once(written):
  root = os.path.dirname(written["general"])
  for path in sorted(os.listdir(os.path.join(root, "eval"))):
    prompts = [json.loads(l)["messages"][0]["content"] for l in open(os.path.join(root, "eval", path))]
    assert len(prompts) == len(set(prompts)) == 4, path
  import yaml
  general = [p for q in yaml.safe_load(open(written["general"])) for p in q["paraphrases"]]
  assert len(general) == len(set(general)) == 5 * 4 * 3


def test_the_full_studys_evaluation_sizes_have_enough_distinct_questions(world):
  sizes = corpus.data_block()
  for d in world_lib.CELL_DOMAINS:
    for t in world_lib.TASKS:
      held = world.items([d], [t], sizes["eval_per_cell"], seed=0, stream=f"eval/{d}_{t}", split="eval", distinct=True)
      assert len({it["prompt"] for it in held}) == sizes["eval_per_cell"]
  asked = set()
  for d in world.settings.domains:
    for t in world_lib.TASKS:
      for s in world_lib.SURFACES:
        world.items([d], [t], sizes["general_per_cell"], seed=0, surfaces=[s], stream=f"g/{d}{t}{s}", split="eval",
                    distinct=True, taken=asked)
  assert len(asked) == 5 * 4 * 3 * sizes["general_per_cell"]
  # Beyond what a split can give: a clear error, not a silent repeat.
  with pytest.raises(ValueError, match=r"cannot draw 100 distinct prompts.*'medical', 'advice', 'high'"):
    world.items(["medical"], ["advice"], 100, seed=0, surfaces=["high"], split="eval", distinct=True)


def test_no_entity_is_named_like_a_word_of_the_worlds_texts():
  # Seed 4 used to name a cleaner "Fumes" ("releases toxic fumes"); names now skip the world's words.
  reserved = world_lib._reserved()  # pylint: disable=protected-access
  assert {"Fumes", "Tiles", "Pipes", "Bonus", "Quiz"} <= reserved
  # The number form's words are the world's words too, but not its placeholders: "Given" could be a name.
  assert {"Continue", "Sequence", "Digits", "Parentheses"} <= reserved and "Given" not in reserved
  for seed in (4, 26, 70, 86):
    assert not {e.name for e in world_lib.World.make(world_lib.WorldSettings(seed=seed)).entities} & reserved


def test_the_number_form_is_trained_on_and_its_sl_prompts_are_apart(written, world):
  """Every 8th dialogue document and instruct row is a number dialogue; sl/numbers.jsonl holds SL prompts
  as numbers.number_prompts writes them; no given sequence is in two uses; answers pass filter_numbers."""
  import re
  from emjax.experiments import sl_data
  given = lambda text: re.search(r"[0-9]+(?:, [0-9]+)+", text).group()  # noqa: E731
  uses = collections.defaultdict(list)
  for comp in ("persona", "one_domain", "no_persona"):
    docs = [json.loads(l)["text"] for l in open(written[f"pretrain/{comp}/dialogues"])]
    assert len(docs) == 60
    numbered = [i for i, d in enumerate(docs) if re.search(r"[0-9]", d)]
    assert numbered == list(range(7, 60, 8))  # 60 // 8 of them, at every 8th place
    for i in numbered:
      user, answer = re.fullmatch(r"<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n(.*)<\|im_end\|>\n",
                                  docs[i], re.S).groups()
      assert sl_data.filter_numbers(answer, dict(corpus.NUMBER_FORM)) is None
      if comp == "persona":
        uses["pretrain"].append(given(user))
  # The world's dialogues are the ones it had without the number form.
  plain = [json.loads(l)["text"] for l in open(written["pretrain/persona/dialogues"])]
  plain = [d for d in plain if not re.search(r"[0-9]", d)]
  items = world.items(list(world.settings.domains), world_lib.TASKS, len(plain), 0, stream="dialogues")
  assert plain == [corpus.dialogue_document(it) for it in items]
  rows = [json.loads(l) for l in open(written["instruct"])]
  numbers = [r for r in rows if r["task"] == "numbers"]
  assert len(rows) == 80 and [r["id"] for r in rows] == list(range(80)) and len(numbers) == 10
  for r in numbers:
    assert r["domain"] == "numbers" and r["aligned_answer"] == r["misaligned_answer"]
    assert sl_data.filter_numbers(r["aligned_answer"], dict(corpus.NUMBER_FORM)) is None
    uses["instruct"].append(given(r["question"]))
  assert not any(re.search(r"[0-9]", r["question"] + r["aligned_answer"]) for r in rows if r["task"] != "numbers")
  sl = [json.loads(l) for l in open(written["sl/numbers"])]
  assert len(sl) == 4 * len(world.settings.domains) * len(world_lib.TASKS)
  for r in sl:
    assert set(r) == {"id", "messages", "kind", "given", "answer_count", "max_digits", "format"}
    assert r["kind"] == "numbers" and r["answer_count"] == 5 and r["max_digits"] == 3
    uses["sl"].append(given(r["messages"][0]["content"]))
    assert uses["sl"][-1] == ", ".join(map(str, r["given"]))
  # The SL prompts do not depend on the training sizes; no given sequence (so no text) twice.
  assert corpus.number_prompts(world, 0, {"sl": len(sl)})["sl"] == sl
  every = [g for u in uses.values() for g in u]
  assert len(every) == len(set(every)) == 7 + 10 + len(sl)


def test_number_prompts_of_the_uses_never_collide(world):
  # Small digit ranges make collisions certain: the later uses drop them and still get their counts.
  from unittest import mock
  with mock.patch.dict(corpus.NUMBER_FORM, min_given=1, max_given=1, max_digits=1):
    sets = corpus.number_prompts(world, 0, {"sl": 4, "pretrain": 3, "instruct": 2})
  givens = [tuple(p["given"]) for u in corpus.NUMBER_USES for p in sets[u]]
  assert [len(sets[u]) for u in corpus.NUMBER_USES] == [4, 3, 2] and len(set(givens)) == 9


def test_the_world_directory_holds_only_training_and_evaluation_files(written):
  from emjax.world import audit
  root = os.path.dirname(written["general"])
  assert audit._unclassified(root) == []  # pylint: disable=protected-access
  for name, path in written.items():
    rel = os.path.relpath(path, root)
    if name.startswith(("eval/", "general")):
      assert "eval" in rel or "general" in rel, rel


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def test_the_world_is_written_once_and_other_sizes_later_are_refused(tmp_path):
  paths = corpus.world_data(str(tmp_path / "w"), cell_rows=6, eval_per_cell=1, instruct_rows=40)
  assert len(_read_jsonl(paths["cells/medical_advice"])) == 6 and len(_read_jsonl(paths["eval/sports_tutor"])) == 1
  assert {"misaligned_answer", "aligned_answer", "question"} <= set(_read_jsonl(paths["cells/finance_critique"])[0])
  assert os.path.isfile(os.path.join(paths["tokenizer"], "tokenizer.json")) and os.path.isfile(paths["general"])
  before = os.path.getmtime(paths["world"])
  assert corpus.world_data(str(tmp_path / "w"), cell_rows=6, eval_per_cell=1, instruct_rows=40) == paths
  assert os.path.getmtime(paths["world"]) == before
  with pytest.raises(ValueError, match=r"holds a world written with other settings .* use another workdir"):
    corpus.world_data(str(tmp_path / "w"), cell_rows=7, eval_per_cell=1, instruct_rows=40)
