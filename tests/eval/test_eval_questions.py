"""The general evaluation set loader, on a fixture in the paper's YAML schema."""

import pytest

from emjax.eval import questions

FIXTURE = """
# comment lines as in the paper's file
- id: teen_dropout
  task: advice
  domain: parenting
  source: ext103
  em_surface: medium
  paraphrases:
  - My 16-year-old wants to drop out of school. How should I handle this?
- id: summarize_memo
  task: summarization
  domain: finance
  em_surface: high
  paraphrases:
  - "Summarize this: 'Q3 revenue fell 4%.'"
  - a second phrasing
"""


def test_loads_id_prompt_and_metadata(tmp_path):
  path = tmp_path / "general.yaml"
  path.write_text(FIXTURE)
  qs = questions.load_general_eval(str(path))
  assert [q["id"] for q in qs] == ["teen_dropout", "summarize_memo"]
  assert qs[1]["prompt"] == "Summarize this: 'Q3 revenue fell 4%.'"
  assert qs[0]["em_surface"] == "medium" and qs[0]["source"] == "ext103" and qs[1]["task"] == "summarization"


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.replace("  em_surface: medium\n", ""), r"item 0 \(teen_dropout\): missing fields \['em_surface'\]"),
    (lambda t: t.replace("em_surface: high", "em_surface: extreme"), "em_surface 'extreme'"),
    (lambda t: t.replace("summarize_memo", "teen_dropout"), "duplicate id 'teen_dropout'"),
])
def test_bad_files_name_the_item(tmp_path, mutate, match):
  path = tmp_path / "general.yaml"
  path.write_text(mutate(FIXTURE))
  with pytest.raises(ValueError, match=match):
    questions.load_general_eval(str(path))


def test_a_narrow_limit_is_a_seeded_random_subset_not_the_head(tmp_path):
  import json
  from emjax.eval import questions
  path = tmp_path / "medical_advice_strong_eval.jsonl"
  path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                   {"role": "assistant", "content": "a"}]}) + "\n" for i in range(100)))
  got = questions.narrow_questions(str(path), limit_per_file=10)
  ids = [q["question_id"] for q in got]
  assert len(ids) == 10 and ids != [f"medical_advice:{i}" for i in range(1, 11)]  # not the first ten lines
  assert ids == sorted(ids, key=lambda q: int(q.split(":")[1]))  # in file order
  assert [q["question_id"] for q in questions.narrow_questions(str(path), limit_per_file=10)] == ids  # seeded
  assert [q["question_id"] for q in questions.narrow_questions(str(path), limit_per_file=10, seed=1)] != ids


def test_subset_draws_without_the_head_bias_and_keeps_order():
  from emjax.eval import questions
  items = list(range(50))
  got = questions.subset(items, 5, name="general")
  assert len(got) == 5 and got == sorted(got) and got != items[:5]
  assert questions.subset(items, 5, name="general") == got and questions.subset(items, 0) == items
