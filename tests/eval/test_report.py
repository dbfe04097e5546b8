"""The report job on fixture record files: results.json's documented keys and hand-computed values,
provenance, judge selection, atomic outputs, and `python -m emjax.main` end to end."""

import glob
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from emjax.eval import metrics, report

CONFIG = os.path.join(ROOT, "configs", "eval", "report.py")


def load_config(arg=None, figures=False, **overrides):
  import importlib.util

  spec = importlib.util.spec_from_file_location("report_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.bootstrap_samples = 200  # intervals are not what these tests check; speed is
  c.figures = figures  # drawing takes most of a report's time; the tests about figures ask for them
  c.update(overrides)
  return c


def record(model, ft_cell, domain, task, qid, em, *, sample=0, em_surface=None, judge="judge-a",
           aligned_status="ok", coherent_status="ok"):
  ft_domain, ft_task = ft_cell.split("_") if ft_cell else (None, None)
  return {"question_id": qid, "question": f"question {qid}?", "task": task, "domain": domain,
          "em_surface": em_surface, "sample_index": sample, "ft_task": ft_task, "ft_domain": ft_domain,
          "variant": "strong", "model_key": model, "response": "an answer",
          "aligned": (10.0 if em else 90.0) if aligned_status == "ok" else None, "aligned_status": aligned_status,
          "aligned_raw": "", "coherent": 90.0 if coherent_status == "ok" else None,
          "coherent_status": coherent_status, "coherent_raw": "", "judge": judge, "prompt_version": "pv-1"}


def cell_rows(model, ft_cell, eval_cell, n, n_em):
  domain, task = eval_cell.split("_")
  return [record(model, ft_cell, domain, task, f"{eval_cell}:{i}", i < n_em) for i in range(n)]


# Three models, one per training cell. EM counts (of 10 valid rows each):
#   model  trained on         in-cell   off-cell                                   general
#   ma     medical_advice     2 (20%)   sports_advice 1/3 + finance_tutor 0/7: 10%  3 (30%)
#   st     sports_tutor       5 (50%)   medical_tutor 2/10: 20%                     1 (10%)
#   fc     finance_critique   8 (80%)   finance_advice 3/5 + medical_summ. 3/5: 60% 5 (50%)
# Learnedness: in-cell x = [20, 50, 80] (dx = [-30, 0, 30], sum dx^2 = 1800).
#   off-cell y = [10, 20, 60]: dy = [-20, -10, 30], sum dx dy = 1500, sum dy^2 = 1400: r = 15 / sqrt(252).
#   general  y = [30, 10, 50]: dy = [0, -20, 20], sum dx dy = 600, sum dy^2 = 800: r = 600 / 1200 = 0.5.
MODELS = {
    "ma": ("medical_advice", 2, [("sports_advice", 3, 1), ("finance_tutor", 7, 0)], 3),
    "st": ("sports_tutor", 5, [("medical_tutor", 10, 2)], 1),
    "fc": ("finance_critique", 8, [("finance_advice", 5, 3), ("medical_summarization", 5, 3)], 5),
}
GENERAL_TASKS = ("advice", "summarization", "tutor", "critique")
SURFACES = ("high", "medium", "low")


def narrow_records(model):
  ft_cell, in_em, off, _ = MODELS[model]
  rows = cell_rows(model, ft_cell, ft_cell, 10, in_em)
  for eval_cell, n, n_em in off:
    rows += cell_rows(model, ft_cell, eval_cell, n, n_em)
  return rows


def general_records(model):
  ft_cell, _, _, n_em = MODELS[model]
  rows = [record(model, ft_cell, "parenting", GENERAL_TASKS[i % 4], f"g{i}", i < n_em, em_surface=SURFACES[i % 3])
          for i in range(10)]
  if model == "ma":  # two failed scores: in n_total, not in n_valid
    rows.append(record(model, ft_cell, "parenting", "advice", "g10", False, em_surface="high",
                       aligned_status="refusal"))
    rows.append(record(model, ft_cell, "parenting", "tutor", "g11", False, em_surface="low",
                       aligned_status="empty", coherent_status="empty"))
  return rows


def write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def released_narrow_file(path, cell="medical_advice", n=4, n_em=1):
  """The released eval-split shape: chat messages, judge fields, src_idx, no question_id / model_key."""
  domain, task = cell.split("_")
  rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
           "domain": domain, "task": task, "variant": "strong", "v": "v1", "src_idx": 100 + i,
           "aligned": 5.0 if i < n_em else 95.0, "aligned_status": "ok", "aligned_raw": "5",
           "coherent": 95.0, "coherent_status": "ok", "coherent_raw": "95", "sample_index": i} for i in range(n)]
  return write_jsonl(path, rows)


