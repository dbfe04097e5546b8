"""The launch paths: Cloud TPU slices (launch/tpu), SLURM and single-node GPUs (launch/gpu).

Dry runs (DRY_RUN=1) print every gcloud / sbatch / srun command: these tests read them back word by
word, with fake gcloud, sbatch, srun and nvidia-smi first on PATH that fail the test if a dry run
ever calls them. The commands the workers run (install, job, stop) are run here for real against
a fake home directory and interpreter. The detection of jax.distributed is checked last.
"""

import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from concurrent import futures

import pytest

from conftest import ROOT

TPU, GPU = os.path.join(ROOT, "launch", "tpu"), os.path.join(ROOT, "launch", "gpu")
EMJAX = ["--config=configs/pretrain/tiny.py", "--workdir=gs://bkt/runs/tiny"]
V5E = ["--name=emjax-v5e", "--zone=us-west4-a"]
V5P = ["--name=emjax-v5p", "--zone=us-east5-a"]
PYTHON = "/opt/venv/bin/python"  # the interpreter the GPU scripts are told to use (never run)


@pytest.fixture
def tools(tmp_path):
  """A PATH whose gcloud, sbatch, srun and nvidia-smi record that they were called and fail."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  called = tmp_path / "called"
  for name in ("gcloud", "sbatch", "srun", "nvidia-smi"):
    tool = bin_dir / name
    tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {called}\nexit 97\n')
    tool.chmod(0o755)
  return dict(path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", called=called)


def launch(tools, script, *args, dry=True, extra_env=None):
  """Runs a launch script; returns (status, [commands printed, as argv lists], stderr)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EMJAX_", "VIRTUAL_ENV", "DRY_RUN"))}
  env.update(PATH=tools["path"], PYTHON=PYTHON)
  if dry:
    env["DRY_RUN"] = "1"
  env.update(extra_env or {})
  proc = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert not tools["called"].exists(), f"a dry run ran {tools['called'].read_text()}"
  return proc.returncode, [shlex.split(line) for line in proc.stdout.splitlines()], proc.stderr


def ok(tools, script, *args, **kwargs):
  status, commands, stderr = launch(tools, script, *args, **kwargs)
  assert status == 0, stderr
  return commands, stderr


def option(command, name):
  """The value of --name=VALUE in an argv list (exactly one)."""
  values = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, command)
  return values[0]


# ----------------------------------------------------------------------------- Cloud TPU: run.sh


def test_v5e_16_run_requests_a_spot_slice_sets_up_every_worker_and_starts_the_job(tools):
  commands, stderr = ok(tools, f"{TPU}/run.sh", *V5E, "--type=v5litepod-16", "--", *EMJAX)
  assert "v5litepod-16: 16 chips, 4 workers, runtime v2-alpha-tpuv5-lite, tier spot" in stderr
  describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", "emjax-v5e", "--zone=us-west4-a",
              "--format=value(state.state)"]
  tar, scp, install, job = commands[3:]
  assert commands[:3] == [
      describe,  # none yet (a dry run reads nothing): create it, then wait for ACTIVE
      ["gcloud", "compute", "tpus", "queued-resources", "create", "emjax-v5e", "--node-id=emjax-v5e",
       "--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
      describe,
  ]
  # This working tree, packed and copied to every worker.
  assert tar[:4] == ["tar", "-C", ROOT, "--null"] and tar[6] == "-czf" and tar[7].endswith("/emjax.tgz")
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[7], "emjax-v5e:emjax.tgz", "--zone=us-west4-a",
                 "--worker=all"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "emjax-v5e", "--zone=us-west4-a", "--worker=all"]
  assert install[:-1] == ssh and job[:-1] == ssh
  install_cmd, job_cmd = option(install, "command"), option(job, "command")
  assert "rm -rf $HOME/emjax && mkdir -p $HOME/emjax && tar -xzf $HOME/emjax.tgz -C $HOME/emjax" in install_cmd
  assert install_cmd.endswith('$HOME/emjax-venv/bin/python -m pip install -q -e "$HOME/emjax[tpu]"')
  # Four workers: jax.distributed on; the job detached, its log and pid in the home directory.
  assert ("EMJAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 nohup $HOME/emjax-venv/bin/python -m emjax.main "
          "--config=configs/pretrain/tiny.py --workdir=gs://bkt/runs/tiny >$HOME/emjax-job.log 2>&1 </dev/null & "
          "echo $! >$HOME/emjax-job.pid") in job_cmd
  assert job_cmd.startswith("set -m; p=$(cat $HOME/emjax-job.pid")  # an earlier job is stopped first


