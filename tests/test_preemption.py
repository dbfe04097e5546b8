"""Preemption: a run asked to stop saves the step it is at, waits for the save, and ends resumable.

One process: SIGTERM sets a flag; at the next step boundary the loop saves that step (the NaN guard
first), waits for the save to be final, and ends the run with neither COMPLETED nor FAILED, exit status
75 (`loop.EXIT_PREEMPTED`); rerunning the same command resumes from that step and continues bit for
bit. Several processes (jax's preemption service, jax.distributed's sync point) are measured end to end
in tests/test_multihost.py; here, the launchers that pass the signal on: launch/multiprocess.sh (with a
stand-in interpreter), launch/gpu/slurm.sbatch (a stand-in srun) and launch/gpu/local.sh.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, subprocess_env, tiny_config
from emjax.train import batches as batches_lib
from emjax.train import checkpoint as ckpt_lib
from emjax.train import loop

EXIT_PREEMPTED = 75  # what the tests expect of emjax: sysexits' EX_TEMPFAIL, "try again"


def _metrics(workdir, name="metrics.jsonl"):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(line) for line in f]


def _params(workdir, step):
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _steps(workdir):
  """The finalised checkpoint steps (orbax lists no interrupted save)."""
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=10)
  try:
    return ck.steps()
  finally:
    ck.close()


class _SignalAt:
  """The run's grain batches; sends this process SIGTERM while producing the batch of step `at`."""

  def __init__(self, source, at: int):
    self._source, self._at, self._calls = source, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    self._calls += 1
    if self._calls == self._at:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self._source)

  def get_state(self):
    return self._source.get_state()

  def set_state(self, state):
    self._source.set_state(state)

  def close(self):
    self._source.close()


def _signal_at(step):
  def make(trainer, tokenizer):
    c = trainer.config
    return _SignalAt(batches_lib.GrainBatchSource(c.data, tokenizer, c.train.batch_size, seed=c.train.seed), step)
  return make


@pytest.fixture
def sigterm_guard():
  """Should the code under test not take SIGTERM, the signal must not end pytest: it is recorded here."""
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield received
  finally:
    signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- one process, in process


def test_sigterm_saves_the_next_step_then_resume_continues_bit_for_bit(tmp_path, one_device_mesh, sigterm_guard):
  config = tiny_config(steps=8)  # saves every 2 steps
  config.checkpoint.async_save = True  # the save on preemption is asynchronous too, and waited for
  straight = str(tmp_path / "straight")
  loop.train(config, straight, mesh=one_device_mesh, show_progress=False)

  run = str(tmp_path / "preempted")
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.Preempted) as e:  # SIGTERM while step 5 is prepared: step 5 saved, no further step
    loop.train(config, run, mesh=one_device_mesh, show_progress=False, make_batch_source=_signal_at(5),
               exit_on_preemption=False)
  assert e.value.step == 5 and e.value.saved
  assert signal.getsignal(signal.SIGTERM) is handler  # the run's own handler is gone with it
  assert not sigterm_guard  # the run took the signal
  assert _steps(run) == [2, 4, 5]  # finalised (the save was waited for); 5 is no multiple of every_steps
  assert not [p for p in os.listdir(os.path.join(run, "checkpoints")) if "tmp" in p]
  assert not os.path.exists(os.path.join(run, "COMPLETED")) and not os.path.exists(os.path.join(run, "FAILED"))
  assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5]

  final = loop.train(config, run, mesh=one_device_mesh, show_progress=False)  # the relaunch
  assert final["step"] == 8 and os.path.exists(os.path.join(run, "COMPLETED"))
  a, b = _metrics(straight), _metrics(run)
  assert [r["step"] for r in a] == list(range(1, 9)) == [r["step"] for r in b]
  assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact
  assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
  _assert_bitwise_equal(_params(straight, 8), _params(run, 8))


def test_sigterm_at_a_step_with_a_non_finite_gradient_saves_nothing_of_it(tmp_path, one_device_mesh, monkeypatch,
                                                                          sigterm_guard):
  from test_train import _poison_step  # pylint: disable=g-import-not-at-top
  config = tiny_config(steps=8)
  _poison_step(monkeypatch, at_step=3, grad_norm=True)
  with pytest.raises(loop.NonFiniteLossError) as e:  # the NaN guard comes before the save on preemption too
    loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False, make_batch_source=_signal_at(3),
               exit_on_preemption=False)
  assert "at step 3" in str(e.value) and "the last good checkpoint is step 2" in str(e.value)
  assert _steps(str(tmp_path)) == [2]
  assert not (tmp_path / "COMPLETED").exists()


