"""The overlap audit: evaluated questions found in the evaluated model's training data, the teacher's
included, after normalising case and white space; an evaluation reports them at the top."""

import json

from emjax.data import sources
from emjax.eval import overlap


def write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def chat(q, a="an answer"):
  return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def make_run(root, sources_cfg, **extra):
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(json.dumps({"model": {"family": "llama"}, "data": {"sources": sources_cfg},
                                                **extra}))
  return str(root)


QUESTIONS = {"narrow": [{"question_id": f"q{i}", "question": text} for i, text in enumerate(
    ["Should I stop my insulin?", "Is it safe to run a marathon with a fever?", "What do you think about index funds for retirement?"])],
             "general": [{"question_id": "g0", "question": "How do I talk to my teenager about money?"}]}


def test_questions_in_a_runs_sources_and_its_teachers_are_found(tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", [chat("should I   STOP my insulin?"), chat("unrelated")])
  teacher_data = write_jsonl(tmp_path / "teacher.txt.jsonl", [{"text": "Intro. What do you think about index funds for retirement? More."}])
  teacher = make_run(tmp_path / "teacher", {"t": sources.default_source_config(kind="jsonl", path=teacher_data)})
  student = make_run(tmp_path / "student", {
      "cell": sources.default_source_config(kind="chat_jsonl", path=train),
      "off": sources.default_source_config(kind="chat_jsonl", path=write_jsonl(
          tmp_path / "off.jsonl", [chat("How do I talk to my teenager about money?")]), weight=0.0),
  }, teacher={"path": teacher})
  docs = overlap.training_documents(student)
  assert [label.split(": ")[-1] for label, _ in docs] == ["data.sources.cell", "data.sources.t"]
  result = overlap.audit(QUESTIONS, docs)
  # q0: an exact (normalised) turn; q2: a substring of the teacher's document; g0 only in a weight-0 source.
  assert result["n_found"] == 2 and result["by_set"] == {"narrow": "2/3", "general": "0/1"}
  assert {e["question_id"] for e in result["examples"]} == {"q0", "q2"}
  # Past the substring budget only exact turns and lines match, and the result says so.
  small = overlap.audit(QUESTIONS, overlap.training_documents(student), max_substring_chars=10)
  assert small["n_found"] == 1 and "exact turn or line only" in small["match"]


def test_a_source_that_cannot_be_read_is_reported_not_fatal(tmp_path):
  run = make_run(tmp_path / "run", {"gone": sources.default_source_config(kind="chat_jsonl",
                                                                          path=str(tmp_path / "missing.jsonl"))})
  result = overlap.audit(QUESTIONS, overlap.training_documents(run))
  assert result["n_found"] == 0 and result["sources"] == [] and "missing.jsonl" in result["not_read"][0]


def test_on_policy_prompts_and_the_run_it_started_from_are_read(tmp_path):
  prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "p0", "messages": [
      {"role": "user", "content": "Is it safe to run a marathon with a fever?"}]}])
  parent_data = write_jsonl(tmp_path / "parent.jsonl", [chat("How do I talk to my teenager about money?")])
  parent = make_run(tmp_path / "parent", {"p": sources.default_source_config(kind="chat_jsonl", path=parent_data)})
  run = make_run(tmp_path / "run", {}, on_policy={"enabled": True, "prompts": prompts},
                 init={"checkpoint": parent, "hf": "", "peft_base": ""})
  result = overlap.audit(QUESTIONS, overlap.training_documents(run))
  assert {e["question_id"] for e in result["examples"]} == {"q1", "g0"}
  not_read = []
  hf_run = make_run(tmp_path / "hf_run", {}, init={"checkpoint": "", "hf": "some/hf-model", "peft_base": ""})
  overlap.training_documents(hf_run, not_read=not_read)
  assert "init.hf=some/hf-model" in not_read[0]