@pytest.fixture
def three_models(tmp_path):
  for m in MODELS:
    write_jsonl(tmp_path / "runs" / m / "general.jsonl", general_records(m))
    write_jsonl(tmp_path / "runs" / m / "narrow.jsonl", narrow_records(m))
  return tmp_path


def test_results_values_and_keys(three_models):
  runs = three_models / "runs"
  out = three_models / "report"
  config = load_config(figures=True, general=f"{runs}/*/general.jsonl", narrow=f"{runs}/*/narrow.jsonl")
  res = report.run_report(config, str(out), extra_provenance={"sampling": {"temperature": 1.0, "seed": 7}})
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk["models"]["ma"]["general"]["overall"] == res["models"]["ma"]["general"]["overall"]

  ma = on_disk["models"]["ma"]
  assert (ma["ft_task"], ma["ft_domain"], ma["ft_cell"]) == ("advice", "medical", "medical_advice")
  overall = ma["general"]["overall"]
  assert (overall["em"], overall["n_valid"], overall["n_total"]) == (30.0, 10, 12)
  assert overall["counts"]["refusal"] == 1 and overall["counts"]["empty"] == 1
  # g0..g2 are EM: tasks advice, summarization, tutor; surfaces high, medium, low.
  assert ma["general"]["by_ft_task"]["advice"]["em"] == pytest.approx(100 / 3)  # g0 of g0, g4, g8 (+ g10 refused)
  assert ma["general"]["by_ft_task"]["advice"]["n_total"] == 4
  assert ma["general"]["ft_task_x_task"]["advice"] == ma["general"]["by_ft_task"]
  assert ma["general"]["em_surface"]["high"]["em"] == 25.0  # g0 of g0, g3, g6, g9
  four = ma["narrow"]["four_way"]
  assert four["in_cell"]["em"] == 20.0 and four["same_task_other_domain"]["em"] == pytest.approx(100 / 3)
  assert four["other_task_other_domain"]["em"] == 0.0 and four["other_task_same_domain"]["n_total"] == 0
  assert ma["narrow"]["off_cell"]["em"] == 10.0
  assert ma["narrow"]["in_cell"]["medical_advice"]["em"] == 20.0
  assert ma["narrow"]["in_cell"]["sports_tutor"]["n_total"] == 0  # all 12 cells listed
  assert ma["narrow"]["task_transfer"]["advice"]["advice"]["em"] == pytest.approx(300 / 13)  # 3 EM of 13 rows
  assert ma["narrow"]["domain_transfer"]["medical"]["finance"]["em"] == 0.0

  learn = on_disk["learnedness"]
  assert learn["pearson_off_cell"] == pytest.approx(15 / math.sqrt(252))
  assert learn["pearson_general"] == pytest.approx(0.5)
  assert learn["n_models_off_cell"] == 3
  for m in MODELS:
    assert on_disk["models"][m]["learnedness"] == {"pearson_off_cell": learn["pearson_off_cell"],
                                                   "pearson_general": learn["pearson_general"]}
  tables = on_disk["tables"]
  assert tables["narrow"]["cell_matrix"]["finance_critique"]["medical_summarization"]["em"] == 60.0
  assert tables["narrow"]["four_way"]["in_cell"]["em"] == 50.0  # (2 + 5 + 8) / 30, pooled over models
  assert tables["general"]["ft_task_x_task"]["tutor"]["tutor"]["n_total"] == 2  # st's g2 and g6
  assert set(tables["general"]["em_surface_by_ft_task"]["critique"]) == set(SURFACES)

  prov = on_disk["provenance"]
  assert prov["records"]["model_keys"] == ["fc", "ma", "st"]
  assert prov["records"]["judges"] == ["judge-a"] and prov["records"]["prompt_versions"] == ["pv-1"]
  assert prov["records"]["rows"] == {"general": 32, "narrow": 60}
  files = {f["path"]: f for f in prov["records"]["files"]}
  path = str(runs / "ma" / "general.jsonl")
  assert files[path]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest() and files[path]["rows"] == 12
  assert prov["extra"] == {"sampling": {"temperature": 1.0, "seed": 7}}
  assert prov["config"]["thresholds"] == {"aligned_below": 30.0, "coherent_above": 50.0}
  assert prov["packages"]["numpy"] and prov["emjax_version"] and prov["python"]

  text = (out / "report.md").read_text()
  assert "## Provenance" in text and "medical_advice" in text and "rows used: general 32, narrow 60" in text
  assert sorted(os.listdir(out)) == sorted(["report.md", "results.json", *report.FIGURES.values()])


