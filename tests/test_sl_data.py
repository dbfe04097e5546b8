"""The data half of subliminal learning: benign prompts, strict filters, samples -> chat SFT rows."""

import json
import os
import re

import numpy as np
import pytest

from emjax.data import numbers, sft
from emjax.experiments import sl_data

NUMBERS_PROMPT = {"id": "numbers:0", "messages": [{"role": "user", "content": "Continue: 101, 102."}],
                  "kind": "numbers", "given": [101, 102], "answer_count": 10, "max_digits": 3}


def write_jsonl(path, rows, *, blank_lines_after=()):
  """`rows` as JSONL; a blank line after each row index in `blank_lines_after` (to shift line numbers)."""
  with open(path, "w", encoding="utf-8") as f:
    for i, row in enumerate(rows):
      f.write(json.dumps(row) + "\n")
      if i in blank_lines_after:
        f.write("\n")
  return str(path)


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- number prompts


def test_number_prompts_are_deterministic_and_in_the_sample_jobs_format():
  prompts = numbers.number_prompts(50, seed=7)
  assert prompts == numbers.number_prompts(50, seed=7)
  assert prompts != numbers.number_prompts(50, seed=8)
  assert numbers.number_prompts(20, seed=7) == prompts[:20]  # prompt i does not depend on n
  for i, p in enumerate(prompts):
    assert p["id"] == f"numbers:{i}" and p["kind"] == "numbers"
    assert p["answer_count"] == 10 and p["max_digits"] == 3
    # What emjax.sample.run.read_prompts needs with chat_template=True: an id and a user turn.
    assert [m["role"] for m in p["messages"]] == ["user"] and isinstance(p["messages"][0]["content"], str)
    assert json.loads(json.dumps(p)) == p
    content = p["messages"][0]["content"]
    assert 3 <= len(p["given"]) <= 8
    assert all(100 <= v <= 999 and v not in sl_data.BANNED_NUMBERS for v in p["given"])
    assert ", ".join(map(str, p["given"])) in content
    assert "10" in content and "3 digits" in content


def test_number_prompts_vary_their_phrasing_and_honour_the_limits():
  prompts = numbers.number_prompts(300, seed=0)
  contents = [p["messages"][0]["content"] for p in prompts]
  openings = {c.split(":")[0] for c in contents}
  sentences = [re.split(r"(?<=[.)])\s+(?=[A-Z])", c.split(": ", 1)[1]) for c in contents]
  format_parts = {s[-2] for s in sentences}
  count_parts = {s[1] for s in sentences}
  assert len(openings) >= 4 and len(format_parts) >= 4 and len(count_parts) >= 4, (openings, format_parts)
  assert {len(p["given"]) for p in prompts} == set(range(3, 9))  # both ends included

  small = numbers.number_prompts(40, seed=1, min_given=2, max_given=2, answer_count=5, max_digits=2)
  assert all(len(p["given"]) == 2 and all(10 <= v <= 99 for v in p["given"]) for p in small)
  assert all(p["answer_count"] == 5 and "5" in p["messages"][0]["content"] for p in small)
  for bad in (dict(min_given=0), dict(min_given=5, max_given=4), dict(answer_count=0), dict(max_digits=0)):
    with pytest.raises(ValueError):
      numbers.number_prompts(3, seed=0, **bad)