def test_sigterm_on_the_last_step_completes_the_run(tmp_path, one_device_mesh, sigterm_guard):
  config = tiny_config(steps=4)
  final = loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False,
                     make_batch_source=_signal_at(4), exit_on_preemption=False)
  assert final["step"] == 4 and (tmp_path / "COMPLETED").exists()  # nothing was left to do: not "preempted"
  assert _steps(str(tmp_path)) == [2, 4]


# ----------------------------------------------------------------------------- one process, the command line


CLI_STEPS = 200  # tens of milliseconds a step: a window of seconds to send the signal in


def _cli(workdir):
  return [sys.executable, "-m", "emjax.main", "--config=configs/pretrain/tiny.py:smoke", f"--workdir={workdir}",
          "--noprogress", f"--config.train.steps={CLI_STEPS}", "--config.checkpoint.every_steps=50"]


@pytest.mark.slow  # end to end: three processes, one stopped by SIGTERM
def test_cli_sigterm_exits_75_resumable_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
  env = subprocess_env(1)
  straight, run = tmp_path / "straight", tmp_path / "preempted"
  subprocess.run(_cli(straight), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

  log = tmp_path / "preempted.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(_cli(run), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
  metrics = run / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:  # mid-run: a few steps logged, most to come
    if metrics.exists() and any(json.loads(l)["step"] >= 3 for l in metrics.read_text().splitlines() if l):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  sent = time.time()
  rc = proc.wait(timeout=120)
  text = log.read_text()
  assert rc == EXIT_PREEMPTED, text[-3000:]
  assert time.time() - sent < 30, "a preempted run must stop within a spot VM's notice"
  saved = max(_steps(run))
  assert 3 <= saved < CLI_STEPS, saved
  assert [r["step"] for r in _metrics(run)] == list(range(1, saved + 1))  # logged up to the saved step
  assert f"step {saved} saved" in text and "SIGTERM" in text
  assert "Traceback" not in text
  assert not (run / "COMPLETED").exists() and not (run / "FAILED").exists()

  resumed = subprocess.run(_cli(run), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved}" in resumed.stderr
  assert (run / "COMPLETED").exists()
  a, b = _metrics(straight), _metrics(run)
  assert [r["step"] for r in a] == list(range(1, CLI_STEPS + 1)) == [r["step"] for r in b]
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
  _assert_bitwise_equal(_params(straight, CLI_STEPS), _params(run, CLI_STEPS))


# ----------------------------------------------------------------------------- launchers, with stand-ins

# `python -m emjax.main` as a launcher sees it: process i (--config.distributed.process_id=i) writes its pid and
# "started"; FAKE_MODE=save: SIGTERM -> "saves" for a second, exits 75; ignore: ignores SIGTERM (a job that
# never reaches a sync point); preempted: exits 75 by itself (process 1 first), as after a preemption notice.
FAKE_JOB = """#!/usr/bin/env bash
id=0
for a in "$@"; do case "$a" in --config.distributed.process_id=*) id="${a#*=}" ;; esac; done
echo $$ > "$FAKE_DIR/pid_$id"
case "$FAKE_MODE" in
  save) trap 'sleep 1; echo saved > "$FAKE_DIR/saved_$id"; exit 75' TERM ;;
  ignore) trap '' TERM ;;
  preempted) sleep 0.5; [ "$id" = 1 ] || sleep 1; echo saved > "$FAKE_DIR/saved_$id"; exit 75 ;;
esac
echo started > "$FAKE_DIR/started_$id"
while true; do sleep 0.05; done
"""

# srun as the batch script sees it: SIGTERM makes the real srun kill its tasks (status 143 here); its tasks
# signalled through scancel (SIGUSR1 here) save and exit 75, which srun then returns.
FAKE_SRUN = """#!/usr/bin/env bash
echo $$ > "$FAKE_DIR/pid_srun"
echo "$@" > "$FAKE_DIR/srun_args"
trap 'echo TERM > "$FAKE_DIR/srun_term"; exit 143' TERM
trap 'echo saved > "$FAKE_DIR/saved_tasks"; exit 75' USR1
echo started > "$FAKE_DIR/started_srun"
while true; do sleep 0.05; done
"""

FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$@" > "$FAKE_DIR/scancel_args"
kill -USR1 "$(cat "$FAKE_DIR/pid_srun")"
"""


@pytest.fixture
def fakes(tmp_path):
  """A bin directory (a stand-in job, srun and nvidia-smi) and where they write; kills what they leave."""
  bin_dir, out = tmp_path / "bin", tmp_path / "out"
  bin_dir.mkdir()
  out.mkdir()
  for name, text in (("job", FAKE_JOB), ("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL),
                     ("nvidia-smi", "#!/bin/sh\necho 'GPU 0: fake (UUID: GPU-0)'\n")):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  yield dict(bin=bin_dir, out=out, job=str(bin_dir / "job"))
  for f in out.glob("pid_*"):
    try:
      os.kill(int(f.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def _env(fakes, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EMJAX_", "VIRTUAL_ENV", "DRY_RUN"))}
  env.update(PATH=f"{fakes['bin']}{os.pathsep}{os.environ['PATH']}", FAKE_DIR=str(fakes["out"]),
             PYTHON=fakes["job"], **extra)
  return env


def _wait_for(*paths, timeout=30):
  deadline = time.time() + timeout
  while not all(p.exists() for p in paths):
    assert time.time() < deadline, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
    time.sleep(0.02)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
    return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _multiprocess(fakes, mode, **extra):
  return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "multiprocess.sh"), "2", "1", "--config=c.py",
                           "--workdir=w"], cwd=ROOT, env=_env(fakes, FAKE_MODE=mode, EMJAX_COORDINATOR_PORT="1",
                                                              **extra),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_multiprocess_sigterm_reaches_every_process_and_waits_for_their_saves(fakes):
  out = fakes["out"]
  proc = _multiprocess(fakes, "save")
  _wait_for(out / "started_0", out / "started_1")
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == EXIT_PREEMPTED, stderr
  assert (out / "saved_0").exists() and (out / "saved_1").exists(), stderr  # before the script returned
  assert not any(_alive(int((out / f"pid_{i}").read_text())) for i in (0, 1))


def test_multiprocess_kills_processes_that_do_not_stop_within_the_grace_period(fakes):
  out = fakes["out"]
  proc = _multiprocess(fakes, "ignore", EMJAX_STOP_GRACE_S="1")
  _wait_for(out / "started_0", out / "started_1")
  start = time.time()
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGKILL, stderr
  assert time.time() - start < 15
  assert not any(_alive(int((out / f"pid_{i}").read_text())) for i in (0, 1))
  assert "SIGKILL" in stderr


def test_multiprocess_a_preempted_process_is_not_a_failure(fakes):
  proc = _multiprocess(fakes, "preempted")
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == EXIT_PREEMPTED, stderr
  assert "stopping the others" not in stderr and "preempt" in stderr
  assert (fakes["out"] / "saved_0").exists() and (fakes["out"] / "saved_1").exists()


def test_slurm_job_asks_for_an_early_sigterm_and_passes_it_to_every_task(fakes):
  script = os.path.join(ROOT, "launch", "gpu", "slurm.sbatch")
  with open(script) as f:
    assert "#SBATCH --signal=B:TERM@120\n" in f.read()
  out = fakes["out"]
  env = _env(fakes, SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="1")
  proc = subprocess.Popen(["bash", script, "--config=configs/pretrain/tiny.py", "--workdir=/shared/run"], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  _wait_for(out / "started_srun")
  proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the batch shell
  _, stderr = proc.communicate(timeout=30)
  assert (out / "scancel_args").read_text().split() == ["--signal=TERM", "4242"], stderr  # the steps' tasks
  assert not (out / "srun_term").exists(), stderr  # not srun: it would kill the tasks
  assert (out / "saved_tasks").exists()
  assert proc.returncode == EXIT_PREEMPTED, stderr  # the job's status is srun's
  assert "--kill-on-bad-exit=1" in (out / "srun_args").read_text()


def test_local_gpu_launcher_hands_sigterm_to_the_job(fakes):
  out = fakes["out"]
  proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "gpu", "local.sh"), "--no-install", "--",
                           "--config=configs/pretrain/tiny.py", "--workdir=/tmp/run"], cwd=ROOT,
                          env=_env(fakes, FAKE_MODE="save"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  _wait_for(out / "started_0")
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == EXIT_PREEMPTED, stderr
  assert (out / "saved_0").exists()


def test_only_the_training_loop_asks_jax_for_the_preemption_sync_point(tmp_path, monkeypatch):
  """jax's sync protocol takes the last step each process passed it as that process's position. orbax asks
  too, from its finalize thread with the step it finalises, which may be behind the loop's: the agreed
  step could then be one the loop has already passed. The Checkpointer leaves the question to the loop."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  asked = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step) or False)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3, async_save=True)
  state = {"w": jax.numpy.arange(8.0)}
  for step in (1, 2):
    ck.save(step, state, {"position": step})
  ck.close()
  assert ck.steps() == [1, 2] and asked == []
