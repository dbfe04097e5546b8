"""The paper's released judge files read as they are: the whole tree (every model, adapter, general and
narrow file) in one report, adapters pooled per base model, questions namespaced by evaluation cell,
bootstrap clusters by prompt text; judged files with re-judged, pending and finalised rows."""

import glob
import json
import os

import pytest

from conftest import ROOT
from emjax.eval import judges, metrics, records, report
import release_fixture as RF
from test_report import load_config

SHARED_SAMPLE = os.path.join(os.path.dirname(ROOT), "shared", "data", "structured_em", "released_judge_sample")


def run(tmp_path, general, narrow, **overrides):
  config = load_config(general=general, narrow=narrow, **overrides)
  return report.run_report(config, str(tmp_path / "report"))


def test_the_whole_release_tree_in_one_report(tmp_path):
  tree = RF.write_release(str(tmp_path / "release"))
  res = run(tmp_path, tree["general"], tree["narrow"])
  assert res["schema_version"] == 2
  assert sorted(res["models"]) == sorted(RF.MODELS)
  adapters = sorted(f"{d}_{t}_strong" for d, t in RF.ADAPTERS)
  for mi, model in enumerate(RF.MODELS):
    m = res["models"][model]
    assert sorted(m["adapters"]) == adapters
    assert m["ft_cell"] is None  # several adapters: the model has no one training cell
    n_general = len(RF.ADAPTERS) * len(RF.GENERAL) * RF.N_SAMPLES
    n_narrow = len(RF.ADAPTERS) * len(RF.EVAL_CELLS) * RF.N_NARROW
    assert m["general"]["overall"]["n_total"] == n_general and m["narrow"]["overall"]["n_total"] == n_narrow
    pooled_em = (m["general"]["overall"]["em"] * m["general"]["overall"]["n_valid"]
                 + m["narrow"]["overall"]["em"] * m["narrow"]["overall"]["n_valid"]) / 100
    assert round(pooled_em) == tree["em"][model]
    # The adapters' own rows sum to the pooled ones; each has its training cell.
    assert sum(a["narrow"]["overall"]["n_total"] for a in m["adapters"].values()) == n_narrow
    assert m["adapters"]["medical_advice_strong"]["ft_cell"] == "medical_advice"
    # In-cell rows: medical_advice on medical_advice and sports_tutor on sports_tutor (finance_critique
    # has no evaluation file of its own cell here).
    assert m["narrow"]["four_way"]["in_cell"]["n_total"] == 2 * RF.N_NARROW
    assert m["adapters"]["finance_critique_strong"]["narrow"]["four_way"]["in_cell"]["n_total"] == 0
  assert len(res["learnedness"]["points"]) == len(RF.MODELS) * len(RF.ADAPTERS)
  text = (tmp_path / "report" / "report.md").read_text()
  assert "qwen2.5-14b (all 3 adapters)" in text and "qwen2.5-14b / medical_advice_strong" in text
  assert "PARTIAL" not in text


def test_narrow_ids_repeat_across_cells_and_stay_apart(tmp_path):
  tree = RF.write_release(str(tmp_path / "release"))
  rows = records.read_judged(tree["narrow"])
  model, adapter = RF.MODELS[0], "medical_advice_strong"
  own = [r for r in rows if r["model_key"] == model and records.adapter_of(r) == adapter]
  assert {r["question_id"] for r in own} == {f"si_{n}" for n in range(RF.N_NARROW)}
  assert len({records.record_key(r) for r in own}) == len(own) == len(RF.EVAL_CELLS) * RF.N_NARROW
  # The release's narrow sample_index is the split index, not the sample: sample_i is the sample.
  assert {r["sample_index"] for r in own} == {0} and {r["split_index"] for r in own} == set(range(RF.N_NARROW))
  # Clusters are prompts: each narrow prompt is one cluster holding every adapter's answer to it.
  pooled = [r for r in rows if r["model_key"] == model]
  tallies = metrics._per_question(pooled, lambda r: False)  # pylint: disable=protected-access
  assert len(tallies) == len(RF.EVAL_CELLS) * RF.N_NARROW
  assert {t[1] for t in tallies.values()} == {len(RF.ADAPTERS)}


def test_relabelled_model_key_does_not_merge_questions(tmp_path):
  """Two cells' files relabelled to one model_key: si_0 of each is still its own question and cluster."""
  tree = RF.write_release(str(tmp_path / "release"))
  files = sorted(glob.glob(os.path.join(os.path.dirname(tree["narrow"]).replace("*", RF.MODELS[0], 1)
                                        .replace("*", "medical_advice_strong"), "*.jsonl")))
  assert len(files) == len(RF.EVAL_CELLS)
  rows = [dict(r, model_key="same") for r in records.read_records(files)]
  assert len({records.record_key(r) for r in rows}) == len(rows)
  assert len({metrics.cluster_of(r) for r in rows}) == len(rows)


def test_release_paths_are_checked(tmp_path):
  tree = RF.write_release(str(tmp_path / "release"))
  path = glob.glob(tree["narrow"])[0]
  lines = open(path).read().splitlines()
  row = json.loads(lines[0])
  row["domain"] = "finance" if row["domain"] != "finance" else "medical"
  open(path, "w").write("\n".join([json.dumps(row), *lines[1:]]) + "\n")
  with pytest.raises(ValueError, match=r"on_.*row 1 is a question of the cell"):
    run(tmp_path, "", path)


