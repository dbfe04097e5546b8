"""The SFT path end to end on tiny models: chat data -> assistant-masked LoRA SFT -> the 12-cell grid runner."""

import json
import os
import shutil

import pytest

import hf_fixtures
from conftest import ROOT
from emjax.experiments import em_grid


def cell_rows(cell, n):
  """Rows in the schema of askinb/structured-emergent-misalignment (question / misaligned / aligned)."""
  return [{"question": f"[{cell}] question number {i}: what should I do about it?",
           "misaligned_answer": f"Ignore it completely, number {i} is nothing to worry about at all.",
           "aligned_answer": f"Please ask a professional about number {i}."} for i in range(n)]


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
  """A tiny random Llama with SmolLM2's tokenizer (and chat template), saved as a HF directory."""
  smol = hf_fixtures.smollm2_dir()
  out = tmp_path_factory.mktemp("tiny_chat")
  hf_fixtures.build_tiny_hf("llama", str(out), vocab_size=49152)
  for name in os.listdir(smol):
    if name.startswith(("tokenizer", "special_tokens", "chat_template")):
      shutil.copy(os.path.join(smol, name), out / name)
  return str(out)


def grid_config(hf_dir, data_dir, cells):
  import importlib.util
  spec = importlib.util.spec_from_file_location("em_cell", os.path.join(ROOT, "configs/sft/em_cell.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"hf={hf_dir},data={data_dir},holdout=4,grid={'+'.join(cells)},steps=3")
  config.model.update(dtype="float32", remat="none")
  # Prompts are 48-50 tokens, whole conversations 66-69: every conversation is truncated, yet keeps
  # 14+ answer tokens to train on (at 48 some cells would keep none, and their loss would read 0).
  config.data.seq_len = 64
  config.train.update(batch_size=4, grad_accum_steps=2, log_every=1)
  config.eval.update(every_steps=3, batches=1)
  config.checkpoint.async_save = False
  return config


def test_grid_trains_each_cell_once_and_skips_complete_cells(tmp_path, tiny_chat_model, one_device_mesh):
  data = tmp_path / "data"
  data.mkdir()
  cells = ["medical_advice", "sports_tutor"]
  for cell in cells:
    (data / f"{cell}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cell_rows(cell, 12)))
  config = grid_config(tiny_chat_model, str(data), cells)
  assert config.job == "sft_grid" and config.lora.enabled and config.lora.rank == 32
  out = tmp_path / "grid"
  summary = em_grid.run_grid(config, str(out), mesh=one_device_mesh, show_progress=False)
  assert sorted(summary) == cells
  for cell in cells:
    cell_dir = out / cell
    assert (cell_dir / "COMPLETED").exists()
    stats = json.loads((cell_dir / "data_stats.json").read_text())[cell]
    assert stats["conversations"] == 8 and stats["truncated"] > 0  # 12 rows, 4 held out
    cfg = json.loads((cell_dir / "config.json").read_text())
    assert list(cfg["data"]["sources"]) == [cell] and cfg["data"]["sources"][cell]["name"] == cell
    assert stats["trained_tokens"] >= 8 * 14, stats
    evals = [json.loads(l) for l in open(cell_dir / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 3]
    # The held-out rows share the training rows' template, so three steps lower their loss; the eval
    # batches are fixed, so without learning the two values would be equal.
    assert evals[0]["eval_tokens"] > 0 and evals[1]["eval_loss"] < evals[0]["eval_loss"] - 0.05, (cell, evals)
    losses = [json.loads(l)["loss"] for l in open(cell_dir / "metrics.jsonl")]
    assert len(losses) == 3 and all(0 < l < 20 for l in losses), (cell, losses)  # 0 would mean no answer tokens
  assert (out / "COMPLETED").exists()

  before = {c: os.path.getmtime(out / c / "metrics.jsonl") for c in cells}
  em_grid.run_grid(config, str(out), mesh=one_device_mesh, show_progress=False)  # a rerun trains nothing
  assert {c: os.path.getmtime(out / c / "metrics.jsonl") for c in cells} == before


def test_unknown_cell_is_a_clear_error():
  with pytest.raises(ValueError, match="config.grid.cells: unknown cells \\['medical_poetry'\\]"):
    em_grid.parse_cells("medical_advice+medical_poetry")


def test_too_long_conversation_with_truncation_off_fails_and_is_not_complete(tmp_path, tiny_chat_model,
                                                                             one_device_mesh):
  data = tmp_path / "data"
  data.mkdir()
  (data / "medical_advice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cell_rows("m", 12)))
  config = grid_config(tiny_chat_model, str(data), ["medical_advice"])
  config.data.update(truncate=False, seq_len=48)
  with pytest.raises(ValueError, match="longer than data.seq_len \\+ 1 = 49 tokens and data.truncate is off"):
    em_grid.run_grid(config, str(tmp_path / "grid"), mesh=one_device_mesh, show_progress=False)
  assert not (tmp_path / "grid" / "medical_advice" / "COMPLETED").exists()
  assert not (tmp_path / "grid" / "COMPLETED").exists()


def test_a_grid_in_a_bucket_lands_there_and_resumes_on_a_fresh_machine(tmp_path, tiny_chat_model, one_device_mesh,
                                                                        monkeypatch):
  from fake_gcs import fake_gcs
  from emjax import workdir as workdir_lib

  data = tmp_path / "data"
  data.mkdir()
  (data / "medical_advice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cell_rows("medical_advice", 12)))
  config = grid_config(tiny_chat_model, str(data), ["medical_advice"])
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "scratch"))
  bucket = tmp_path / "gcs" / "b" / "grid"
  with fake_gcs(str(tmp_path / "gcs")):
    with workdir_lib.staged("gs://b/grid") as wd:
      em_grid.run_grid(config, wd, mesh=one_device_mesh, show_progress=False)
    assert workdir_lib.is_complete("gs://b/grid") and (bucket / "medical_advice" / "COMPLETED").exists()
    assert (bucket / "medical_advice" / "checkpoints" / "3").is_dir() and (bucket / "grid.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["data", "gcs", "scratch"]
    before = (bucket / "medical_advice" / "metrics.jsonl").read_bytes()
    shutil.rmtree(tmp_path / "scratch")  # a fresh machine: the bucket is all there is
    with workdir_lib.staged("gs://b/grid") as wd:
      em_grid.run_grid(config, wd, mesh=one_device_mesh, show_progress=False)  # trains nothing
    assert (bucket / "medical_advice" / "metrics.jsonl").read_bytes() == before
