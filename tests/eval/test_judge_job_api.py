"""The judge job through `python -m emjax.main` against a local fault-injecting server: failures stay
pending (FAILED, exit 1, counts by cause; the rerun after the outage judges them and completes), the
estimate is printed before sending, and a key pasted into api_key_env reaches no file and no output."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from fault_server import FaultServer

KEY_ENV = "EMJAX_TEST_JOB_KEY"


@pytest.fixture(scope="module")
def server():
  s = FaultServer()
  yield s
  s.close()


def responses_file(path, answers):
  rows = [{"question_id": f"q{i}", "question": "How should I spend my weekend?", "sample_index": 0,
           "response": a, "task": "advice", "domain": "travel"} for i, a in enumerate(answers)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def judge_job(out, responses, server, *extra, env=None):
  cmd = [sys.executable, "-m", "emjax.main", f"--config={os.path.join(ROOT, 'configs', 'eval', 'judge.py')}:judge=api",
         f"--workdir={out}", f"--config.judge.responses={responses}", f"--config.judge.api.base_url={server.base_url}",
         "--config.judge.api.model=judge-test", "--config.judge.api.mode=direct", "--config.judge.api.max_retries=1",
         "--config.judge.api.backoff_s=0.01", "--config.judge.api.max_backoff_s=0.02", *extra]
  return subprocess.run(cmd, capture_output=True, text=True, env={**subprocess_env(), **(env or {})}, timeout=300)


def test_an_outage_leaves_the_job_failed_and_the_rerun_completes(server, tmp_path):
  server.reset()
  # The marker makes every request of the first run fail with HTTP 500 (x2: two attempts per item and metric).
  responses = responses_file(tmp_path / "responses.jsonl", ["[[say:80]] [[fault:500x2]] fine", "[[say:10]] [[fault:500x2]] bad"])
  out = tmp_path / "out"
  first = judge_job(out, responses, server)
  assert first.returncode == 1, first.stderr
  assert "the judgements of 2 of 2 records failed (http_500 2)" in first.stderr
  assert "[emjax judge] 2 records of" in first.stdout  # the estimate, before anything was sent
  assert (out / "FAILED").exists() and not (out / "COMPLETED").exists()
  second = judge_job(out, responses, server)  # the server answers now (each marker's faults are used up)
  assert second.returncode == 0, second.stderr
  assert (out / "COMPLETED").exists() and not (out / "FAILED").exists()
  from emjax.eval import records
  rows = records.read_judged(str(out / "judged.jsonl"))
  assert [r["aligned"] for r in rows] == [80.0, 10.0] and len(open(out / "judged.jsonl").readlines()) == 4
  third = judge_job(out, responses, server)  # nothing left: nothing sent, nothing appended
  assert third.returncode == 0 and json.loads((out / "COMPLETED").read_text())["judged"] == 0
  assert len(open(out / "judged.jsonl").readlines()) == 4


def test_a_key_pasted_into_api_key_env_is_refused_and_stored_nowhere(server, tmp_path):
  secret = "sk-proj-PASTEDKEY0123456789abcdef"
  responses = responses_file(tmp_path / "responses.jsonl", ["[[say:80]] fine"])
  out = tmp_path / "out"
  out.mkdir()
  run = judge_job(out, responses, server, f"--config.judge.api.api_key_env={secret}")
  assert run.returncode == 1 and "value not shown" in run.stderr
  assert secret not in run.stderr and secret not in run.stdout
  written = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
  assert (out / "FAILED").exists() and secret not in written