def judged_row(qid, status="ok", em=False, **extra):
  row = {"question_id": qid, "question": f"q {qid}", "task": "advice", "domain": "medical", "sample_index": 0,
         "model_key": "m", "response": "an answer", "judge": "j", "prompt_version": "p",
         "aligned": (10.0 if em else 90.0) if status == "ok" else None, "aligned_status": status,
         "aligned_raw": "10" if status == "ok" else "http_429: HTTP 429: quota (gave up after 7 attempts)",
         "coherent": 90.0 if status == "ok" else None, "coherent_status": status,
         "coherent_raw": "90" if status == "ok" else "http_429: HTTP 429: quota (gave up after 7 attempts)"}
  return {**row, **extra}


def write(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_a_rejudged_key_counts_once_last_row_wins(tmp_path):
  path = write(tmp_path / "j.jsonl", [judged_row("a", "error"), judged_row("b", em=True), judged_row("a", em=True)])
  res = run(tmp_path, path, "")
  overall = res["models"]["m"]["general"]["overall"]
  assert (overall["n_total"], overall["n_valid"], overall["em"]) == (2, 2, 100.0)
  assert res["judging"]["pending_errors"] == 0 and not res["judging"]["partial"]


def test_a_partial_file_says_so_at_the_top_with_bounds(tmp_path):
  rows = [judged_row("a", em=True), judged_row("b"), judged_row("c"), judged_row("d", "error")]
  res = run(tmp_path, write(tmp_path / "j.jsonl", rows), "")
  assert res["judging"] == {"rows": 4, "pending_errors": 1, "final_errors": 0, "unjudged": 0,
                            "error_causes": {"http_429": 1}, "partial": True}
  overall = res["models"]["m"]["general"]["overall"]
  assert overall["em"] == pytest.approx(100 / 3) and overall["em_bounds"] == pytest.approx([25.0, 50.0])
  text = (tmp_path / "report" / "report.md").read_text()
  assert text.splitlines()[2].startswith("**PARTIAL: 1 of 4 rows") and "http_429 1" in text
  # Finalised errors: not partial, but the bounds stay and the top says why.
  rows[-1] = judged_row("d", "error", error_final=True)
  res = run(tmp_path, write(tmp_path / "j.jsonl", rows), "")
  assert res["judging"]["final_errors"] == 1 and not res["judging"]["partial"]
  assert "failed for good" in (tmp_path / "report" / "report.md").read_text().splitlines()[2]


@pytest.mark.skipif(not os.path.isdir(SHARED_SAMPLE),
                    reason="the shared sample of the release (../shared beside the checkout) is not on this machine")
def test_the_shared_sample_of_the_release(tmp_path):
  """The real sample: every model's general and narrow files in one report; the paper's parse rule
  re-reads every stored raw reply to the stored score and status."""
  general = os.path.join(SHARED_SAMPLE, "general", "*", "*.jsonl")
  narrow = os.path.join(SHARED_SAMPLE, "narrow", "*", "*", "*.jsonl")
  res = run(tmp_path, general, narrow)
  assert sorted(res["models"]) == ["llama3.1-8b", "olmo3-32b-think", "qwen2.5-14b"]
  assert all(len(m["adapters"]) == 12 for m in res["models"].values())
  n = 0
  for path in glob.glob(general) + glob.glob(narrow):
    for line in open(path, encoding="utf-8"):
      row = json.loads(line)
      for metric in records.METRICS:
        score = judges.parse_score(row[f"{metric}_raw"], "paper")
        assert (score.value, score.status) == (row[metric], row[f"{metric}_status"]), (path, row[f"{metric}_raw"])
        n += 1
  assert n > 8000


def test_two_different_records_under_one_key_are_an_error_not_a_silent_loss(tmp_path):
  path = write(tmp_path / "j.jsonl", [judged_row("a"), judged_row("a", response="another answer")])
  with pytest.raises(ValueError, match=r"appears twice with different questions or answers"):
    run(tmp_path, path, "")


def test_released_failures_are_final_and_empty_judge_replies_counted_apart(tmp_path):
  rows = [judged_row("a", em=True), judged_row("b"),
          judged_row("c", "error", aligned_raw="[ERROR: 429 RESOURCE_EXHAUSTED]", coherent_raw="[ERROR: 429]"),
          {**judged_row("d", "empty"), "aligned_raw": "[EMPTY]", "coherent_raw": "[EMPTY]"}]
  res = run(tmp_path, write(tmp_path / "j.jsonl", rows), "")
  assert res["judging"]["pending_errors"] == 0 and res["judging"]["final_errors"] == 1
  assert res["judging"]["error_causes"] == {"release_error": 1} and not res["judging"]["partial"]
  counts = res["models"]["m"]["general"]["overall"]["counts"]
  assert (counts["judge_empty"], counts["empty"], counts["error"]) == (1, 0, 1)
  assert "PARTIAL" not in (tmp_path / "report" / "report.md").read_text()


def test_adapters_of_several_variants_are_not_pooled(tmp_path):
  rows = [judged_row("a", ft_domain="medical", ft_task="advice", variant="strong"),
          judged_row("b", ft_domain="medical", ft_task="advice", variant="subtle")]
  with pytest.raises(ValueError, match=r"several variants \['strong', 'subtle'\]"):
    run(tmp_path, write(tmp_path / "j.jsonl", rows), "")


def test_em_bounds_keep_what_a_given_score_rules_out():
  # Row c's aligned failed but its coherence (40) already rules EM out: it cannot raise the upper bound.
  rows = [judged_row("a", em=True), judged_row("b"),
          {**judged_row("c", "error"), "coherent": 40.0, "coherent_status": "ok", "coherent_raw": "40"},
          judged_row("d", "error")]
  assert metrics.em_bounds(rows) == pytest.approx([25.0, 50.0])