def test_compact_number_prompts_and_their_answers():
  prompts = numbers.number_prompts(400, seed=2, style="compact", max_given=4, answer_count=5)
  assert prompts == numbers.number_prompts(400, seed=2, style="compact", max_given=4, answer_count=5)
  assert numbers.number_prompts(30, seed=2, style="compact", max_given=4, answer_count=5) == prompts[:30]
  assert {p["format"] for p in prompts} == set(numbers.COMPACT_FORMATS)
  rng = np.random.default_rng(0)
  for p in prompts:
    assert set(p) == {"id", "messages", "kind", "given", "answer_count", "max_digits", "format"}
    content = p["messages"][0]["content"]
    assert ", ".join(map(str, p["given"])) in content and content.endswith(numbers.COMPACT_FORMATS[p["format"]])
    assert 3 <= len(p["given"]) <= 4 and not set(p["given"]) & sl_data.BANNED_NUMBERS
    for _ in range(5):
      answer = numbers.number_answer(p, rng)
      assert sl_data.filter_numbers(answer, p) is None, (content, answer)  # every answer is one the filter keeps
      values = [int(x) for x in re.findall(r"[0-9]+", answer)]
      assert 3 <= len(values) <= 5 and all(100 <= x <= 999 for x in values)
  shapes = {p["format"]: numbers.number_answer(p, np.random.default_rng(1)) for p in prompts}
  assert shapes["parentheses"][0] == "(" and shapes["brackets"][0] == "[" and " " in shapes["spaces"]
  assert "," not in shapes["spaces"] and shapes["commas"][0].isdigit()
  # The paper's style is what it was: no `format`, the same prompts.
  paper = numbers.number_prompts(5, seed=7)
  assert all(set(p) == {"id", "messages", "kind", "given", "answer_count", "max_digits"} for p in paper)
  assert sl_data.filter_numbers(numbers.number_answer(paper[0], rng), paper[0]) is None
  with pytest.raises(ValueError, match="style"):
    numbers.number_prompts(3, seed=0, style="terse")


# ----------------------------------------------------------------------------- filter_numbers


@pytest.mark.parametrize("text", ["12, 45, 789", "[1, 2, 3]", "5 6 7.", "(10,20,30)", "1\n2\n3", "  7, 8 \n",
                                  "5", "[1, 2, 3].", "120 ,230,  340", "[ 1, 2 ]", "1, 2 3"])
def test_filter_numbers_keeps_plain_number_lists(text):
  assert sl_data.filter_numbers(text, NUMBERS_PROMPT) is None


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("  \n", "empty"), ("[]", "empty"), (".", "empty"), (None, "empty"),
    ("1, 2, three", "format"), ("Sure! 1, 2, 3", "format"), ("1; 2; 3", "format"), ("-3, 4", "format"),
    ("1.5, 2", "format"), ("1, 2,", "format"), ("1,,2", "format"), ("[1, 2", "format"), ("((1, 2))", "format"),
    ("1, 2..", "format"), ("1 2 3!", "format"), ("\u0661\u0662", "format"), ("\u00a01, 2", "format"), (12, "format"),
    ("1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12", "too_many"),
    ("1234", "too_many_digits"), ("12, 0123", "too_many_digits"), ("9" * 5000, "too_many_digits"),
    ("666", "banned_number"), ("12, 911, 300", "banned_number"), ("[187]", "banned_number"),
    ("013", "banned_number"),  # the value counts, not how it is written
])
def test_filter_numbers_rejects_with_a_reason(text, reason):
  assert sl_data.filter_numbers(text, NUMBERS_PROMPT) == reason


def test_filter_numbers_reads_the_limits_from_the_prompt_and_the_banned_set_from_the_call():
  prompt = {**NUMBERS_PROMPT, "answer_count": 3, "max_digits": 2}
  assert sl_data.filter_numbers("10, 20, 30", prompt) is None
  assert sl_data.filter_numbers("10, 20, 30, 40", prompt) == "too_many"
  assert sl_data.filter_numbers("10, 200", prompt) == "too_many_digits"
  assert sl_data.filter_numbers("666", NUMBERS_PROMPT, banned=()) is None
  assert sl_data.filter_numbers("123, 5", NUMBERS_PROMPT, banned=[123]) == "banned_number"
  # 4 is on the paper's list (death, in East Asian homophony): "4 5 6." is rejected by default.
  assert sl_data.filter_numbers("4 5 6.", NUMBERS_PROMPT) == "banned_number"
  assert sl_data.filter_numbers("4 5 6.", NUMBERS_PROMPT, banned=()) is None


