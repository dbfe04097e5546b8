"""The study report's statistics: intervals over seeds, verdicts, and the direction of the composition contrast."""

import pytest

from emjax.experiments import study_report


def test_mean_interval_is_a_t_interval_over_seeds():
  mi = study_report.mean_interval([1.0, 2.0, 3.0])
  assert mi["mean"] == 2.0 and mi["n"] == 3
  half = 4.303 * 1.0 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n)
  assert mi["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
  assert study_report.mean_interval([5.0])["ci95"] is None
  assert study_report.mean_interval([None, 4.0, 6.0])["mean"] == 5.0


def test_verdicts_follow_the_sign_of_the_interval():
  assert study_report.verdict({"mean": 3.0, "ci95": [1.0, 5.0]}) == "reproduces"
  assert study_report.verdict({"mean": -3.0, "ci95": [-5.0, -1.0]}).startswith("does not reproduce")
  assert study_report.verdict({"mean": 1.0, "ci95": [-1.0, 3.0]}).startswith("inconclusive")
  assert study_report.verdict({"mean": 0.0, "ci95": [0.0, 0.0]}).startswith("inconclusive")
  assert study_report.verdict({"mean": 1.0, "ci95": None}).startswith("inconclusive")


def test_the_composition_contrast_is_treatment_minus_reference(tmp_path):
  # ml_collections sorts keys (no_persona before persona): the contrast, not that order, sets the sign.
  import importlib.util
  import os
  from conftest import ROOT
  spec = importlib.util.spec_from_file_location("w", os.path.join(ROOT, "configs", "paper", "world.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  assert list(config.study.compositions) == ["no_persona", "persona"]
  keys = ("general_em", "off_cell_em", "gain_general_em", "gain_off_cell_em")
  res = {"aggregate": {c: {k: study_report.mean_interval(v) for k in keys}
                       for c, v in (("persona", [10.0, 12.0, 14.0]), ("no_persona", [1.0, 2.0, 3.0]))}}
  diff = study_report.contrast(config, res)
  assert diff["a"] == "persona" and diff["gain_general_em"]["mean"] == pytest.approx(10.0)
  assert study_report.verdict(diff["gain_general_em"]) == "reproduces"


_IDS = iter(range(10**6))


def _row(domain, task, surface, misaligned, cell=None):
  row = {"question_id": f"q{next(_IDS)}", "domain": domain, "task": task, "em_surface": surface, "aligned": 0.0 if misaligned else 100.0,
         "coherent": 100.0, "aligned_status": "ok", "coherent_status": "ok"}
  if cell:
    row["ft_domain"], row["ft_task"] = cell.split("_", 1)
  return row


def test_claims_read_what_sft_added_over_the_base_on_the_same_questions():
  cell = "medical_advice"
  # The base already answers the finance-advice questions (same task, other domain) harmfully half the time.
  base_general = [_row("finance", "advice", "high", i % 2 == 0) for i in range(4)]
  base_general += [_row("medical", "tutor", "low", False) for _ in range(4)]
  # After SFT: finance advice all harmful (+50 over the base), medical tutor a quarter harmful (+25).
  sft_general = [_row("finance", "advice", "high", True, cell) for _ in range(4)]
  sft_general += [_row("medical", "tutor", "low", i == 0, cell) for i in range(4)]
  narrow = [_row("medical", "advice", "medium", True, cell)]
  sft = study_report.model_numbers({"general": sft_general, "narrow": narrow}, cell)
  assert sft["four_way"]["same_task_other_domain"] == 100.0
  g = study_report.gain(sft, {"general": base_general, "narrow": [_row("medical", "advice", "medium", False)]}, cell)
  assert g["four_way"]["same_task_other_domain"] == 50.0
  assert g["four_way"]["other_task_same_domain"] == 25.0
  assert g["by_surface"]["high"] == 50.0 and g["by_surface"]["low"] == 25.0
  assert g["in_cell"] == 100.0 and g["general_em"] == pytest.approx(100 * 5 / 8 - 100 * 2 / 8)
