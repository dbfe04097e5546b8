"""Two processes on this machine as one multi-host job (launch/multiprocess.sh, jax.distributed on 127.0.0.1).

2 processes x 4 CPU devices on the mesh data=2 fsdp=2 tensor=2:
  * SIGTERM to one process (a preemption notice): jax's preemption service tells the other, both save a
    checkpoint at the same step, both exit with status 75 within seconds, neither COMPLETED nor FAILED is
    written, and the rerun equals the uninterrupted run bit for bit;
  * killed with SIGKILL after a checkpoint and resumed: losses and final parameters equal the
    uninterrupted 2-process run bit for bit (each process resumes from its own data position; the
    newest checkpoint is damaged on process 1 only, so both must agree to skip it and process 0
    alone sets it aside);
  * the same as the 1-process 8-device run up to float32 reduction order (data.shards=2 gives the
    same global batches in the same order whatever the process count).
"""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow  # several processes with jax.distributed; part of CI

STEPS, EVERY = 15, 3
OVERRIDES = [f"--config.train.steps={STEPS}", f"--config.checkpoint.every_steps={EVERY}",
             "--config.checkpoint.keep=4", "--config.data.shards=2", "--config.mesh.data=2",
             "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.eval.every_steps=6",
             "--config.eval.batches=1"]
CONFIG = "configs/pretrain/tiny.py:smoke"


def _launch(workdir, logs, processes=2, devices=4) -> subprocess.Popen:
  env = subprocess_env(devices)
  # Compile with little optimisation: a third of the compile time, and every run compared
  # bit for bit is compiled alike (the script adds the device count to XLA_FLAGS).
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env["EMJAX_LOG_DIR"] = str(logs)
  # A session of its own: SIGKILL to its process group reaches the script and every process.
  return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "multiprocess.sh"), str(processes), str(devices),
                           f"--config={CONFIG}", f"--workdir={workdir}", "--noprogress", *OVERRIDES],
                          cwd=ROOT, env=env, start_new_session=True)


def _finish(proc, logs, timeout=600):
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  if rc != 0:
    tails = {p: (logs / p).read_text()[-3000:] for p in sorted(os.listdir(logs))}
    pytest.fail(f"multiprocess.sh exited with {rc}: {tails}")


def _metrics(workdir, name="metrics.jsonl"):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(line) for line in f]


def _params(workdir, step):
  """The saved parameters as numpy arrays (read in this one process, whatever wrote them)."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  meta = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return ocp.PyTreeCheckpointer().restore(path, restore_args=restore_args)["params"]


def _complete_steps(workdir):
  ckdir = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) if os.path.isdir(ckdir) else []


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted 2-process run that the others are compared with."""
  root = tmp_path_factory.mktemp("straight")
  _finish(_launch(root / "run", root / "logs"), root / "logs")
  return root / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, straight):
  root = tmp_path_factory.mktemp("multihost")
  killed = root / "killed"

  proc = _launch(killed, root / "logs_killed")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:  # two complete checkpoints, then kill
    if len(_complete_steps(killed)) >= 2:
      break
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  steps_at_kill = _complete_steps(killed)
  assert not (killed / "COMPLETED").exists(), "the run ended before it was killed: raise STEPS"
  assert len(steps_at_kill) >= 2 and max(steps_at_kill) < STEPS, steps_at_kill
  # Process 1's position file of the newest step is cut short: process 0 could read that step,
  # process 1 cannot, so both must skip it and resume from the one before.
  newest = max(steps_at_kill)
  damaged = killed / "checkpoints" / str(newest) / "data" / "process_1-of-2.json"
  damaged.write_text(damaged.read_text()[:5])

  resumed_logs = root / "logs_resumed"
  _finish(_launch(killed, resumed_logs), resumed_logs)

  one = root / "one_process"
  _finish(_launch(one, root / "logs_one", processes=1, devices=8), root / "logs_one")
  return dict(straight=straight, killed=killed, one=one, steps_at_kill=steps_at_kill, newest=newest,
              resumed_log=(resumed_logs / "process_0.log").read_text(),
              resumed_log_1=(resumed_logs / "process_1.log").read_text())


