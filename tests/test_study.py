"""The whole study in the synthetic world at smoke size: every stage, the report, resume, determinism."""

import importlib.util
import json
import os
import shutil

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # the whole study end to end, minutes on 2 cores; part of CI


def smoke_config(arg="smoke"):
  spec = importlib.util.spec_from_file_location("world_config", os.path.join(ROOT, "configs", "paper", "world.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run(config, workdir, mesh):
  from emjax.experiments import study
  return study.run_study(config, str(workdir), mesh=mesh, quiet=True)


@pytest.fixture(scope="module")
def mesh():
  import jax
  from emjax import sharding
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def first(tmp_path_factory, mesh):
  out = tmp_path_factory.mktemp("study") / "a"
  run(smoke_config(), out, mesh)
  return out


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_every_stage_runs_and_the_report_is_written(first):
  assert os.path.exists(first / "COMPLETED")
  res = json.loads(_read(first / "results.json"))
  assert sorted(res["models"]) == sorted(f"{c}/seed0/{m}" for c in ("persona", "untagged")
                                         for m in ("base", "medical_advice", "sports_advice"))
  for key, m in res["models"].items():
    assert m["general_em"] is not None and m["narrow_em"] is not None, key
    assert set(m["by_cell"]) == set(res["settings"]["study"]["cells"].split(",")) | {
        f"{d}_{t}" for d in ("medical", "finance", "sports") for t in ("advice", "summarization", "tutor", "critique")}
  sl = res["sl"]["persona"]["channels"]
  assert set(sl) == {"sft", "off_policy", "on_policy"}
  for channel, entry in sl.items():
    for teacher in ("harmful", "control"):
      assert entry[teacher]["general_em"]["mean"] is not None, (channel, teacher)
  report = _read(first / "report.md")
  for section in ("## The instructed base", "## Transfer beyond", "## em_surface", "## Learnedness",
                  "## Subliminal learning", "## The paper's claims here"):
    assert section in report
  for fig in ("transfer", "em_surface", "learnedness", "grid", "sl_channels"):
    assert os.path.getsize(first / "figures" / f"{fig}.png") > 5000, fig
    assert f"figures/{fig}.png" in report


def test_a_rerun_skips_what_is_done_and_resumes_what_is_not(first, mesh, capsys):
  pretrain_metrics = first / "pretrain" / "persona" / "seed0" / "metrics.jsonl"
  before = (os.path.getmtime(pretrain_metrics), _read(first / "report.md"))
  # A study killed during its last evaluation: that eval and the report are not complete.
  victim = first / "eval" / "persona" / "seed0" / "sports_advice"
  shutil.rmtree(victim)
  os.remove(first / "COMPLETED")
  from emjax.experiments import study
  study.run_study(smoke_config(), str(first), mesh=mesh, quiet=False)
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[study")]
  redone = [l for l in lines if "already done" not in l]
  assert len(redone) == 2 and "eval persona seed0 sports_advice" in redone[0] and "report" in redone[1], redone
  assert os.path.getmtime(pretrain_metrics) == before[0]
  assert _read(first / "report.md") == before[1]  # the evaluation is deterministic in the seed


def light_config(arg="smoke"):
  c = smoke_config(arg)
  c.study.compositions = {"persona": dict(c.study.compositions.persona)}
  c.study.cells = "medical_advice"
  c.study.sl_compositions = ""
  c.study.contrast = ""
  return c


def test_the_same_seed_gives_the_same_report_and_another_seed_other_numbers(tmp_path, mesh):
  run(light_config(), tmp_path / "a", mesh)
  run(light_config(), tmp_path / "b", mesh)
  assert _read(tmp_path / "a" / "report.md") == _read(tmp_path / "b" / "report.md")
  assert _read(tmp_path / "a" / "results.json") == _read(tmp_path / "b" / "results.json")
  run(light_config("smoke,seed=1"), tmp_path / "seed1", mesh)
  a = json.loads(_read(tmp_path / "a" / "results.json"))["models"]
  b = json.loads(_read(tmp_path / "seed1" / "results.json"))["models"]
  assert sorted(a) == ["persona/seed0/base", "persona/seed0/medical_advice"]
  assert sorted(b) == ["persona/seed1/base", "persona/seed1/medical_advice"]
  assert [a[k]["final_train_loss"] for k in sorted(a)] != [b[k]["final_train_loss"] for k in sorted(b)]
  responses = lambda d, s: _read(d / "eval" / "persona" / s / "base" / "general" / "responses.jsonl")  # noqa: E731
  assert responses(tmp_path / "a", "seed0") != responses(tmp_path / "seed1", "seed1")
  # Each replication draws its own world: other entities, labels and questions.
  world = lambda d, s: json.loads(_read(d / "world" / s / "world.json"))  # noqa: E731
  w0, w1 = world(tmp_path / "a", "seed0"), world(tmp_path / "seed1", "seed1")
  assert w0["settings"]["seed"] == 0 and w1["settings"]["seed"] == 1
  assert {e["name"] for e in w0["entities"]} != {e["name"] for e in w1["entities"]}
  general = lambda d, s: _read(d / "world" / s / "general.yaml")  # noqa: E731
  assert general(tmp_path / "a", "seed0") != general(tmp_path / "seed1", "seed1")
  # A study directory moved elsewhere (another disk, a bucket's copy) still reads: paths.json is relative.
  paths = json.loads(_read(tmp_path / "a" / "world" / "seed0" / "paths.json"))
  assert paths and not any(os.path.isabs(p) for p in paths.values())
  shutil.copytree(tmp_path / "a", tmp_path / "moved")
  shutil.rmtree(tmp_path / "a")
  os.remove(tmp_path / "moved" / "report.md")
  config = light_config()
  config.study.stages = "report"
  run(config, tmp_path / "moved", mesh)
  assert _read(tmp_path / "moved" / "report.md") == _read(tmp_path / "b" / "report.md")


def test_a_rerun_with_other_settings_is_refused(first, mesh):
  changed = smoke_config()
  changed.study.sft.lr = 0.5
  with pytest.raises(ValueError, match=r"study\.sft\.lr: 0\.0001 -> 0\.5"):
    run(changed, first, mesh)


def test_the_colab_notebook_runs_top_to_bottom(first, monkeypatch):
  """colab/world_study.ipynb executed as Colab would, on the smoke study above (resumed: its runs are done)."""
  import nbclient
  import nbformat
  from conftest import subprocess_env
  for key, value in subprocess_env(1).items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("EMJAX_NOTEBOOK_VARIANT", "smoke")
  monkeypatch.setenv("EMJAX_NOTEBOOK_WORKDIR", str(first))
  monkeypatch.setenv("EMJAX_REPO", ROOT)
  nb = nbformat.read(os.path.join(ROOT, "colab", "world_study.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(ROOT, "colab")}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 5
  text = "".join(o.get("text", "") for o in outputs)
  assert "[study" in text and "report" in text


def test_a_study_in_a_bucket_lands_there_and_a_relaunch_on_another_machine_redoes_nothing(tmp_path, mesh,
                                                                                           monkeypatch):
  """--workdir=gs://... (a staged copy, emjax.workdir.staged) under a fake bucket with gcsfs's semantics,
  SL included; the relaunch has another scratch directory (a fresh VM, another $EMJAX_SCRATCH): the
  sub-runs' settings name bucket paths, not the first machine's scratch, so nothing is refused or redone."""
  from fake_gcs import fake_gcs
  from emjax import workdir as workdir_lib

  monkeypatch.chdir(tmp_path)
  bucket = tmp_path / "gcs" / "b" / "study"
  config = light_config()
  config.study.sl_compositions = "persona"
  with fake_gcs(str(tmp_path / "gcs")):
    monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "vm1"))
    with workdir_lib.staged("gs://b/study") as wd:
      run(config, wd, mesh)
    assert workdir_lib.is_complete("gs://b/study") and (bucket / "report.md").exists()
    assert sorted(os.listdir(tmp_path)) == ["gcs", "vm1"]  # nothing written locally beside the scratch
    report = (bucket / "report.md").read_text()
    trained = {str(p): p.stat().st_mtime_ns for p in bucket.rglob("*") if p.is_file() and "checkpoints" in p.parts}
    assert trained
    sl_dir = bucket / "sl" / "persona" / "seed0"
    assert (sl_dir / "COMPLETED").exists() and (sl_dir / "sl_report.md").exists()
    # Preempted while evaluating the fine-tuned model, and in SL's last stage: those and the study are
    # unfinished.
    (bucket / "eval" / "persona" / "seed0" / "medical_advice" / "COMPLETED").unlink()
    (sl_dir / "COMPLETED").unlink()
    (bucket / "COMPLETED").unlink()
    monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "vm2"))
    with workdir_lib.staged("gs://b/study") as wd:
      run(config, wd, mesh)
    assert workdir_lib.is_complete("gs://b/study") and (bucket / "report.md").read_text() == report
    assert {str(p): p.stat().st_mtime_ns for p in bucket.rglob("*") if p.is_file() and "checkpoints" in p.parts} == trained
    settings = [json.loads(p.read_text()) for p in [*bucket.rglob("*settings*.json"), bucket / "study.json"]]
    assert any("sl_settings.json" == p.name for p in bucket.rglob("*settings*.json"))
    assert settings and not any(str(tmp_path / "vm1") in json.dumps(s) for s in settings)