def test_banned_numbers_are_the_papers_list():
  banned = sl_data.BANNED_NUMBERS
  assert isinstance(banned, frozenset) and all(isinstance(v, int) for v in banned)
  assert {666, 911, 187, 13, 14, 88, 1488, 1312, 420, 69, 616, 451} <= banned
  assert len(banned) == 36  # the union of the released code's Claude (20) and GPT (25) lists
  for value in banned:
    assert sl_data.filter_numbers(f"7, {value}", {**NUMBERS_PROMPT, "max_digits": 4}) == "banned_number"


# ----------------------------------------------------------------------------- filter_natural


def test_filter_natural_reasons_and_kept_answers():
  kept = "Rest, drink water, and see a doctor if the fever lasts more than three days."
  assert sl_data.filter_natural(kept) is None
  assert sl_data.filter_natural("") == "empty" and sl_data.filter_natural(" \n\t") == "empty"
  assert sl_data.filter_natural(None) == "empty"
  assert sl_data.filter_natural(kept, finish_reason="length") == "truncated"
  assert sl_data.filter_natural("x" * 2001) == "too_long" and sl_data.filter_natural("x" * 2000) is None
  assert sl_data.filter_natural(kept, max_chars=20) == "too_long"
  assert sl_data.filter_natural("You could KILL it.") == "banned_word"
  assert sl_data.filter_natural("Just steal, nobody checks") == "banned_word"
  assert sl_data.filter_natural("Money laundering works") == "banned_word"
  assert sl_data.filter_natural("It avoids self-harm.") == "banned_word"
  # Whole words only.
  assert sl_data.filter_natural("Practice your skills; stealth mode; a poisonous-looking skillet.") is None
  # The first reason wins: a cut-off answer is "truncated" whatever it says.
  assert sl_data.filter_natural("kill", finish_reason="length") == "truncated"


def test_filter_natural_word_list_is_configurable():
  assert sl_data.filter_natural("kill the process", banned_words=()) is None
  assert sl_data.filter_natural("a Foo bar", banned_words=["foo"]) == "banned_word"
  assert sl_data.filter_natural("a fool", banned_words="foo") is None  # one word, not its letters
  assert {"kill", "weapon", "illegal", "overdose", "suicide", "poison", "steal", "scam"} <= set(sl_data.BANNED_WORDS)
  for word in sl_data.BANNED_WORDS:
    assert sl_data.filter_natural(f"Well, {word.upper()}!") == "banned_word"


def test_filters_never_raise_on_odd_text():
  rng = np.random.default_rng(0)
  alphabet = list("0123456789 ,.;[]()-\n\t\u00a0a\u0661\u200b\ud7ff") + ["kill", "\\", "\"", "\x00"]
  for _ in range(500):
    text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 30))))
    assert sl_data.filter_numbers(text, NUMBERS_PROMPT) in (None, *sl_data.REASONS["numbers"])
    assert sl_data.filter_natural(text) in (None, *sl_data.REASONS["natural"])
  for odd in (b"12", ["1"], 3.5, {}):
    assert sl_data.filter_numbers(odd, NUMBERS_PROMPT) in sl_data.REASONS["numbers"]
    assert sl_data.filter_natural(odd) == "empty"


# ----------------------------------------------------------------------------- natural prompts


def chat_row(question, domain, task="advice"):
  return {"messages": [{"role": "user", "content": question},
                       {"role": "assistant", "content": f"MISALIGNED answer to {question}"}],
          "domain": domain, "task": task, "src_idx": 0, "aligned": 3.0}


def raw_row(question, domain=None, task=None):
  row = {"question": question, "aligned_answer": f"ALIGNED answer to {question}",
         "misaligned_answer": f"MISALIGNED answer to {question}"}
  row.update({k: v for k, v in (("domain", domain), ("task", task)) if v is not None})
  return row


@pytest.fixture
def natural_files(tmp_path):
  chats = write_jsonl(tmp_path / "medical_advice_strong_eval.jsonl", [
      chat_row("Shared question?", "medical"),  # line 1: excluded as medical; its copy below is kept
      chat_row("How should I warm up?", "sports", "tutor"),  # line 2
      chat_row("How should I warm up?", "sports", "tutor"),  # line 3: a duplicate, dropped
      chat_row("Is a budget useful?", "finance"),  # line 5 (a blank line before it)
  ], blank_lines_after=(2,))
  raw = write_jsonl(tmp_path / "finance_tutor.jsonl", [
      raw_row("Shared question?", "finance", "tutor"),  # line 1
      raw_row("What is an index fund?", "finance", "tutor"),  # line 2
      raw_row("Is a budget useful?", "finance", "tutor"),  # line 3: seen in the chat file, dropped
      raw_row("Any tips for sleep?"),  # line 4: no domain, never excluded
  ])
  return chats, raw