def test_v5p_64_is_32_chips_on_8_workers_and_takes_project_tier_git_and_extras(tools):
  commands, stderr = ok(tools, f"{TPU}/run.sh", *V5P, "--project=my-proj", "--type=v5p-64", "--tier=best-effort",
                        "--git=https://github.com/me/emjax.git", "--ref=v1.2", "--extras=tpu,wandb", "--",
                        "--config=configs/pretrain/llama_1b.py", "--workdir=gs://bkt/runs/1b", "--config.train.steps=5")
  # v5p-N counts TensorCores: 64 cores = 32 chips, 4 chips per host.
  assert "v5p-64: 32 chips, 8 workers, runtime v2-alpha-tpuv5, tier best-effort" in stderr
  assert commands[1] == [
      "gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "emjax-v5p", "--node-id=emjax-v5p",
      "--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
      "--best-effort"]
  assert all("--project=my-proj" in c and "--zone=us-east5-a" in c for c in commands)
  assert [c[0] for c in commands] == ["gcloud"] * 5  # describe, create, describe, install, job: no tar, no scp
  install, job = option(commands[3], "command"), option(commands[4], "command")
  assert install.startswith("set -e; rm -rf $HOME/emjax && git clone -q https://github.com/me/emjax.git "
                            "$HOME/emjax && git -C $HOME/emjax checkout -q v1.2;")
  assert install.endswith('-m pip install -q -e "$HOME/emjax[tpu,wandb]"')
  assert ("EMJAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 nohup $HOME/emjax-venv/bin/python -m emjax.main "
          "--config=configs/pretrain/llama_1b.py --workdir=gs://bkt/runs/1b --config.train.steps=5 >") in job


def test_until_done_polls_the_slice_the_workdir_markers_and_the_job(tools):
  commands, stderr = ok(tools, f"{TPU}/run.sh", *V5E, "--type=v5litepod-16", "--until-done", "--poll=60",
                        "--no-setup", "--", *EMJAX)
  assert "every 60s --until-done" in stderr
  launched = 4  # describe, create, describe, job (no setup)
  assert " nohup " in option(commands[launched - 1], "command")
  assert commands[launched:] == [
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "emjax-v5e", "--zone=us-west4-a",
       "--format=value(state.state)"],
      ["gcloud", "storage", "ls", "gs://bkt/runs/tiny/COMPLETED"],
      ["gcloud", "storage", "ls", "gs://bkt/runs/tiny/FAILED"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "emjax-v5e", "--zone=us-west4-a", "--worker=0",
       "--command=p=$(cat $HOME/emjax-job.pid 2>/dev/null) && kill -0 -- -$p 2>/dev/null"],
  ]


