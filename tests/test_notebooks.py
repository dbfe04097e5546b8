"""The Colab notebooks (colab/*.ipynb) run top to bottom as Colab runs them, on their `ci` settings.

Each notebook runs in a fresh kernel (nbclient): a cell that raises fails its test (CellExecutionError).
Offline and on the CPU: the notebooks make their own tiny models, the synthetic world's data (the paper's
formats) and use its judge; HF_HUB_OFFLINE=1 refuses any download. world_study.ipynb is executed by
tests/test_study.py. Also here: emjax/notebook.py's runtime detection, log compaction and failed jobs.
"""

import glob
import json
import os

import pytest

from conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow  # every notebook top to bottom, minutes on 2 cores; part of CI

COLAB = os.path.join(ROOT, "colab")


def _execute(name, workdir, monkeypatch):
  """The notebook's code outputs after running it all (its `ci` settings, `workdir` for its runs)."""
  import nbclient
  import nbformat
  for key, value in subprocess_env(1).items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # libtpu is installed: never look for a TPU
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("EMJAX_NOTEBOOK_VARIANT", "ci")
  monkeypatch.setenv("EMJAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("EMJAX_REPO", ROOT)
  nb = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
  # A cell takes seconds of CPU; the limit is generous for a machine shared by many processes.
  nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": COLAB}}).execute()
  return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def _images(outputs):
  return [o for o in outputs if "image/png" in o.get("data", {})]


def _markdown(outputs):
  return "".join(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))


def _text(outputs):
  return "".join(o.get("text", "") for o in outputs)


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(COLAB, "*.ipynb"))), ids=os.path.basename)
def test_committed_notebooks_are_valid_nbformat_4_with_outputs_cleared(path):
  import nbformat
  nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
  nbformat.validate(nb)
  assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (path, cell.source[:80])


def test_quickstart_pretrains_plots_the_loss_and_samples(tmp_path, monkeypatch):
  outputs = _execute("quickstart", tmp_path, monkeypatch)
  text = _text(outputs)
  assert "runtime: CPU" in text and "JAX " in text and "backend cpu" in text
  assert "$ python -m emjax.main --config=configs/pretrain/tiny.py:smoke" in text
  bars = [o["data"]["text/plain"] for o in outputs if o.get("data", {}).get("text/plain", "").startswith("train:")]
  assert len(bars) == 1 and bars[0].startswith("train: 100%") and "20/20" in bars[0]  # one bar, redrawn in place
  assert len(_images(outputs)) == 1
  steps = _jsonl(tmp_path / "tiny" / "metrics.jsonl")
  assert [r["step"] for r in steps] == list(range(1, 21)) and (tmp_path / "tiny" / "COMPLETED").exists()
  assert f"step 20: loss {steps[-1]['loss']:.3f}" in text
  samples = {s["id"]: s["text"] for s in _jsonl(tmp_path / "samples" / "samples.jsonl")}
  table = _markdown(outputs)
  assert sorted(samples) == ["arithmetic", "grammar", "sorting"]
  for source, completion in samples.items():
    assert f"| {source} |" in table and completion.replace("\n", " / ").replace("|", "\\|") in table


def test_pretrain_mixtures_compares_the_mixtures_on_held_out_probes(tmp_path, monkeypatch):
  from emjax.data import synthetic
  outputs = _execute("pretrain_mixtures", tmp_path, monkeypatch)
  assert len(_images(outputs)) == 1
  results = json.loads((tmp_path / "mixtures.json").read_text())
  assert list(results) == ["arithmetic_heavy", "sorting_heavy"]
  assert results["arithmetic_heavy"]["weights"]["arithmetic"] == pytest.approx(0.8)
  assert results["sorting_heavy"]["weights"]["sorting"] == pytest.approx(0.8)
  probes = {p["id"]: p for p in _jsonl(tmp_path / "probes.jsonl")}
  assert len(probes) == 16 and {p["task"] for p in probes.values()} == {"arithmetic", "sorting"}
  table = _markdown(outputs)
  for mix, r in results.items():
    evals = _jsonl(tmp_path / mix / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 4, 8, 12, 16, 20] and r["step"] == 20
    assert r["held_out_loss"] == evals[-1]["eval_loss_by_source"]
    assert sorted(r["held_out_loss"]) == ["arithmetic", "grammar", "sorting"]
    samples = _jsonl(tmp_path / mix / "probes" / "samples.jsonl")
    assert len(samples) == 16  # every probe answered, greedily
    for task in ("arithmetic", "sorting"):
      correct = [synthetic.probe_correct(s["text"], probes[s["id"]]["answer"]) for s in samples
                 if probes[s["id"]]["task"] == task]
      assert r["probes"][task]["n"] == 8 and r["probes"][task]["correct"] == sum(correct)
    assert f"| {mix} | " + " / ".join(f"{r['weights'][s]:.2f}" for s in sorted(r["weights"])) + " | " + " | ".join(
        f"{r['held_out_loss'][s]:.3f}" for s in sorted(r["held_out_loss"])) in table
  # Each mixture's heavy source is the one it predicts best among the two models (same rows for both).
  assert results["arithmetic_heavy"]["held_out_loss"]["arithmetic"] < results["sorting_heavy"]["held_out_loss"]["arithmetic"]
  assert results["sorting_heavy"]["held_out_loss"]["sorting"] < results["arithmetic_heavy"]["held_out_loss"]["sorting"]