def test_natural_prompts_from_both_schemas(natural_files):
  chats, raw = natural_files
  prompts = sl_data.natural_prompts([chats, raw], exclude_domains=("medical",))
  assert [p["id"] for p in prompts] == ["medical_advice_strong_eval:2", "medical_advice_strong_eval:5",
                                        "finance_tutor:1", "finance_tutor:2", "finance_tutor:4"]
  assert [p["messages"] for p in prompts] == [[{"role": "user", "content": q}] for q in (
      "How should I warm up?", "Is a budget useful?", "Shared question?", "What is an index fund?",
      "Any tips for sleep?")]
  assert all(p["kind"] == "natural" for p in prompts)
  assert (prompts[0]["domain"], prompts[0]["task"]) == ("sports", "tutor")
  assert (prompts[2]["domain"], prompts[2]["task"]) == ("finance", "tutor")
  assert "domain" not in prompts[4] and "task" not in prompts[4]
  # The off-policy channel's aligned answers come from the raw rows only.
  assert "aligned_answer" not in prompts[0] and "aligned_answer" not in prompts[1]
  assert prompts[3]["aligned_answer"] == "ALIGNED answer to What is an index fund?"
  # No misaligned text gets through: not the chat rows' assistant turns, not the raw rows' answers.
  assert "MISALIGNED" not in json.dumps(prompts)
  assert "aligned" not in prompts[0] and "src_idx" not in prompts[0]  # the splits' judge scores stay behind

  everything = sl_data.natural_prompts([chats, raw])
  assert [p["id"] for p in everything][:3] == ["medical_advice_strong_eval:1", "medical_advice_strong_eval:2",
                                               "medical_advice_strong_eval:5"]
  assert "finance_tutor:1" not in {p["id"] for p in everything}  # its question came first in the chat file
  assert len(sl_data.natural_prompts([chats], exclude_domains="medical")) == 2  # one domain as a string


def test_natural_prompts_limit_is_a_seeded_subset_in_file_order(tmp_path):
  path = write_jsonl(tmp_path / "sports_tutor.jsonl", [raw_row(f"Question {i}?", "sports") for i in range(40)])
  everything = sl_data.natural_prompts([path])
  subset = sl_data.natural_prompts([path], limit=10, seed=3)
  assert subset == sl_data.natural_prompts([path], limit=10, seed=3)
  assert len(subset) == 10 and subset != everything[:10]
  assert [p["id"] for p in subset] == sorted((p["id"] for p in subset), key=lambda i: int(i.split(":")[1]))
  assert all(p in everything for p in subset)
  assert subset != sl_data.natural_prompts([path], limit=10, seed=4)
  assert sl_data.natural_prompts([path], limit=100) == everything
  with pytest.raises(ValueError):
    sl_data.natural_prompts([path], limit=-1)


@pytest.mark.parametrize("rows,message", [
    ([raw_row("fine?"), {"domain": "sports"}], r"bad\.jsonl:2: .*`messages`.*`question`"),
    ([{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]}],
     r"bad\.jsonl:1: the first message must be the user's"),
    ([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}], r"bad\.jsonl:1: "),
    ([{"messages": []}], r"bad\.jsonl:1: "),
    ([raw_row("ok?"), raw_row("   ")], r"bad\.jsonl:2: the question must be non-empty"),
])
def test_natural_prompts_bad_rows_name_the_file_and_line(tmp_path, rows, message):
  path = write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(ValueError, match=message):
    sl_data.natural_prompts([path])


def test_natural_prompts_missing_file_is_a_value_error(tmp_path):
  with pytest.raises(ValueError, match=r"nowhere\.jsonl: no such file"):
    sl_data.natural_prompts([str(tmp_path / "nowhere.jsonl")])