def test_sigkill_and_resume_equals_the_uninterrupted_two_process_run_bit_for_bit(runs):
  older = max(s for s in runs["steps_at_kill"] if s < runs["newest"])
  assert f"resumed from step {older}" in runs["resumed_log"]
  assert f"step {runs['newest']}" in runs["resumed_log"] and "unreadable" in runs["resumed_log"]
  aside = runs["killed"] / "checkpoints_unreadable" / str(runs["newest"])
  assert aside.is_dir() and (aside / "data" / "process_0-of-2.json").exists()  # moved once, by process 0
  assert "moved unreadable step" not in runs["resumed_log_1"]

  a, b = _metrics(runs["straight"]), _metrics(runs["killed"])
  assert [r["step"] for r in a] == list(range(1, STEPS + 1)) == [r["step"] for r in b]
  assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact
  assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
  ea, eb = _metrics(runs["straight"], "eval.jsonl"), _metrics(runs["killed"], "eval.jsonl")
  assert [r["step"] for r in ea] == [0, 6, 12, 15] == [r["step"] for r in eb]
  assert ea == eb
  pa, pb = _params(runs["straight"], STEPS), _params(runs["killed"], STEPS)
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)  # bitwise


def _process_pid(script_pid, index):
  """The pid of process `index` among launch/multiprocess.sh's children (from /proc)."""
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    except OSError:
      continue
    if ppid == script_pid and f"--config.distributed.process_id={index}".encode() in argv:
      return int(entry)
  raise AssertionError(f"no process {index} under {script_pid}")


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_resumes_bit_for_bit(straight, tmp_path_factory):
  root = tmp_path_factory.mktemp("preempted")
  run, logs = root / "run", root / "logs"
  proc = _launch(run, logs)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:  # training under way: its first checkpoint is written
    if _complete_steps(run):
      break
    time.sleep(0.05)
  try:
    os.kill(_process_pid(proc.pid, 1), signal.SIGTERM)  # one process only, as a spot VM's notice reaches one host
    sent = time.time()
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  stopped_in = time.time() - sent
  texts = [(logs / f"process_{i}.log").read_text() for i in (0, 1)]
  assert rc == 75, [t[-3000:] for t in texts]
  assert stopped_in < 30, f"both processes must stop within seconds, took {stopped_in:.0f}s"
  saved = max(_complete_steps(run))
  assert saved < STEPS, "the run ended before the notice took effect: raise STEPS"
  for text in texts:  # the same agreed step on both, said in the log
    assert f"step {saved} saved" in text and "preemption" in text, text[-3000:]
  assert not (run / "COMPLETED").exists() and not (run / "FAILED").exists()
  assert not [p for p in os.listdir(run / "checkpoints") if "tmp" in p]  # the save was final before the exit
  assert [r["step"] for r in _metrics(run)] == list(range(1, saved + 1))

  resumed_logs = root / "logs_resumed"
  _finish(_launch(run, resumed_logs), resumed_logs)
  assert f"resumed from step {saved}" in (resumed_logs / "process_0.log").read_text()
  assert (run / "COMPLETED").exists()
  a, b = _metrics(straight), _metrics(run)
  assert [r["step"] for r in a] == list(range(1, STEPS + 1)) == [r["step"] for r in b]
  assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact
  assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
  assert _metrics(straight, "eval.jsonl") == _metrics(run, "eval.jsonl")
  pa, pb = _params(straight, STEPS), _params(run, STEPS)
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)  # bitwise


def test_two_processes_equal_one_process_with_eight_devices(runs):
  a, c = _metrics(runs["straight"]), _metrics(runs["one"])
  assert [r["step"] for r in c] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in c], rtol=1e-6)
  ea, ec = _metrics(runs["straight"], "eval.jsonl"), _metrics(runs["one"], "eval.jsonl")
  assert [r["eval_tokens"] for r in ea] == [r["eval_tokens"] for r in ec]  # the same held-out rows
  np.testing.assert_allclose([r["eval_loss"] for r in ea], [r["eval_loss"] for r in ec], rtol=1e-6)
  pa, pc = _params(runs["straight"], STEPS), _params(runs["one"], STEPS)
  assert jax.tree.structure(pa) == jax.tree.structure(pc)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pc)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