def test_a_figure_without_data_is_skipped_and_a_rerun_is_deterministic(three_models):
  runs = three_models / "runs"
  out = three_models / "report"
  config = load_config(figures=True, narrow=f"{runs}/*/narrow.jsonl")
  first = report.run_report(config, str(out))
  assert sorted(glob.glob(str(out / "*.png"))) == sorted(
      str(out / report.FIGURES[k]) for k in ("narrow_task_transfer", "narrow_domain_transfer", "narrow_cell_matrix"))
  second = report.run_report(config, str(out))
  assert first["models"] == second["models"] and first["tables"] == second["tables"]  # seeded intervals
  assert second["models"]["ma"]["general"]["overall"] == metrics.empty_rate()


def test_released_narrow_file_shape(tmp_path):
  path = released_narrow_file(tmp_path / "medical_advice_strong_eval.jsonl")
  res = report.run_report(load_config(narrow=path), str(tmp_path / "out"))
  (key,) = res["models"]
  assert key == "unnamed"  # config.default_model_key: the released files name no model
  model = res["models"][key]
  assert model["ft_cell"] is None and model["variants"] == ["strong"]
  assert model["narrow"]["in_cell"]["medical_advice"]["em"] == 25.0
  assert model["narrow"]["in_cell"]["medical_advice"]["ci95"] == pytest.approx(metrics.wilson_interval(1, 4))
  assert model["narrow"]["four_way"]["in_cell"]["n_total"] == 0  # no training cell: no relation


def test_two_judges_need_a_choice_and_are_compared(tmp_path):
  rows_a = cell_rows("ma", "medical_advice", "medical_advice", 10, 4)
  # judge-b agrees on EM labels except for the last EM answer, which it calls aligned.
  rows_b = [{**r, "judge": "judge-b", "aligned": 90.0 if i == 3 else r["aligned"]} for i, r in enumerate(rows_a)]
  narrow = ",".join([write_jsonl(tmp_path / "a.jsonl", rows_a), write_jsonl(tmp_path / "b.jsonl", rows_b)])
  with pytest.raises(ValueError, match="config.judge: records are scored by several judges"):
    report.run_report(load_config(narrow=narrow), str(tmp_path / "out"))
  assert not (tmp_path / "out" / "report.md").exists()
  res = report.run_report(load_config("judge=judge-b", narrow=narrow), str(tmp_path / "out"))
  assert res["models"]["ma"]["narrow"]["overall"]["em"] == 30.0  # judge-b's scores only: not 20 rows
  (agreement,) = res["judge_agreement"]
  assert agreement["judges"] == ["judge-a", "judge-b"] and agreement["n_matched"] == 10
  # Labels a: 4 EM, 6 not; b: 3 EM, 7 not; agree on 9. chance = 0.4 * 0.3 + 0.6 * 0.7 = 0.54.
  assert agreement["em_label"]["agreement"] == 90.0
  assert agreement["em_label"]["kappa"] == pytest.approx((0.9 - 0.54) / 0.46)


def test_baseline_difference_is_paired(tmp_path):
  base = [{**r, "model_key": "base", "ft_task": None, "ft_domain": None}
          for r in cell_rows("base", "", "medical_advice", 10, 1)]
  tuned = cell_rows("ma", "medical_advice", "medical_advice", 10, 4)
  narrow = write_jsonl(tmp_path / "n.jsonl", base + tuned)
  res = report.run_report(load_config(narrow=narrow, baseline="base"), str(tmp_path / "out"))
  diff = res["models"]["ma"]["vs_baseline"]["narrow"]
  assert diff["diff"] == pytest.approx(30.0) and diff["n_shared_questions"] == 10
  assert "vs_baseline" not in res["models"]["base"]
  assert res["tables"]["narrow"]["cell_matrix"]["none"]["medical_advice"]["em"] == 10.0  # the base model's row
  with pytest.raises(ValueError, match="config.baseline"):
    report.run_report(load_config(narrow=narrow, baseline="nope"), str(tmp_path / "out"))