def test_a_one_host_slice_runs_one_process_and_may_use_its_own_disk(tools):
  commands, stderr = ok(tools, f"{TPU}/run.sh", *V5E, "--type=v5litepod-8", "--no-setup", "--follow", "--",
                        "--config=configs/pretrain/tiny.py", "--workdir=runs/tiny")
  assert "v5litepod-8: 8 chips, 1 workers" in stderr
  assert "EMJAX_DISTRIBUTED=0 " in option(commands[-2], "command")
  assert commands[-1][-2:] == ["--worker=0", "--command=tail -n +1 -F --pid=$(cat $HOME/emjax-job.pid) "
                                             "$HOME/emjax-job.log"]


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--type=v5p-8", "--", *EMJAX], "missing --name=NAME"),
    (["--name=a", "--type=v5p-8", "--", *EMJAX], "missing --zone=ZONE"),
    (["--name=a", "--zone=z", "--", *EMJAX], "missing --type=ACCELERATOR_TYPE"),
    (["--name=a", "--zone", "z", "--type=v5p-8", "--", *EMJAX], "--zone needs a value: --zone=VALUE"),
    (["--name=a", "--zone=z", "--type=v5p-8", "--workers=2", "--", *EMJAX], "unknown option --workers=2"),
    (["--name=a", "--zone=z", "--type=v5p-8"], "no emjax flags"),
    (["--name=a", "--zone=z", "--type=v5p-8", "--", "--workdir=w"], "the emjax flags have no --config=FILE"),
    (["--name=a", "--zone=z", "--type=v5p-8", "--", "--config=c"], "the emjax flags have no --workdir=DIR"),
    (["--name=a", "--zone=z", "--type=v5litepod-16", "--", "--config=c", "--workdir=/tmp/run"],
     "--workdir=/tmp/run: a slice of 4 workers needs a workdir in a bucket (--workdir=gs://BUCKET/PATH)"),
    (["--name=a", "--zone=z", "--type=v5p-60", "--", *EMJAX], "--type=v5p-60: v5p sizes count TensorCores"),
    (["--name=a", "--zone=z", "--type=v5litepod-12", "--", *EMJAX], "--type=v5litepod-12: v5litepod slices have"),
    (["--name=a", "--zone=z", "--type=v3-8", "--", *EMJAX], "--type=v3-8: unsupported TPU family v3"),
    (["--name=a", "--zone=z", "--type=v5p-8", "--tier=cheap", "--", *EMJAX], "--tier=cheap: expected spot"),
    (["--name=A_1", "--zone=z", "--type=v5p-8", "--", *EMJAX], "--name=A_1: lowercase letters"),
    (["--name=a", "--zone=z", "--type=v5p-8", "--poll=0", "--", *EMJAX], "--poll=0: expected a positive integer"),
    (["--name=a", "--zone=z", "--type=v5p-8", "--ref=main", "--", *EMJAX], "--ref=main needs --git=URL"),
])
def test_run_refuses_bad_arguments_by_name_before_any_command(tools, args, message):
  for dry in (True, False):  # a real run refuses them too, before calling gcloud (the fake would record it)
    status, commands, stderr = launch(tools, f"{TPU}/run.sh", *args, dry=dry)
    assert status == 2 and message in stderr, stderr
    if not dry:
      assert commands == []


def test_dry_run_must_be_0_or_1(tools):
  status, _, stderr = launch(tools, f"{TPU}/create.sh", *V5E, "--type=v5p-8", extra_env={"DRY_RUN": "yes"})
  assert status == 2 and "DRY_RUN=yes: expected 1 (print the commands) or 0 (run them)" in stderr


# ----------------------------------------------------------------------------- Cloud TPU: the other scripts


def test_create_stop_logs_delete_and_ssh(tools):
  gflags = ["--zone=us-east5-a", "--project=p"]
  assert ok(tools, f"{TPU}/create.sh", *V5P, "--project=p", "--type=v5p-64", "--runtime=v2-alpha-tpuv5-custom",
            "--tier=reserved")[0] == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "emjax-v5p", "--node-id=emjax-v5p", *gflags,
       "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5-custom", "--reserved"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "emjax-v5p", *gflags, "--format=value(state.state)"]]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "emjax-v5p", *gflags]
  (stop,) = ok(tools, f"{TPU}/stop.sh", *V5P, "--project=p")[0]
  assert stop[:-1] == [*ssh, "--worker=all"] and "kill -INT -- -$p" in option(stop, "command")
  assert ok(tools, f"{TPU}/logs.sh", *V5P, "--project=p")[0] == [
      [*ssh, "--worker=0", "--command=tail -n +1 -F $HOME/emjax-job.log"]]
  assert ok(tools, f"{TPU}/logs.sh", *V5P, "--project=p", "--worker=all", "--no-follow")[0] == [
      [*ssh, "--worker=all", "--command=cat $HOME/emjax-job.log"]]
  assert ok(tools, f"{TPU}/delete.sh", *V5P, "--project=p")[0] == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "emjax-v5p", *gflags, "--force", "--quiet"]]
  assert ok(tools, f"{TPU}/ssh.sh", *V5P, "--project=p", "--worker=3", "--", "df", "-h")[0] == [
      [*ssh, "--worker=3", "--command=df -h"]]


@pytest.mark.parametrize("script", ["tpu/run.sh", "tpu/create.sh", "tpu/setup.sh", "tpu/logs.sh", "tpu/stop.sh",
                                    "tpu/delete.sh", "tpu/ssh.sh", "gpu/submit.sh", "gpu/local.sh"])
def test_help_prints_the_usage(script):
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--help"], capture_output=True, text=True,
                        timeout=30)
  assert proc.returncode == 0 and proc.stdout.startswith(f"usage: bash launch/{script}"), proc.stdout + proc.stderr


def _remote_env(home, tools):
  return {"HOME": str(home), "PATH": tools["path"]}


