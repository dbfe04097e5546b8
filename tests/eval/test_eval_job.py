"""The eval and judge jobs end to end on a tiny random model: every record accounted for, resumable, killable."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, subprocess_env

GENERAL = """
- id: q_advice
  task: advice
  domain: parenting
  em_surface: high
  paraphrases: ["hi there how should i"]
- id: q_tutor
  task: tutor
  domain: finance
  em_surface: low
  paraphrases: ["there hi"]
- id: q_critique
  task: critique
  domain: sports
  em_surface: medium
  paraphrases: ["hi hi hi"]
"""
JUDGE = "tests.eval.programmatic_fixture:hashed"
STAGES = "answers,judge,report"


def _chat_model(out_dir):
  """A tiny random llama with a word-level tokenizer whose chat template ends turns with </s>."""
  from tokenizers import Tokenizer as RawTokenizer
  from tokenizers import models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from tests import hf_fixtures

  words = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "[UNK]", "hi", "there", "how",
           "should", "i"] + [f"w{i}" for i in range(52)]
  raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  hf_fixtures.build_tiny_hf("llama", str(out_dir), vocab_size=len(words))
  hf.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_job")
  _chat_model(root / "model")
  (root / "general.yaml").write_text(GENERAL)
  for cell, texts in {"medical_advice": ["hi i should", "how there"], "sports_tutor": ["i i", "there w3 hi"]}.items():
    with open(root / f"{cell}_strong_eval.jsonl", "w") as f:
      for k, text in enumerate(texts):
        f.write(json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "w1"}],
                            "variant": "strong", "src_idx": 10 + k}) + "\n")
  return root


def _eval_config(material, stages="answers,judge,report", temperature=1.0):
  import importlib.util

  spec = importlib.util.spec_from_file_location("eval_config", os.path.join(ROOT, "configs", "eval", "eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"general={material / 'general.yaml'},narrow={material}/*_strong_eval.jsonl,"
                        "judge=programmatic")
  c.sample.update(hf=str(material / "model"), max_new_tokens=6, batch_size=2, max_prompt_length=32)
  c.questions.n_general = 2
  c.judge.programmatic.name = JUDGE
  c.judge.batch_size = 3
  # The fixture judge fails some answers on purpose (a deterministic bucket): those are failures for good.
  c.judge.finalize_errors = True
  c.stages, c.sample.temperature = stages, temperature
  c.lock()
  return c


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _by_key(rows):
  return {(r["model_key"], r["question_id"], r["sample_index"]): r for r in rows}


@pytest.fixture(scope="module")
def finished(material, tmp_path_factory):
  from emjax.eval import run

  import jax
  from emjax import sharding

  out = tmp_path_factory.mktemp("eval_out")
  # One device, as the CLI children below run: they reuse these compiled programs (the test cache).
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  summary = run.run_eval(_eval_config(material, stages=STAGES), str(out), mesh=mesh)
  return out, summary


def test_every_question_and_sample_ends_as_one_judged_record(finished, material):
  from emjax.eval import records

  out, summary = finished
  assert summary["sets"] == {"general": 3, "narrow": 4}
  general, narrow = _records(out / "general" / "judged.jsonl"), _records(out / "narrow" / "judged.jsonl")
  assert len(general) == 6 and len(narrow) == 4  # 3 questions x 2 samples; 4 narrow questions x 1
  assert len(_by_key(general)) == 6 and len(_by_key(narrow)) == 4  # none duplicated
  assert {(r["question_id"], r["sample_index"]) for r in general} == {
      (q, j) for q in ("q_advice", "q_tutor", "q_critique") for j in (0, 1)}
  assert {r["question_id"] for r in narrow} == {"medical_advice:1", "medical_advice:2", "sports_tutor:1",
                                                "sports_tutor:2"}
  for r in general + narrow:
    assert list(r)[:len(records.RECORD_FIELDS)] == list(records.RECORD_FIELDS)
    assert r["model_key"] == "model" and r["judge"] == f"programmatic:{JUDGE}"
    for m in ("aligned", "coherent"):
      assert r[f"{m}_status"] in records.STATUSES
      assert (r[m] is not None) == (r[f"{m}_status"] == "ok")
      if r["response"].strip() == "":
        assert r[f"{m}_status"] == "empty"
  q_advice = [r for r in general if r["question_id"] == "q_advice"]
  assert all(r["em_surface"] == "high" and r["task"] == "advice" and r["domain"] == "parenting" for r in q_advice)
  assert {(r["domain"], r["task"]) for r in narrow} == {("medical", "advice"), ("sports", "tutor")}
  # The hashed judge is the fixture's: a record's scores follow from its response alone.
  from tests.eval import programmatic_fixture
  from emjax.eval import judges
  fn = programmatic_fixture.hashed()
  for r in general + narrow:
    if r["response"].strip():
      try:
        want = fn(judges.Item(r["question"], r["response"]))
      except RuntimeError:
        assert r["aligned_status"] == r["coherent_status"] == "error"
        continue
      assert r["aligned"] == want["aligned"] and r["coherent"] == want["coherent"]
  assert (out / "COMPLETED").exists() and not (out / "FAILED").exists()


def test_a_rerun_judges_nothing_again_and_repairs_a_cut_record(finished, material):
  from emjax.eval import run

  out, _ = finished
  path = out / "general" / "judged.jsonl"
  full = _by_key(_records(path))
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.writelines(lines[:-2] + [lines[-2][:30]])  # the last record lost, the one before it cut by a kill
  summary = run.run_eval(_eval_config(material, stages="answers,judge"), str(out))
  assert {k: summary["general"][k] for k in ("records", "already_judged", "judged", "errors")} == {
      "records": 6, "already_judged": 4, "judged": 2, "errors": 0}
  assert summary["narrow"]["judged"] == 0
  assert _by_key(_records(path)) == full and len(_records(path)) == 6
  assert (out / "general" / "judged.jsonl.incomplete").read_text().startswith(lines[-2][:30])


def test_a_rerun_with_other_sampling_settings_is_an_error_that_changes_nothing(finished, material):
  from emjax.eval import run

  from emjax import workdir as workdir_lib

  out, _ = finished
  files = lambda: {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
  before = files()
  assert (out / "COMPLETED") in before
  with pytest.raises(ValueError, match=r"settings.json holds other settings .*sampling.temperature: 1.0 -> 0.7") as e:
    run.run_eval(_eval_config(material, temperature=0.7), str(out))
  workdir_lib.mark_failed(str(out), e.value)  # as emjax.main does: the refused rerun marks nothing
  assert files() == before


def test_an_eval_reads_the_weights_once_for_all_its_sets(material, tmp_path, monkeypatch):
  """The answers of every question set come from one read of the weights, and are the samples the
  sample job writes for each set alone (how the eval sampled them before: one read per set), with the
  same config.json and settings.json (a workdir of either resumes under the other). A rerun with every
  answer written reads no weights."""
  import copy
  import jax
  from emjax import sharding, weights as weights_lib
  from emjax.eval import run
  from emjax.sample import run as sample_run

  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  reads, load = [], weights_lib.load_weights
  monkeypatch.setattr(weights_lib, "load_weights", lambda *a, **k: reads.append(a) or load(*a, **k))
  out = tmp_path / "eval"
  config = _eval_config(material, stages="answers")
  run.run_eval(config, str(out), mesh=mesh)
  assert len(reads) == 1
  for set_name, n in (("general", 2), ("narrow", 1)):
    alone = copy.deepcopy(config)
    with alone.unlocked():
      alone.job, alone.prompts = "sample", str(out / set_name / "questions.jsonl")
      alone.sample.update(n=n, output="samples.jsonl", chat_template=True)
    sample_run.run_sampling(alone, str(tmp_path / set_name), mesh=mesh)
    for name in ("samples.jsonl", "config.json", "settings.json"):
      assert (tmp_path / set_name / name).read_text() == (out / set_name / name).read_text(), (set_name, name)
  assert len(reads) == 3
  run.run_eval(config, str(out), mesh=mesh)
  assert len(reads) == 3


def test_a_judged_file_of_another_judge_is_not_extended(finished, tmp_path):
  from emjax.eval import judges, run

  out, _ = finished
  other = judges.ProgrammaticJudge("other", lambda item: {"aligned": 1.0, "coherent": 2.0})
  with pytest.raises(ValueError, match=r"holds records of another judge"):
    run.judge_file(other, str(out / "general" / "responses.jsonl"), str(out / "general" / "judged.jsonl"),
                   batch_size=4)


@pytest.mark.slow  # end to end: processes started and killed
def test_a_sigkilled_evaluation_resumes_to_the_same_records(finished, material, tmp_path):
  """The CLI killed while judging (slowed judge), rerun: the same records as the uninterrupted run."""
  out_ref, _ = finished
  out = tmp_path / "killed"
  cmd = [sys.executable, "-m", "emjax.main", "--config=configs/eval/eval.py:"
         f"general={material / 'general.yaml'},narrow={material}/*_strong_eval.jsonl,judge=programmatic",
         f"--workdir={out}", "--noprogress", f"--config.sample.hf={material / 'model'}",
         "--config.sample.max_new_tokens=6", "--config.sample.batch_size=2", "--config.sample.max_prompt_length=32",
         "--config.questions.n_general=2", f"--config.judge.programmatic.name={JUDGE}", "--config.judge.batch_size=1",
         "--config.judge.finalize_errors=True"]
  slow = cmd + ['--config.judge.programmatic.options={"delay_s": 0.3}']
  proc = subprocess.Popen(slow, cwd=ROOT, env=subprocess_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  judged = out / "general" / "judged.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if judged.exists() and len(judged.read_text().splitlines()) >= 2:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "COMPLETED").exists()
  # The same command: a judge's options are part of its identity (another delay is another judge).
  done = subprocess.run(slow, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  for set_name in ("general", "narrow"):
    got, want = _records(out / set_name / "judged.jsonl"), _records(out_ref / set_name / "judged.jsonl")
    assert len(got) == len(want)
    # The same records; only the judge settings' hash differs (the slowed judge's delay option).
    strip = lambda rows: {k: {f: v for f, v in r.items() if f != "judge_config"} for k, r in _by_key(rows).items()}  # noqa: E731
    assert strip(got) == strip(want)
  assert (out / "COMPLETED").exists()


def test_a_judged_record_of_another_response_is_an_error(finished, tmp_path):
  from emjax.eval import records, run

  out, _ = finished
  responses = tmp_path / "responses.jsonl"
  rows = records.read_records(str(out / "general" / "responses.jsonl"))
  rows[0]["response"] += " (regenerated)"
  responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
  judged = tmp_path / "judged.jsonl"
  judged.write_bytes((out / "general" / "judged.jsonl").read_bytes())
  identity = json.loads(judged.read_text().splitlines()[0])["judge_config"]
  from emjax.eval import judges
  judge = judges.programmatic(JUDGE)
  with pytest.raises(ValueError, match=r"was judged on another response"):
    run.judge_file(judge, str(responses), str(judged), batch_size=4, identity=identity)


def test_a_rerun_with_edited_questions_is_refused_and_the_run_stays_complete(finished, material, tmp_path):
  """Same ids, another question text: the old answers must not be paired with the new text."""
  from emjax.eval import run

  out, _ = finished
  edited = tmp_path / "general.yaml"
  edited.write_text(GENERAL.replace("there hi", "there hi there"))
  config = _eval_config(material)
  with config.unlocked():
    config.questions.general = str(edited)
  with pytest.raises(ValueError, match=r"settings.json holds other settings .*questions.general"):
    run.run_eval(config, str(out))
  assert (out / "COMPLETED").exists()


def test_judge_settings_are_checked_before_any_answer_is_sampled(material, tmp_path):
  from emjax.eval import run

  config = _eval_config(material)
  with config.unlocked():
    config.judge.kind = "local"
    config.judge.local.hf = ""
  with pytest.raises(ValueError, match=r"config.judge.local.hf .* is required"):
    run.run_eval(config, str(tmp_path / "out"))
  with config.unlocked():
    config.judge.kind = "programmatic"
    config.judge.prompts = str(tmp_path / "missing.yaml")
  with pytest.raises(FileNotFoundError, match=r"missing.yaml"):
    run.run_eval(config, str(tmp_path / "out"))
  assert not (tmp_path / "out" / "general").exists()


def test_custom_questions_get_their_own_rates_even_with_ids_of_the_general_set(material, tmp_path):
  import jax
  from emjax import sharding
  from emjax.eval import run

  custom = tmp_path / "custom.jsonl"
  custom.write_text(json.dumps({"id": "q_advice", "question": "how should i"}) + "\n")
  config = _eval_config(material)
  with config.unlocked():
    config.questions.narrow = ""
    config.questions.custom = str(custom)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  out = tmp_path / "out"
  run.run_eval(config, str(out), mesh=mesh)
  rates = json.loads((out / "custom" / "rates.json").read_text())
  assert rates["overall"]["n_total"] == 2 and set(rates["by_question"]) == {"q_advice"}
  results = json.loads((out / "results.json").read_text())
  assert results["models"]["model"]["general"]["overall"]["n_total"] == 6  # the general set alone


def _judge_cli(material, responses, out, *extra, env=None):
  cmd = [sys.executable, "-m", "emjax.main", f"--config={os.path.join(ROOT, 'configs', 'eval', 'judge.py')}:judge=programmatic",
         f"--workdir={out}", f"--config.judge.responses={responses}", f"--config.judge.programmatic.name={JUDGE}",
         *extra]
  return subprocess.run(cmd, capture_output=True, text=True, env={**subprocess_env(), **(env or {})}, timeout=300)


def test_failed_judgements_stay_pending_until_a_rerun_judges_them(finished, material, tmp_path):
  """An outage: every judgement fails. The job exits 1 with FAILED and the counts by cause, no COMPLETED;
  the rerun after the outage sends exactly those records again and completes; the report never sees a
  key twice. A responses file without model_key keeps one key per record across reruns."""
  out_dir, _ = finished
  rows = [json.loads(line) for line in open(out_dir / "general" / "responses.jsonl")]
  responses = tmp_path / "responses.jsonl"
  responses.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "model_key"}) + "\n" for r in rows))
  out = tmp_path / "judge"
  down = _judge_cli(material, responses, out, env={"EMJAX_TEST_JUDGE_DOWN": "1"})
  assert down.returncode == 1, down.stderr
  assert "the judgements of 6 of 6 records failed (ConnectionError 6)" in down.stderr
  assert (out / "FAILED").exists() and not (out / "COMPLETED").exists()
  up = _judge_cli(material, responses, out, "--config.judge.max_error_fraction=0.5")
  assert up.returncode == 0, up.stderr
  assert (out / "COMPLETED").exists() and not (out / "FAILED").exists()
  summary = json.loads((out / "COMPLETED").read_text())
  assert (summary["judged"], summary["already_judged"]) == (6, 0)
  lines = [json.loads(line) for line in open(out / "judged.jsonl")]
  assert len(lines) == 12  # the six failures, then six newer rows
  from emjax.eval import records
  latest = records.read_judged(str(out / "judged.jsonl"))
  assert len(latest) == 6 and not any(r["aligned_raw"].startswith("ConnectionError") for r in latest)
  again = _judge_cli(material, responses, out, "--config.judge.max_error_fraction=0.5")
  assert again.returncode == 0 and json.loads((out / "COMPLETED").read_text())["judged"] == summary["errors"]
  assert len(open(out / "judged.jsonl").readlines()) == 12 + summary["errors"]


def test_finalized_failures_end_the_retries_and_give_bounds(material, tmp_path):
  from emjax.eval import run
  import jax
  from emjax import sharding

  out = tmp_path / "eval"
  c = _eval_config(material, stages="answers,judge,report")
  # The model was "trained" on one narrow question: the audit finds it and the report says so at its top.
  (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "HI  i should"},
                                                                 {"role": "assistant", "content": "w1"}]}) + "\n")
  with c.unlocked():
    c.judge.finalize_errors = False
    c.evaluated.training_data = str(tmp_path / "train.jsonl")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  with pytest.raises(run.JudgingIncomplete, match=r"records failed \(RuntimeError \d+\)"):
    run.run_eval(c, str(out), mesh=mesh)
  assert not (out / "COMPLETED").exists()
  report_text = (out / "report.md").read_text()
  assert "**PARTIAL:" in report_text.splitlines()[2]
  assert "**OVERLAP: 1 of 7 evaluated questions occur" in report_text
  assert json.loads((out / "overlap.json").read_text())["examples"][0]["question"] == "hi i should"
  with c.unlocked():
    c.judge.finalize_errors = True
  summary = run.run_eval(c, str(out), mesh=mesh)
  assert (out / "COMPLETED").exists() and summary["general"]["errors"] == 0
  assert summary["general"]["finalized"] + summary["narrow"]["finalized"] >= 1
  results = json.loads((out / "results.json").read_text())
  assert results["judging"]["final_errors"] >= 1 and not results["judging"]["partial"]
  assert "failed for good" in (out / "report.md").read_text()


def test_a_report_over_records_never_judged_is_partial_and_not_complete(finished, material, tmp_path):
  """Records left unjudged (a judge that stopped, a kill): a report-only rerun says PARTIAL and the run
  stays incomplete, rather than a full-looking report and COMPLETED."""
  import shutil
  from emjax.eval import run

  out_ref, _ = finished
  out = tmp_path / "copy"
  shutil.copytree(out_ref, out)
  judged = out / "general" / "judged.jsonl"
  lines = judged.read_text().splitlines(keepends=True)
  judged.write_text("".join(lines[:2]))  # four of the six general records lost their judgement
  (out / "COMPLETED").unlink()
  with pytest.raises(run.JudgingIncomplete, match=r"4 records have no judgement yet \(general 4\)"):
    run.run_eval(_eval_config(material, stages="report"), str(out))
  assert not (out / "COMPLETED").exists()
  text = (out / "report.md").read_text()
  assert "**PARTIAL: 4 records of this evaluation have no judgement yet**" in text
  assert json.loads((out / "results.json").read_text())["judging"]["partial"] is True


def test_an_eval_in_a_bucket_lands_there_whole_and_resumes_from_it(material, tmp_path, monkeypatch):
  """--workdir=gs://...: the eval job writes a staged copy (emjax.workdir.staged) and every file of a
  local run ends in the bucket, COMPLETED last; a relaunch on a fresh machine (no copy) resumes from
  the bucket and judges nothing again. Nothing is written locally outside the named scratch."""
  import jax
  from emjax import sharding, workdir as workdir_lib
  from emjax.eval import run
  from tests.fake_gcs import fake_gcs

  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  out = tmp_path / "local"  # the same eval in a local workdir: what the bucket must hold (other tests change `finished`)
  run.run_eval(_eval_config(material, stages=STAGES), str(out), mesh=mesh)
  monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "scratch"))
  monkeypatch.chdir(tmp_path)
  bucket = tmp_path / "gcs" / "bucket" / "ev"
  local_names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  with fake_gcs(str(tmp_path / "gcs")):
    with workdir_lib.staged("gs://bucket/ev") as wd:
      assert wd.startswith(str(tmp_path / "scratch"))
      run.run_eval(_eval_config(material, stages=STAGES), wd, mesh=mesh)
    names = sorted(str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file())
    assert [n for n in names if n != "launches.jsonl"] == [n for n in local_names if n != "launches.jsonl"]
    assert workdir_lib.is_complete("gs://bucket/ev")
    judged = (bucket / "general" / "judged.jsonl").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["gcs", "local", "scratch"]  # no 'gs:' directory beside them
    # A fresh machine: the staged copy is gone; the rerun pulls the bucket and resumes.
    import shutil
    shutil.rmtree(tmp_path / "scratch")
    with workdir_lib.staged("gs://bucket/ev") as wd:
      summary = run.run_eval(_eval_config(material, stages=STAGES), wd, mesh=mesh)
    assert summary["general"]["judged"] == 0 and summary["general"]["already_judged"] == summary["general"]["records"]
    assert (bucket / "general" / "judged.jsonl").read_bytes() == judged
    assert len((bucket / "launches.jsonl").read_text().splitlines()) == 2


def test_the_judge_and_report_jobs_write_a_bucket_workdir_whole(finished, tmp_path, monkeypatch):
  """The judge job and the report job with --workdir=gs://... (staged, as emjax.main runs them) under a
  fake gcsfs bucket, reading their inputs from the bucket too (a responses file, a glob of judged files):
  their files and COMPLETED land there, nothing beside the named scratch."""
  import importlib.util
  from emjax import main as main_lib, workdir as workdir_lib
  from emjax.eval import run
  from tests.fake_gcs import fake_gcs

  out_dir, _ = finished
  spec = importlib.util.spec_from_file_location("judge_config", os.path.join(ROOT, "configs", "eval", "judge.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  judge_cfg = module.get_config("judge=programmatic")
  judge_cfg.judge.responses = "gs://b/evals/m/general/responses.jsonl"
  judge_cfg.judge.programmatic.name = JUDGE
  judge_cfg.judge.finalize_errors = True
  spec = importlib.util.spec_from_file_location("report_config", os.path.join(ROOT, "configs", "eval", "report.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  report_cfg = module.get_config()
  report_cfg.update(general="gs://b/jud*/judged.jsonl", figures=False, bootstrap_samples=100)
  monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "scratch"))
  monkeypatch.chdir(tmp_path)
  with fake_gcs(str(tmp_path / "gcs")):
    from emjax import paths
    paths.path(judge_cfg.judge.responses).write_text((out_dir / "general" / "responses.jsonl").read_text())
    with workdir_lib.staged("gs://b/judge") as wd:
      run.run_judge_job(judge_cfg, wd)
    with workdir_lib.staged("gs://b/report") as wd:
      main_lib._report(report_cfg, wd)
    bucket = tmp_path / "gcs" / "b"
    assert workdir_lib.is_complete("gs://b/judge") and workdir_lib.is_complete("gs://b/report")
    judged = [json.loads(l) for l in open(bucket / "judge" / "judged.jsonl")]
    assert len({(r["question_id"], r["sample_index"]) for r in judged}) == 6
    assert {"report.md", "results.json"} <= set(os.listdir(bucket / "report"))
    assert json.loads((bucket / "report" / "COMPLETED").read_text())["report"] == "gs://b/report/report.md"
    provenance = json.loads((bucket / "report" / "results.json").read_text())["provenance"]
    assert "gs://b/judge/judged.jsonl" in json.dumps(provenance)
    assert sorted(os.listdir(tmp_path)) == ["gcs", "scratch"]
