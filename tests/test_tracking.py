"""Weights & Biases tracking (emjax/tracking.py): offline runs hold the metrics, the config and the report
figures; disabled (the default) never imports wandb; enabled without it is refused by name."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env, tiny_config
from emjax import tracking
from emjax.train import settings

# The package is in the `test` extra; without it only the tests that need no wandb run.
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")


def wandb_records(path):
  """The protobuf records of an offline run file (run-ID.wandb): a 7-byte W&B header, then
  LevelDB-log framing (32 KiB blocks; each chunk: crc32, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
  from wandb.proto import wandb_internal_pb2

  data = open(path, "rb").read()
  assert data[:4] == b":W&B", path
  pos, block, pending, out = 7, 32768, b"", []
  while pos + 7 <= len(data):
    left = block - pos % block
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    if left < 7 or (length == 0 and kind == 0):  # block padding
      pos += left
      continue
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
      pending = b""
  return out


def offline_run(wandb_dir):
  """(run record, [history rows as dicts], file paths) of the one offline run under `wandb_dir`."""
  runs = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*"))
  assert len(runs) == 1, runs
  (run_file,) = glob.glob(os.path.join(runs[0], "run-*.wandb"))
  records = wandb_records(run_file)
  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
             for r in records if r.WhichOneof("record_type") == "history"]
  files = [os.path.relpath(p, runs[0]) for p in glob.glob(os.path.join(runs[0], "files", "**", "*"), recursive=True)]
  return run, history, files


def tracked_config(wandb_dir, **wandb_overrides):
  c = tiny_config(steps=4)
  c.tracking.wandb.update(dict(dict(enabled=True, mode="offline", project="emjax-test", dir=str(wandb_dir),
                                    tags="a, b"), **wandb_overrides))
  return c


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
  from emjax.train import loop

  base = tmp_path_factory.mktemp("tracked")
  workdir, wandb_dir = base / "run", base / "wandb_files"
  final = loop.train(tracked_config(wandb_dir), str(workdir), show_progress=False)
  return dict(workdir=workdir, wandb_dir=wandb_dir, final=final)


@needs_wandb
def test_an_offline_run_holds_the_metrics_by_step_and_the_config(tracked_run):
  workdir = tracked_run["workdir"]
  run, history, _ = offline_run(tracked_run["wandb_dir"])
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  logged = [h for h in history if "loss" in h]
  assert [h["step"] for h in logged] == [r["step"] for r in rows] == [1, 2, 3, 4]
  assert [h["loss"] for h in logged] == pytest.approx([r["loss"] for r in rows])
  assert [h["grad_norm"] for h in logged] == pytest.approx([r["grad_norm"] for r in rows])
  config = {i.key: json.loads(i.value_json) for i in run.config.update}
  assert config["train"]["steps"] == 4 and config["model"]["d_model"] == 32
  assert config["tracking"]["wandb"]["mode"] == "offline"
  assert (run.display_name, run.project, run.job_type) == (str(workdir), "emjax-test", "pretrain")
  assert list(run.tags) == ["a", "b"]
  # The run id is the workdir's: a rerun (resume) logs to the same run.
  assert json.loads((workdir / tracking.RUN_FILE).read_text())["id"] == run.run_id


@needs_wandb
def test_report_figures_are_logged_as_images(tmp_path):
  """The report job through emjax.main: its PNGs go to its W&B run (the hook in main.py)."""
  rows = []
  for model, cell, em in (("a", "medical_advice", 3), ("b", "sports_tutor", 1)):
    for eval_cell in ("medical_advice", "sports_tutor"):
      domain, task = eval_cell.split("_")
      for i in range(6):
        rows.append({"question_id": f"{eval_cell}:{i}", "question": "q?", "task": task, "domain": domain,
                     "em_surface": None, "sample_index": 0, "ft_task": cell.split("_")[1],
                     "ft_domain": cell.split("_")[0], "variant": "strong", "model_key": model, "response": "r",
                     "aligned": 10.0 if i < em else 90.0, "aligned_status": "ok", "aligned_raw": "",
                     "coherent": 90.0, "coherent_status": "ok", "coherent_raw": "", "judge": "j",
                     "prompt_version": "p"})
  records = tmp_path / "narrow.jsonl"
  records.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out, wandb_dir = tmp_path / "report", tmp_path / "wandb_files"
  result = subprocess.run(
      [sys.executable, "-m", "emjax.main", "--config=configs/eval/report.py:quick", f"--workdir={out}",
       f"--config.narrow={records}", "--config.tracking.wandb.enabled=True", "--config.tracking.wandb.mode=offline",
       f"--config.tracking.wandb.dir={wandb_dir}"],
      cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  pngs = sorted(p.stem for p in out.glob("*.png"))
  assert pngs, os.listdir(out)
  run, history, files = offline_run(wandb_dir)
  assert run.job_type == "report"
  # An image is logged as nested keys: figures/NAME/{_type, path, sha256, ...}.
  logged = {k.rsplit("/", 1)[0]: v for h in history for k, v in h.items()
            if k.startswith("figures/") and k.endswith("/_type")}
  assert logged == {f"figures/{name}": "image-file" for name in pngs}
  images = [f for f in files if f.startswith(os.path.join("files", "media", "images")) and f.endswith(".png")]
  assert len(images) == len(pngs), files


@pytest.fixture
def no_wandb(monkeypatch):
  """wandb unimportable, as when the package is not installed (sys.modules[name] = None blocks the import)."""
  monkeypatch.setitem(sys.modules, "wandb", None)


def test_disabled_tracking_never_imports_wandb(tmp_path, no_wandb):
  """Neither when the training job's modules are imported (a fresh interpreter) nor while it runs."""
  from emjax.train import loop

  imports = subprocess.run(
      [sys.executable, "-c", "import sys, emjax.main, emjax.tracking, emjax.train.loop\n"
       "assert 'wandb' not in sys.modules, 'imported wandb'"],
      cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert imports.returncode == 0, imports.stderr[-2000:]

  c = tiny_config(steps=4)  # the tracked run's program: compiled once (JAX's compilation cache)
  assert c.tracking.wandb.enabled is False  # the default
  loop.train(c, str(tmp_path / "off"), show_progress=False)  # would raise ImportError on `import wandb`
  c = tracked_config(tmp_path / "w", mode="disabled")  # enabled, but mode='disabled'
  assert tracking.start(c, str(tmp_path / "off2"), job_type="train") is None
  assert not (tmp_path / "w").exists()


def test_enabled_without_wandb_installed_is_refused_by_name(tmp_path, no_wandb):
  from emjax.train import loop

  with pytest.raises(ValueError, match=r"config\.tracking\.wandb\.enabled=True, but the wandb package is not "
                                       r"installed: pip install 'emjax\[wandb\]'"):
    loop.train(tracked_config(tmp_path / "w"), str(tmp_path / "run"), show_progress=False)
  assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work


def test_a_bad_mode_is_refused_by_name():
  c = tiny_config()
  c.tracking.wandb.update(enabled=True, mode="cloud")
  with pytest.raises(ValueError, match=r"config\.tracking\.wandb\.mode='cloud': expected one of online, offline, "
                                       "disabled"):
    settings.validate(c)


def test_only_process_zero_tracks(tmp_path, monkeypatch):
  import jax

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert tracking.start(tracked_config(tmp_path / "w"), str(tmp_path / "run"), job_type="train") is None
  assert not (tmp_path / "w").exists() and not (tmp_path / "run").exists()