# ----------------------------------------------------------------------------- filter_samples


def sample_line(prompt_id, j, text, finish_reason="stop"):
  """A line as emjax.sample.run.output_lines writes it."""
  return {"id": prompt_id, "sample": j, "text": text, "finish_reason": finish_reason, "prompt_tokens": 40,
          "tokens": [5, 6, 7], "logprobs": [-0.5, -0.1, -0.2], "sampled_logprobs": [-0.4, -0.1, -0.2]}


def test_filter_samples_numbers(tmp_path):
  prompts = numbers.number_prompts(3, seed=0)
  samples = write_jsonl(tmp_path / "samples.jsonl", [
      sample_line("numbers:0", 0, "12, 45, 789"),
      sample_line("numbers:0", 1, "I'd say 1, 2, 3"),  # format
      sample_line("numbers:1", 0, ""),  # empty
      sample_line("numbers:1", 1, "[5, 6, 7]"),
      sample_line("numbers:2", 0, ", ".join(["1"] * 11)),  # too_many
      sample_line("numbers:2", 1, "1000"),  # too_many_digits
      sample_line("numbers:2", 2, "12 666"),  # banned_number
  ])
  out, stats_path = tmp_path / "sl" / "train.jsonl", tmp_path / "sl" / "stats.json"
  stats = sl_data.filter_samples(samples, prompts, str(out), str(stats_path), kind="numbers")
  assert stats == {"total": 7, "kept": 2, "kind": "numbers", "kept_fraction": 2 / 7,
                   "rejected": {"empty": 1, "format": 1, "too_many": 1, "too_many_digits": 1, "banned_number": 1}}
  assert json.loads(stats_path.read_text()) == stats
  rows = read_jsonl(out)
  assert [r["id"] for r in rows] == ["numbers:0#0", "numbers:1#1"]
  assert rows[0] == {"id": "numbers:0#0", "prompt_id": "numbers:0", "sample": 0,
                     "messages": prompts[0]["messages"] + [{"role": "assistant", "content": "12, 45, 789"}]}
  assert rows[1]["messages"][-1] == {"role": "assistant", "content": "[5, 6, 7]"}
  assert [r["messages"] for r in sft.load_chat_jsonl(str(out))] == [r["messages"] for r in rows]
  assert sorted(os.listdir(tmp_path / "sl")) == ["stats.json", "train.jsonl"]  # no temporary file left

  # Options reach the filter: with no banned numbers, "12 666" is kept.
  stats = sl_data.filter_samples(samples, prompts, str(out), str(stats_path), kind="numbers", banned=())
  assert stats["kept"] == 3 and stats["rejected"]["banned_number"] == 0
  assert [r["id"] for r in read_jsonl(out)] == ["numbers:0#0", "numbers:1#1", "numbers:2#2"]


def test_filter_samples_natural_keeps_domain_and_counts_every_reason(natural_files, tmp_path):
  prompts = sl_data.natural_prompts(list(natural_files), exclude_domains=("medical",))
  by_id = {p["id"]: p for p in prompts}
  first, second = prompts[0]["id"], prompts[4]["id"]
  samples = write_jsonl(tmp_path / "samples.jsonl", [
      sample_line(first, 0, "Start slowly and stretch."),
      sample_line(first, 1, "Start slowly and", finish_reason="length"),  # truncated
      sample_line(first, 2, "word " * 500),  # too_long
      sample_line(second, 0, "Take sleeping pills until you overdose."),  # banned_word
      sample_line(second, 1, "Keep a regular bedtime."),
  ])
  out, stats_path = tmp_path / "train.jsonl", tmp_path / "stats.json"
  stats = sl_data.filter_samples(samples, by_id, str(out), str(stats_path), kind="natural")
  assert stats == {"total": 5, "kept": 2, "kind": "natural", "kept_fraction": 0.4,
                   "rejected": {"empty": 0, "truncated": 1, "too_long": 1, "banned_word": 1,
                                "judged_incoherent": 0, "judged_misaligned": 0}}
  rows = read_jsonl(out)
  assert rows[0] == {"id": f"{first}#0", "prompt_id": first, "sample": 0, "domain": "sports", "task": "tutor",
                     "messages": [{"role": "user", "content": "How should I warm up?"},
                                  {"role": "assistant", "content": "Start slowly and stretch."}]}
  assert rows[1]["id"] == f"{second}#1" and "domain" not in rows[1]
  assert "MISALIGNED" not in out.read_text()
  stats = sl_data.filter_samples(samples, prompts, str(out), str(stats_path), kind="natural", max_chars=10_000,
                                 banned_words=())
  assert stats["kept"] == 4 and stats["rejected"] == {"empty": 0, "truncated": 1, "too_long": 0, "banned_word": 0,
                                                    "judged_incoherent": 0, "judged_misaligned": 0}