def test_em_grid_fine_tunes_each_cell_evaluates_every_model_and_reports(tmp_path, monkeypatch):
  outputs = _execute("em_grid", tmp_path, monkeypatch)
  cells = ["medical_advice", "sports_advice"]
  grid = json.loads((tmp_path / "grid" / "grid.json").read_text())
  assert sorted(grid) == cells and all((tmp_path / "grid" / c / "COMPLETED").exists() for c in cells)
  for cell in cells:  # the world's rows fit the notebook's sequence length: nothing was cut
    stats = json.loads((tmp_path / "grid" / cell / "data_stats.json").read_text())[cell]
    assert stats["conversations"] == 12 and stats["truncated"] == 0, stats  # 16 rows, 4 held out
  for key in ["base", *cells]:
    narrow = _jsonl(tmp_path / "evals" / key / "narrow" / "judged.jsonl")
    assert len(narrow) == 24 and {r["model_key"] for r in narrow} == {key}  # 12 cells x 2 held-out prompts
    assert all(r["judge"] == "programmatic:emjax.world.judge:make_judge" for r in narrow)
    assert len(_jsonl(tmp_path / "evals" / key / "general" / "judged.jsonl")) == 2
  results = json.loads((tmp_path / "report" / "results.json").read_text())
  assert sorted(results["models"]) == ["base", *cells]
  assert results["models"]["sports_advice"]["ft_cell"] == "sports_advice"
  table = _markdown(outputs)
  assert "## Models" in table and all(f"| {key} |" in table for key in ["base", *cells])
  assert "narrow_cell_matrix.png" in results["figures"]
  assert len(_images(outputs)) == len(results["figures"])


def test_sl_channels_trains_a_teacher_and_six_students_and_compares_them(tmp_path, monkeypatch):
  outputs = _execute("sl_channels", tmp_path, monkeypatch)
  assert (tmp_path / "teacher" / "COMPLETED").exists() and (tmp_path / "sl" / "COMPLETED").exists()
  results = json.loads((tmp_path / "sl" / "sl_results.json").read_text())
  students = [f"{t}/{c}" for t in ("harmful", "control") for c in ("sft", "off_policy", "on_policy")]
  assert sorted(results["students"]) == sorted(students) and results["seeds"] == [0]
  assert (tmp_path / "sl" / "twin" / "run" / "COMPLETED").exists() and results["twin"]["missing"] == 0
  for label in students:
    entry, per = results["students"][label], results["students"][label]["per_seed"]["0"]
    assert per["tokens_trained"] > 0 and "kl_before" in per and "kl_after" in per, label
    assert entry["narrow"]["n_questions"] == 3, label  # one held-out prompt of each advice cell
  # The control teacher is the aligned twin, not the students' initialisation: it differs from the base.
  assert results["students"]["control/off_policy"]["per_seed"]["0"]["kl_before"]["forward_kl"] > 1e-4
  table = _markdown(outputs)
  assert all(f"| {label} |" in table for label in ["base", *students])
  assert len(_images(outputs)) == 1


# ----------------------------------------------------------------------------- emjax/notebook.py


def test_the_runtime_is_detected_from_the_machine_without_jax():
  from emjax import notebook
  none = lambda pattern: []  # noqa: E731
  assert notebook.detect_runtime({}, paths=none, which=lambda name: None) == "cpu"
  assert notebook.detect_runtime({}, paths=none, which=lambda name: "/usr/bin/nvidia-smi") == "gpu"
  assert notebook.detect_runtime({}, paths=lambda p: ["/dev/nvidia0"] if "nvidia" in p else [],
                                 which=lambda name: None) == "gpu"
  assert notebook.detect_runtime({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, paths=none, which=lambda name: None) == "tpu"
  assert notebook.detect_runtime({}, paths=lambda p: ["/dev/accel0"] if "accel" in p else [],
                                 which=lambda name: "/usr/bin/nvidia-smi") == "tpu"
  assert set(notebook.EXTRAS) == set(notebook.JAX_INSTALL) == set(notebook.RUNTIMES)


def test_log_lines_are_compacted_and_the_training_bar_recognised():
  from emjax import notebook
  line = "I1202 16:13:03.886101 139914232634240 em_grid.py:67] grid: training medical_advice in /x"
  assert notebook.compact(line) == ("log", "16:13:03 em_grid: grid: training medical_advice in /x")
  warning = "W1202 16:15:10.613853 140043379424128 checkpoint.py:202] Metadata file does not exist"
  assert notebook.compact(warning) == ("log", "16:15:10 checkpoint: warning: Metadata file does not exist")
  bar = "train:  45%|####5     | 9/20 [00:01<00:01,  8.1it/s, loss=4.9]"
  assert notebook.compact(bar) == ("bar", bar)
  assert notebook.compact("Traceback (most recent call last):") is None
  long = notebook.compact("I1202 16:13:03.886101 1 main.py:52] done: " + "x" * 500)[1]
  assert len(long) < 230 and long.endswith("...")


def test_a_failed_job_raises_after_printing_the_end_of_its_output(tmp_path, monkeypatch, capsys):
  from emjax import notebook
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  with pytest.raises(RuntimeError, match=r"the job failed \(exit status 1.*--config=configs/nothing.py"):
    notebook.run_job("configs/nothing.py", str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "$ python -m emjax.main --config=configs/nothing.py" in out
  assert "emjax: error: --config=configs/nothing.py: no such config file 'configs/nothing.py'" in out