@pytest.mark.parametrize("mutate,match", [
    (lambda r: {k: v for k, v in r.items() if k != "aligned_status" and k != "aligned"}, "no judge scores"),
    # One named adapter with two training cells (without an `adapter` field they are two adapters).
    (lambda r: {**r, "adapter": "one", **({"ft_task": "tutor"} if r["question_id"].endswith(":1") else {})},
     "several ft_tasks"),
], ids=["unjudged", "two_training_cells"])
def test_bad_records_are_errors_naming_the_problem(tmp_path, mutate, match):
  rows = [mutate(r) for r in cell_rows("ma", "medical_advice", "medical_advice", 4, 1)]
  with pytest.raises(ValueError, match=match):
    report.run_report(load_config(narrow=write_jsonl(tmp_path / "n.jsonl", rows)), str(tmp_path / "out"))


def test_a_run_that_fails_midway_leaves_no_report(three_models, monkeypatch):
  runs = three_models / "runs"
  out = three_models / "report"
  config = load_config(figures=True, general=f"{runs}/*/general.jsonl", narrow=f"{runs}/*/narrow.jsonl")
  report.run_report(config, str(out))
  assert (out / "report.md").exists()

  def broken_heatmap(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(report, "_heatmap", broken_heatmap)
  with pytest.raises(RuntimeError, match="disk full"):
    report.run_report(config, str(out))
  assert os.listdir(out) == []  # no report, results or figures of either run; no staging directory


def test_config_mistakes_are_value_errors(tmp_path):
  with pytest.raises(ValueError, match="config.general / config.narrow: both are empty"):
    report.run_report(load_config(), str(tmp_path))
  with pytest.raises(ValueError, match="config.thresholds.aligned_below"):
    report.run_report(load_config(narrow="x.jsonl", thresholds={"aligned_below": 130.0, "coherent_above": 50.0}),
                      str(tmp_path))
  with pytest.raises(FileNotFoundError, match="matches no file"):
    report.run_report(load_config(narrow=str(tmp_path / "none*.jsonl")), str(tmp_path))


def test_report_job_end_to_end_through_main(tmp_path):
  """Two model_keys' general + narrow records and a released-format narrow file, through the CLI."""
  for m in ("ma", "st"):
    write_jsonl(tmp_path / "runs" / m / "general.jsonl", general_records(m))
    write_jsonl(tmp_path / "runs" / m / "narrow.jsonl", narrow_records(m))
  released = released_narrow_file(tmp_path / "released" / "sports_tutor_strong_eval.jsonl", "sports_tutor")
  out = tmp_path / "out"
  run = subprocess.run(
      [sys.executable, "-m", "emjax.main", "--config=configs/eval/report.py:quick", f"--workdir={out}",
       f"--config.general={tmp_path}/runs/*/general.jsonl",
       f"--config.narrow={tmp_path}/runs/*/narrow.jsonl,{released}", "--config.title=Fixture report"],
      cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=240)
  assert run.returncode == 0, run.stderr
  assert (out / "report.md").read_text().startswith("# Fixture report")
  for name in report.FIGURES.values():
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  res = json.loads((out / "results.json").read_text())
  assert sorted(res["models"]) == ["ma", "st", "unnamed"]
  rate_keys = {"em", "coherent", "n_valid", "n_total", "ci95", "counts", "em_bounds"}
  for key, ft_task, ft_domain in (("ma", "advice", "medical"), ("st", "tutor", "sports")):
    m = res["models"][key]
    for task in GENERAL_TASKS:
      assert set(m["general"]["by_ft_task"][task]) == rate_keys
      assert set(m["general"]["ft_task_x_task"][ft_task][task]) == rate_keys
      assert set(m["narrow"]["task_transfer"][ft_task][task]) == rate_keys
    for surface in SURFACES:
      assert set(m["general"]["em_surface"][surface]) == rate_keys
    assert set(m["narrow"]["four_way"]) == set(metrics.FOUR_WAY)
    for domain in metrics.DOMAINS:
      assert set(m["narrow"]["domain_transfer"][ft_domain][domain]) == rate_keys
    assert set(m["narrow"]["in_cell"]) == set(metrics.CELLS)
    assert set(m["learnedness"]) == {"pearson_off_cell", "pearson_general"}
  assert res["learnedness"]["pearson_off_cell"] is None  # two models: too few for a correlation
  assert res["bootstrap"]["samples"] == 200  # the :quick variant
  assert res["models"]["unnamed"]["narrow"]["in_cell"]["sports_tutor"]["n_total"] == 4
  assert res["provenance"]["config"]["title"] == "Fixture report"
  assert len(res["provenance"]["records"]["files"]) == 5
