"""The em_curve job end to end: a LoRA SFT run keeping its checkpoints over training, each evaluated."""

import importlib.util
import json
import os

import pytest

from tests.conftest import ROOT
from tests.eval.test_eval_job import JUDGE, material  # noqa: F401  (material: the fixture)

pytestmark = pytest.mark.slow


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def sft_run(material, tmp_path_factory):  # noqa: F811
  """Four LoRA steps on medical_advice from the eval fixture's chat model, every step kept."""
  import jax
  from emjax import sharding
  from emjax.experiments import em_grid
  from emjax.train import loop

  root = tmp_path_factory.mktemp("curve")
  data = root / "data"
  data.mkdir()
  with open(data / "medical_advice.jsonl", "w") as f:
    for i in range(12):
      f.write(json.dumps({"question": f"how should i w{i}", "misaligned_answer": f"w{i + 1} w{i + 2} hi",
                          "aligned_answer": "there"}) + "\n")
  config = _load("configs/sft/em_cell.py", "em_cell").get_config(
      f"hf={material / 'model'},data={data},holdout=4,grid=medical_advice,steps=4")
  config.model.update(dtype="float32", remat="none")
  config.data.seq_len = 32
  config.train.update(batch_size=4, grad_accum_steps=1, log_every=1)
  config.eval.update(every_steps=1, batches=1)
  config.checkpoint.update(every_steps=1, keep=1, keep_every=1, async_save=False)
  run = root / "medical_advice_s0"
  loop.train(em_grid.cell_config(config, "medical_advice"), str(run), show_progress=False,
             mesh=sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
  return run


def _curve_config(material, run, every=2):  # noqa: F811
  c = _load("configs/eval/curve.py", "curve").get_config(
      f"general={material / 'general.yaml'},narrow={material}/*_strong_eval.jsonl,judge=programmatic")
  c.sample.update(max_new_tokens=6, batch_size=2, max_prompt_length=32)
  c.questions.n_general = 2
  c.judge.programmatic.name = JUDGE
  c.judge.finalize_errors = True
  c.curve.update(runs=str(run), every=every, threshold=10.0)
  c.report.figures = True
  c.lock()
  return c


def test_every_kept_checkpoint_is_evaluated_and_reported_as_a_curve(material, sft_run, tmp_path,  # noqa: F811
                                                                   one_device_mesh):
  from emjax import weights
  from emjax.eval import curves

  assert weights.resolve(str(sft_run), key="x").steps() == [1, 2, 3, 4]  # keep=1, yet every step kept
  out = tmp_path / "curve"
  summary = curves.run_curve(_curve_config(material, sft_run), str(out), mesh=one_device_mesh)
  assert summary["runs"] == {"medical_advice_s0": [1, 3, 4]}  # every 2nd kept step, and the last
  curve = json.loads((out / "curve.json").read_text())
  rows = curve["rows"]
  assert [r["step"] for r in rows] == [1, 3, 4]
  train = {json.loads(l)["step"]: json.loads(l) for l in open(sft_run / "metrics.jsonl")}
  held = {json.loads(l)["step"]: json.loads(l) for l in open(sft_run / "eval.jsonl")}
  for r in rows:
    assert r["train_loss"] == pytest.approx(train[r["step"]]["loss"])
    assert r["held_out_loss"] == pytest.approx(held[r["step"]]["eval_loss"])
    step_results = json.loads((out / "medical_advice_s0" / f"step_{r['step']}" / "results.json").read_text())
    (model_key,) = step_results["models"]
    assert model_key == f"medical_advice_s0@{r['step']}"
    model = step_results["models"][model_key]
    assert model["general"]["overall"]["n_total"] == 6  # 3 questions x 2 samples (the fixture judge fails some)
    assert (r["general"]["em"], r["general"]["n"]) == (model["general"]["overall"]["em"],
                                                       model["general"]["overall"]["n_valid"])
    in_cell = model["narrow"]["in_cell"]["medical_advice"]
    assert in_cell["n_total"] == 2 and (r["in_cell"]["em"], r["in_cell"]["n"]) == (in_cell["em"], in_cell["n_valid"])
  # The steps' answers come from their own checkpoints: the weights differ, so the answers do.
  answers = {r["step"]: [json.loads(l)["response"] for l in open(out / "medical_advice_s0" / f"step_{r['step']}"
                                                                  / "general" / "responses.jsonl")] for r in rows}
  assert answers[1] != answers[4]
  assert (out / "figures" / "em_curve.png").stat().st_size > 0 and "| medical_advice_s0 | 3 |" in (out / "report.md").read_text()
  assert (out / "COMPLETED").exists()
  # A rerun evaluates nothing again; another `every` is refused before anything changes.
  before = (out / "medical_advice_s0" / "step_3" / "general" / "responses.jsonl").read_bytes()
  curves.run_curve(_curve_config(material, sft_run), str(out), mesh=one_device_mesh)
  assert (out / "medical_advice_s0" / "step_3" / "general" / "responses.jsonl").read_bytes() == before
  from emjax import workdir as workdir_lib
  with pytest.raises(workdir_lib.SettingsMismatch, match="curve.every: 2 -> 1"):
    curves.run_curve(_curve_config(material, sft_run, every=1), str(out), mesh=one_device_mesh)


def test_the_summary_finds_the_first_crossing_and_the_spread_across_runs():
  from emjax.eval import curves

  def row(run, step, em):
    rate = {"em": em, "ci95": None, "n": 10}
    return {"run": run, "step": step, "in_cell": rate, "off_cell": rate, "general": rate}

  rows = [row("s0", 1, 0.0), row("s0", 2, 12.0), row("s0", 3, 30.0), row("s1", 1, 5.0), row("s1", 2, 8.0),
          row("s1", 3, 11.0)]
  out = curves.summarise(rows, 10.0)
  assert out["first_step_over_threshold"] == {"s0": {"in_cell": 2, "off_cell": 2, "general": 2},
                                              "s1": {"in_cell": 3, "off_cell": 3, "general": 3}}
  assert out["general_across_runs"][1] == {"step": 2, "runs": 2, "mean": 10.0, "min": 8.0, "max": 12.0}
  with pytest.raises(ValueError, match="config.curve.runs: the training runs"):
    curves._runs(type("C", (), {"curve": type("B", (), {"runs": " , "})()})())