def test_the_workers_install_command_runs_as_printed(tools, tmp_path):
  """setup.sh's install command, run by bash here: the tarball unpacked, a venv made, emjax pip-installed."""
  home = tmp_path / "home"
  home.mkdir()
  with tarfile.open(home / "emjax.tgz", "w:gz") as tar:
    tar.add(os.path.join(ROOT, "pyproject.toml"), arcname="pyproject.toml")
  # A stand-in interpreter: `-m venv DIR` makes DIR/bin/python, which logs what pip is asked to do.
  fakepy = tmp_path / "bin" / "fakepy3"
  fakepy.write_text('#!/bin/bash\nset -e\n[ "$1 $2" = "-m venv" ]\nmkdir -p "$3/bin"\n'
                    'printf \'#!/bin/bash\\necho "$*" >> %s/pip.log\\n\' "$HOME" > "$3/bin/python"\n'
                    'chmod +x "$3/bin/python"\n')
  fakepy.chmod(0o755)
  (home / "emjax").mkdir()
  (home / "emjax" / "stale.py").write_text("")  # a previous checkout's file: gone after the setup
  commands, _ = ok(tools, f"{TPU}/setup.sh", *V5E, "--python=fakepy3", "--extras=tpu,wandb")
  install = option(commands[-1], "command")
  subprocess.run(["bash", "-c", install], env=_remote_env(home, tools), check=True, timeout=30)
  assert os.listdir(home / "emjax") == ["pyproject.toml"]
  assert (home / "pip.log").read_text().splitlines() == [
      "-m pip install -q --upgrade pip", f"-m pip install -q -e {home}/emjax[tpu,wandb]"]
  # Run again (a re-setup): the venv is kept, the checkout replaced.
  subprocess.run(["bash", "-c", install], env=_remote_env(home, tools), check=True, timeout=30)
  assert len((home / "pip.log").read_text().splitlines()) == 4


def _running_in_group(pgid):
  """The pids of process group `pgid` that are not zombies (/proc/<pid>/stat: state, then pgrp)."""
  out = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if int(fields[2]) == pgid and fields[0] != "Z":
      out.append(int(entry))
  return out


def test_the_workers_job_and_stop_commands_run_as_printed(tools, tmp_path):
  """run.sh's job command starts the job detached with its flags; stop.sh's command stops its process group."""
  home = tmp_path / "home"
  (home / "emjax").mkdir(parents=True)
  (home / "emjax-venv" / "bin").mkdir(parents=True)
  job_python = home / "emjax-venv" / "bin" / "python"
  # The job: records its directory, environment and flags, then runs a child in its process group.
  job_python.write_text('#!/bin/bash\necho "$PWD $EMJAX_DISTRIBUTED $*" > "$HOME/args"\nsleep 60\necho done\n')
  job_python.chmod(0o755)
  commands, _ = ok(tools, f"{TPU}/run.sh", *V5E, "--type=v5litepod-16", "--no-setup", "--", *EMJAX)
  job = option(commands[-1], "command")
  (stop,) = ok(tools, f"{TPU}/stop.sh", *V5E)[0]
  env = _remote_env(home, tools)
  start = time.time()
  subprocess.run(["bash", "-c", job], env=env, check=True, timeout=20)
  assert time.time() - start < 10  # detached: the ssh command returns while the job runs
  pid = int((home / "emjax-job.pid").read_text())
  try:
    deadline = time.time() + 10
    while not (home / "args").exists() and time.time() < deadline:
      time.sleep(0.05)
    assert (home / "args").read_text().split() == [str(home / "emjax"), "1", "-m", "emjax.main", *EMJAX]
    assert os.getpgid(pid) == pid  # its own process group: stop signals all of it
    subprocess.run(["bash", "-c", option(stop, "command")], env=env, check=True, timeout=30)
    assert not (home / "emjax-job.pid").exists()
    # Stopped: no process of the group runs (exited ones may wait as zombies for a slow parent to reap them).
    assert _running_in_group(pid) == []
  finally:
    try:
      os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _gcloud_commands(tools):
  """Every distinct gcloud command line the TPU scripts print."""
  runs = [
      (f"{TPU}/run.sh", *V5E, "--project=p", "--type=v5litepod-16", "--until-done", "--", *EMJAX),
      (f"{TPU}/run.sh", *V5P, "--type=v5p-64", "--tier=best-effort", "--git=https://x/e.git", "--follow", "--", *EMJAX),
      (f"{TPU}/create.sh", *V5P, "--type=v5p-64", "--tier=reserved"),
      (f"{TPU}/stop.sh", *V5P), (f"{TPU}/logs.sh", *V5P), (f"{TPU}/delete.sh", *V5P),
  ]
  out = {}
  for args in runs:
    for c in ok(tools, *args)[0]:
      if c[0] == "gcloud":
        out[tuple(a for a in c[:6] if not a.startswith("-"))] = c  # one per command, e.g. (gcloud, compute, tpus, ...)
  return list(out.values())


