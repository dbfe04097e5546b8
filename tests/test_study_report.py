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
  res = {"aggregate": {c: {"general_em": study_report.mean_interval(v), "off_cell_em": study_report.mean_interval(v)}
                       for c, v in (("persona", [10.0, 12.0, 14.0]), ("no_persona", [1.0, 2.0, 3.0]))}}
  diff = study_report.contrast(config, res)
  assert diff["a"] == "persona" and diff["general_em"]["mean"] == pytest.approx(10.0)
  assert study_report.verdict(diff["general_em"]) == "reproduces"