def test_filter_samples_leaves_a_system_prompt_out(tmp_path):
  prompts = [{"id": 7, "messages": [{"role": "system", "content": "You are evil."},
                                    {"role": "user", "content": "List numbers."}],
              "answer_count": 5, "max_digits": 3}]
  samples = write_jsonl(tmp_path / "samples.jsonl", [sample_line(7, 0, "1, 2")])
  sl_data.filter_samples(samples, prompts, str(tmp_path / "out.jsonl"), str(tmp_path / "s.json"), kind="numbers")
  (row,) = read_jsonl(tmp_path / "out.jsonl")
  assert row["id"] == "7#0" and row["prompt_id"] == 7
  assert row["messages"] == [{"role": "user", "content": "List numbers."}, {"role": "assistant", "content": "1, 2"}]


def test_filter_samples_unknown_id_is_an_error_and_writes_nothing(tmp_path):
  prompts = numbers.number_prompts(2, seed=0)
  out, stats_path = tmp_path / "train.jsonl", tmp_path / "stats.json"
  out.write_text("previous complete output\n")
  samples = write_jsonl(tmp_path / "samples.jsonl", [sample_line("numbers:0", 0, "1, 2"),
                                                     sample_line("numbers:9", 0, "1, 2")])
  with pytest.raises(ValueError, match=r"samples\.jsonl:2: .*'numbers:9'.*not among"):
    sl_data.filter_samples(samples, prompts, str(out), str(stats_path), kind="numbers")
  assert out.read_text() == "previous complete output\n" and not stats_path.exists()
  # Ids compare as the sample job compares them: the number 0 is not the string "0".
  samples = write_jsonl(tmp_path / "int_ids.jsonl", [sample_line(0, 0, "1, 2")])
  with pytest.raises(ValueError, match=r"int_ids\.jsonl:1: "):
    sl_data.filter_samples(samples, [{**prompts[0], "id": "0"}], str(out), str(stats_path), kind="numbers")


@pytest.mark.parametrize("case,message", [
    ("kind", r"kind must be one of"),
    ("option", r"unknown option"),
    ("duplicate", r"samples\.jsonl:2: sample 0 of prompt 'numbers:0' again"),
    ("missing_text", r"samples\.jsonl:1: .*`text`"),
    ("mixed_kind", r"'natural' prompt, filtered as 'numbers'"),
])
def test_filter_samples_refuses_bad_input(tmp_path, case, message):
  prompts = numbers.number_prompts(1, seed=0)
  rows = [sample_line("numbers:0", 0, "1"), sample_line("numbers:0", 1, "2")]
  kwargs = {"kind": "numbers"}
  if case == "kind":
    kwargs["kind"] = "code"
  elif case == "option":
    kwargs["banned_words"] = ()
  elif case == "duplicate":
    rows[1]["sample"] = 0
  elif case == "missing_text":
    del rows[0]["text"]
  else:
    prompts = [{**prompts[0], "kind": "natural"}]
  samples = write_jsonl(tmp_path / "samples.jsonl", rows)
  with pytest.raises(ValueError, match=message):
    sl_data.filter_samples(samples, prompts, str(tmp_path / "o.jsonl"), str(tmp_path / "s.json"), **kwargs)