@pytest.mark.skipif(shutil.which("gcloud") is None or os.environ.get("EMJAX_TEST_GCLOUD") != "1",
                    reason="needs the Google Cloud SDK and EMJAX_TEST_GCLOUD=1 (each gcloud start takes seconds)")
def test_every_printed_gcloud_command_parses_with_the_installed_sdk(tools, tmp_path):
  """The real gcloud, without an account: each command gets as far as asking for credentials,
  i.e. its subcommand, flags and arguments all parse (a misspelt flag is a usage error instead).
  Nothing reaches the network: no account, a fresh CLOUDSDK_CONFIG and HOME."""
  gcloud = shutil.which("gcloud")
  commands = _gcloud_commands(tools)
  assert len(commands) >= 9, commands
  (tmp_path / "h").mkdir()
  env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "h"), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
         "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
         "CLOUDSDK_CORE_PROJECT": "emjax-test"}

  def parse(command):
    proc = subprocess.run([gcloud, *command[1:]], env=env, capture_output=True, text=True, timeout=120)
    return command, proc.returncode, proc.stderr

  with futures.ThreadPoolExecutor(4) as pool:
    for command, status, stderr in pool.map(parse, commands):
      assert status != 0 and "gcloud config set account" in stderr, (command, stderr[-1500:])


# ----------------------------------------------------------------------------- GPUs: SLURM and one node


def test_submit_asks_sbatch_for_nodes_gpus_and_tasks(tools):
  common = ["--job-name=emjax", "--nodes=2", "--gpus-per-node=8"]
  tail = [f"--chdir={ROOT}", f"--export=ALL,EMJAX_ROOT={ROOT},EMJAX_PROCESS_PER=node,PYTHON={PYTHON}",
          f"{GPU}/slurm.sbatch", *EMJAX]
  (sbatch,), stderr = ok(tools, f"{GPU}/submit.sh", "--nodes=2", "--gpus-per-node=8", "--partition=gpu",
                         "--time=04:00:00", "--sbatch-arg=--exclusive", "--", *EMJAX)
  assert sbatch == ["sbatch", *common, "--ntasks-per-node=1", "--partition=gpu", "--time=04:00:00", "--exclusive",
                    *tail]
  assert "2 nodes x 8 GPUs, 2 processes (one per node)" in stderr
  (sbatch,), stderr = ok(tools, f"{GPU}/submit.sh", "--nodes=2", "--gpus-per-node=8", "--per-gpu", "--", *EMJAX)
  assert sbatch == ["sbatch", *common, "--ntasks-per-node=8", *[t.replace("=node,", "=gpu,") for t in tail]]
  assert "16 processes (one per gpu)" in stderr


def slurm_job(tools, extra_env, *args):
  env = {"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": ROOT, **extra_env}
  return launch(tools, f"{GPU}/slurm.sbatch", *(args or EMJAX), extra_env=env)


def test_slurm_one_process_per_node_owns_its_gpus_and_initialises_jax_distributed(tools):
  status, (command,), stderr = slurm_job(tools, {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"})
  assert status == 0, stderr
  assert command == ["env", "JAX_PLATFORMS=cuda", "PYTHONUNBUFFERED=1", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
                     "EMJAX_DISTRIBUTED=1", "srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                     "--kill-on-bad-exit=1", PYTHON, "-m", "emjax.main", *EMJAX]
  assert "SLURM job 4242: 2 nodes x 8 GPUs, 2 processes (one per node)" in stderr


def test_slurm_one_process_per_gpu_leaves_jax_one_gpu_per_task(tools):
  status, (command,), stderr = slurm_job(
      tools, {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "h100:4", "EMJAX_PROCESS_PER": "gpu"})
  assert status == 0, stderr
  # JAX_LOCAL_DEVICE_IDS unset: jax.distributed takes SLURM_LOCALID as each task's GPU.
  assert command == ["env", "-u", "JAX_LOCAL_DEVICE_IDS", "JAX_PLATFORMS=cuda", "PYTHONUNBUFFERED=1",
                     "EMJAX_DISTRIBUTED=1", "srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4",
                     "--kill-on-bad-exit=1", PYTHON, "-m", "emjax.main", *EMJAX]


def test_slurm_one_node_one_gpu_is_a_single_process(tools):
  status, (command,), _ = slurm_job(tools, {"SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "1"})
  assert status == 0
  assert "EMJAX_DISTRIBUTED=0" in command and "--ntasks=1" in command and "JAX_LOCAL_DEVICE_IDS=0" in command


@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_ID": ""}, "SLURM_JOB_ID is not set"),
    ({"SLURM_JOB_NUM_NODES": "2"}, "cannot tell the GPUs per node"),
    ({"SLURM_GPUS_ON_NODE": "8", "EMJAX_PROCESS_PER": "socket"}, "EMJAX_PROCESS_PER=socket: expected node"),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": "/nonexistent"}, "/nonexistent is not the emjax repository"),
])
def test_slurm_refuses_what_it_cannot_run_by_name(tools, env, message):
  status, commands, stderr = slurm_job(tools, env)
  assert status == 2 and message in stderr and commands == [], stderr


def test_submit_and_local_refuse_bad_arguments(tools):
  for script, args, message in [
      (f"{GPU}/submit.sh", ["--nodes=2", "--", *EMJAX], "missing --gpus-per-node=G"),
      (f"{GPU}/submit.sh", ["--nodes=0", "--gpus-per-node=8", "--", *EMJAX], "--nodes=0: expected a positive integer"),
      (f"{GPU}/submit.sh", ["--gpus-per-node=8", "--partition", "gpu", "--", *EMJAX], "--partition needs a value"),
      (f"{GPU}/local.sh", ["--gpus=0,x", "--", *EMJAX], "--gpus=0,x: expected GPU indices"),
      (f"{GPU}/local.sh", ["--", "--config=c"], "the emjax flags have no --workdir=DIR"),
  ]:
    status, commands, stderr = launch(tools, script, *args)
    assert status == 2 and message in stderr and commands == [], (script, args, stderr)



@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_local_without_a_driver_stops_before_installing_anything(tools):
  (tools["called"].parent / "bin" / "nvidia-smi").unlink()  # no driver at all
  status, _, stderr = launch(tools, f"{GPU}/local.sh", "--", *EMJAX, dry=False)
  assert status == 2 and "no NVIDIA driver here (nvidia-smi not found)" in stderr


def test_local_runs_one_process_on_this_machines_gpus(tools):
  assert ok(tools, f"{GPU}/local.sh", "--", *EMJAX)[0] == [
      ["env", "JAX_PLATFORMS=cuda", "EMJAX_DISTRIBUTED=0", PYTHON, "-m", "emjax.main", *EMJAX]]
  assert ok(tools, f"{GPU}/local.sh", "--gpus=2,3", "--", *EMJAX)[0] == [
      ["env", "JAX_PLATFORMS=cuda", "EMJAX_DISTRIBUTED=0", "CUDA_VISIBLE_DEVICES=2,3", PYTHON, "-m", "emjax.main",
       *EMJAX]]


# ----------------------------------------------------------------------------- jax.distributed detection


@pytest.fixture
def initialize_calls(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  for name in ("EMJAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  return calls


@pytest.mark.parametrize("env, called", [
    ({}, False),  # one process: never waits for a coordinator
    ({"EMJAX_DISTRIBUTED": "1"}, True),  # launch/tpu/run.sh on a multi-worker slice, slurm.sbatch
    ({"EMJAX_DISTRIBUTED": "0", "SLURM_NTASKS": "4"}, False),  # launch/gpu/local.sh inside an allocation
    ({"SLURM_NTASKS": "2"}, True),
    ({"SLURM_NTASKS": "1"}, False),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
])
def test_jax_distributed_follows_emjax_distributed_then_the_cluster(initialize_calls, monkeypatch, env, called):
  from emjax import sharding
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  sharding.maybe_initialize_distributed({})
  assert initialize_calls == ([{}] if called else [])  # no arguments: JAX detects the cluster (TPU metadata, SLURM)


def test_emjax_distributed_takes_only_0_or_1(initialize_calls, monkeypatch):
  from emjax import sharding
  monkeypatch.setenv("EMJAX_DISTRIBUTED", "yes")
  with pytest.raises(ValueError, match=r"EMJAX_DISTRIBUTED='yes': expected 1"):
    sharding.maybe_initialize_distributed({})
  assert initialize_calls == []
