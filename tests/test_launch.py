"""The launch paths: Cloud TPU slices (launch/tpu), SLURM and single-node GPUs (launch/gpu).

Dry runs (DRY_RUN=1) print every gcloud / sbatch / srun command: these tests read them back word by
word, with fake gcloud, sbatch, srun and nvidia-smi first on PATH that fail the test if a dry run
ever calls them. The commands the workers run (install, job, stop) are run here for real against
a fake home directory and interpreter. run.sh's relaunches (--until-done, a changed tree, a local
workdir) run for real against a fake cloud: a gcloud that keeps a slice's state in a file, a bucket
in a directory and runs each ssh command here. The detection of jax.distributed is checked last.
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


@pytest.fixture(autouse=True)
def sigint_reaches_the_jobs():
  """The jobs these tests start are stopped with SIGINT, as stop.sh stops a real one. A test process that
  ignores SIGINT (the suite started with `cmd &` from a non-interactive shell inherits it so) would pass
  that on to every child, which then outlives its stop command: here SIGINT is caught while a test runs,
  and an exec resets a caught signal to its default."""
  before = signal.getsignal(signal.SIGINT)
  if before == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  if before == signal.SIG_IGN:
    signal.signal(signal.SIGINT, before)

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
  recorded, tar, upload, record, install, job = commands[3:]
  assert commands[:3] == [
      describe,  # none yet (a dry run reads nothing): create it, then wait for ACTIVE
      ["gcloud", "compute", "tpus", "queued-resources", "create", "emjax-v5e", "--node-id=emjax-v5e",
       "--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
      describe,
  ]
  # The run's first launch (the workdir records no code yet): this working tree and its version record,
  # packed and stored in the workdir; every worker fetches that archive from there.
  code = "gs://bkt/runs/tiny/code"
  assert recorded == ["gcloud", "storage", "cat", f"{code}/version.txt"]
  pack = os.path.dirname(tar[2])
  assert tar == ["tar", "-czf", f"{pack}/emjax.tgz", "-C", pack, ".emjax-version", "-C", ROOT, "--null", "-T",
                 f"{pack}/files"]
  assert upload == ["gcloud", "storage", "cp", f"{pack}/emjax.tgz", f"{code}/emjax.tgz"]
  assert record == ["gcloud", "storage", "cp", f"{pack}/.emjax-version", f"{code}/version.txt"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "emjax-v5e", "--zone=us-west4-a", "--worker=all"]
  assert install[:-1] == ssh and job[:-1] == ssh
  install_cmd, job_cmd = option(install, "command"), option(job, "command")
  assert install_cmd.startswith("set -e; p=$(cat $HOME/emjax-job.pid")  # an earlier job is stopped before setup
  assert (f"; {{ gcloud storage cp {code}/emjax.tgz $HOME/emjax.tgz && rm -rf $HOME/emjax && mkdir -p $HOME/emjax && "
          "tar -xzf $HOME/emjax.tgz -C $HOME/emjax; } || exit 1;") in install_cmd
  assert install_cmd.endswith('$HOME/emjax-venv/bin/python -m pip install -q -e "$HOME/emjax[tpu]"')
  # Four workers: jax.distributed on; the job detached, its log (which starts with the code's version
  # record) and pid in the home directory.
  assert ("cd $HOME/emjax || exit 1; { echo \"emjax code ($HOME/emjax/.emjax-version):\"; cat .emjax-version "
          "2>/dev/null || echo unrecorded; } >$HOME/emjax-job.log; EMJAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 nohup "
          "$HOME/emjax-venv/bin/python -m emjax.main --config=configs/pretrain/tiny.py --workdir=gs://bkt/runs/tiny "
          ">>$HOME/emjax-job.log 2>&1 </dev/null & echo $! >$HOME/emjax-job.pid") in job_cmd
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
  slice_commands = [c for c in commands if "compute" in c[:3]]
  assert len(slice_commands) == 5  # describe, create, describe, install, job: no tar, no scp
  assert all("--project=my-proj" in c and "--zone=us-east5-a" in c for c in slice_commands)
  # The run's first launch: the commit of v1.2 (a dry run asks nobody: v1.2 itself) is recorded in the workdir.
  assert commands[3] == ["gcloud", "storage", "cat", "gs://bkt/runs/1b/code/version.txt"]
  assert commands[4] == ["git", "ls-remote", "https://github.com/me/emjax.git", "v1.2"]
  assert commands[5][:3] == ["gcloud", "storage", "cp"] and commands[5][4] == "gs://bkt/runs/1b/code/version.txt"
  install, job = option(commands[6], "command"), option(commands[7], "command")
  assert install.startswith("set -e; p=$(cat $HOME/emjax-job.pid")
  assert ("; { rm -rf $HOME/emjax && git clone -q https://github.com/me/emjax.git $HOME/emjax && "
          "git -C $HOME/emjax checkout -q v1.2 && printf 'commit=%s\\ndirty=0\\nsource=%s\\n' "
          "\"$(git -C $HOME/emjax rev-parse HEAD)\" https://github.com/me/emjax.git >$HOME/emjax/.emjax-version; } || exit 1;") in install
  assert install.endswith('-m pip install -q -e "$HOME/emjax[tpu,wandb]"')
  assert ("EMJAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 nohup $HOME/emjax-venv/bin/python -m emjax.main "
          "--config=configs/pretrain/llama_1b.py --workdir=gs://bkt/runs/1b --config.train.steps=5 >") in job


def test_until_done_polls_the_slice_the_workdir_markers_and_the_job(tools):
  commands, stderr = ok(tools, f"{TPU}/run.sh", *V5E, "--type=v5litepod-16", "--until-done", "--poll=60",
                        "--no-setup", "--", *EMJAX)
  assert "every 60s --until-done" in stderr
  # describe, create, describe, then the setup all the same (--no-setup: a slice run.sh creates is new), the job
  launched = [i for i, c in enumerate(commands) if " nohup " in c[-1]][0] + 1
  assert "emjax-v5e is new: setting it up" in stderr
  # The markers first (a finished run is done whatever became of its slice), then the slice, then the job.
  assert commands[launched:] == [
      ["gcloud", "storage", "ls", "gs://bkt/runs/tiny/COMPLETED"],
      ["gcloud", "storage", "ls", "gs://bkt/runs/tiny/FAILED"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "emjax-v5e", "--zone=us-west4-a",
       "--format=value(state.state)"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "emjax-v5e", "--zone=us-west4-a", "--worker=0",
       "--command=if p=$(cat $HOME/emjax-job.pid 2>/dev/null) && kill -0 -- -$p 2>/dev/null; "
       "then echo emjax-job-running; else echo emjax-job-stopped; fi"],
  ]


def test_a_one_host_slice_runs_one_process_and_may_use_its_own_disk(tools):
  commands, stderr = ok(tools, f"{TPU}/run.sh", *V5E, "--type=v5litepod-8", "--no-setup", "--follow", "--",
                        "--config=configs/pretrain/tiny.py", "--workdir=runs/tiny")
  assert "v5litepod-8: 8 chips, 1 workers" in stderr
  # A relative workdir lives outside the checkout (~/emjax), which every setup replaces.
  assert "EMJAX_DISTRIBUTED=0 " in option(commands[-2], "command")
  assert " --workdir=$HOME/emjax-runs/runs/tiny >>" in option(commands[-2], "command")
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


# ----------------------------------------------------------------------------- Cloud TPU: relaunches, for real

# A fake cloud for run.sh without DRY_RUN: gcloud keeps the queued resource's state in a file, a bucket in a
# directory (gs://X -> gcs/X, with gcloud storage's "matched no objects" errors) and runs every ssh command
# with bash here, in a fake home that stands for the slice's worker(s) and is wiped when the slice is deleted.
# The workers' interpreter (made by `fakepy3 -m venv`) logs pip installs and plays the job: launch N runs line
# N of `plan` (shell code: run SECONDS, complete, preempt, fault 'GLOB'), after noting what it resumes from.
# `fault 'GLOB'` makes the next gcloud call whose arguments match GLOB fail once, as a dropped connection would.
_FAKE_GCLOUD = r"""#!/bin/bash
exec 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-
F="$FAKE"
echo "$*" >> "$F/gcloud.log"
if [ -f "$F/faults" ]; then
  n=0
  while IFS= read -r pat; do
    n=$((n + 1))
    # shellcheck disable=SC2053
    if [[ "$*" == $pat ]]; then
      sed -i "${n}d" "$F/faults"
      echo "ERROR: (gcloud) connection reset by peer" >&2
      if [[ "$*" == *" ssh "* ]]; then exit 255; fi
      exit 1
    fi
  done < "$F/faults"
fi
flag() { local a; for a in "${ARGS[@]}"; do case "$a" in --$1=*) echo "${a#*=}"; return ;; esac; done; }
gs() { case "$1" in gs://*) echo "$F/gcs/${1#gs://}" ;; *) echo "$1" ;; esac; }
ARGS=("$@")
if [ "$1" = storage ]; then
  case "$2" in
    ls) if [ -e "$(gs "$3")" ]; then echo "$3"; exit 0; fi
        echo "ERROR: (gcloud.storage.ls) One or more URLs matched no objects." >&2; exit 1 ;;
    cat) if [ -f "$(gs "$3")" ]; then cat "$(gs "$3")"; exit 0; fi
         echo "ERROR: (gcloud.storage.cat) The following URLs matched no objects or files:" >&2; exit 1 ;;
    cp) src="$(gs "$3")" dst="$(gs "$4")"
        [ -f "$src" ] || { echo "ERROR: (gcloud.storage.cp) The following URLs matched no objects or files:" >&2; exit 1; }
        mkdir -p "$(dirname "$dst")" && cp "$src" "$dst"; exit ;;
  esac
  exit 99
fi
case "$1 $2 $3 $4" in
  "compute tpus queued-resources describe")
    if [ -f "$F/state" ]; then cat "$F/state"; exit 0; fi
    echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource 'x' was not found" >&2; exit 1 ;;
  "compute tpus queued-resources create") echo ACTIVE > "$F/state"; flag accelerator-type > "$F/type" ;;
  "compute tpus queued-resources delete")
    p="$(cat "$F/home/emjax-job.pid" 2>/dev/null)" && kill -KILL -- "-$p" 2>/dev/null
    rm -f "$F/state"; rm -rf "$F/home"; mkdir "$F/home" ;;
  "compute tpus tpu-vm describe") cat "$F/type" ;;
  "compute tpus tpu-vm scp") cp "$5" "$F/home/${6#*:}" ;;
  "compute tpus tpu-vm ssh") cd "$F/home" && HOME="$F/home" exec bash -c "$(flag command)" ;;
  *) exit 98 ;;
esac
"""

_FAKE_WORKER_PYTHON = r"""#!/bin/bash
if [ "$2" = pip ]; then echo "pip ${*: -1}" >> "$FAKE/events"; exit 0; fi
w=""
for a in "$@"; do case "$a" in --workdir=*) w="${a#*=}" ;; esac; done
case "$w" in gs://*) w="$FAKE/gcs/${w#gs://}" ;; esac
n=$(( $(cat "$FAKE/launches" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$FAKE/launches"
echo "$$" >> "$FAKE/jobs"
echo "start $n from=$(cat "$w/step" 2>/dev/null || echo scratch) code=$(cat marker 2>/dev/null)" >> "$FAKE/events"
mkdir -p "$w" && echo "$n" > "$w/step"  # a checkpoint
trap 'kill "$sleeper" 2>/dev/null; echo "stopped $n" >> "$FAKE/events"; exit 130' INT
run() { sleep "$1" & sleeper=$!; wait "$sleeper"; }
complete() { echo done > "$w/COMPLETED"; }
preempt() { echo SUSPENDED > "$FAKE/state"; }
fault() { echo "$*" >> "$FAKE/faults"; }
eval "$(sed -n "${n}p" "$FAKE/plan")"
echo "end $n" >> "$FAKE/events"
"""


@pytest.fixture
def cloud(tmp_path):
  """A fake cloud (above) and a copy of the launch scripts in a git repository of their own (its
  working tree is what setup ships, so a test may change it)."""
  fake, repo, bin_dir = tmp_path / "fake", tmp_path / "repo", tmp_path / "fakebin"
  for d in (fake / "home", fake / "gcs", bin_dir, repo):
    d.mkdir(parents=True)
  shutil.copytree(os.path.join(ROOT, "launch"), repo / "launch")
  shutil.copy(os.path.join(ROOT, "pyproject.toml"), repo / "pyproject.toml")
  (repo / "marker").write_text("v1")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "-A"], check=True)
  subprocess.run([*git, "commit", "-q", "-m", "v1"], check=True)
  commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
  (bin_dir / "gcloud").write_text(_FAKE_GCLOUD)
  (fake / "worker-python").write_text(_FAKE_WORKER_PYTHON)
  (bin_dir / "fakepy3").write_text(
      '#!/bin/bash\nset -e\n[ "$1 $2" = "-m venv" ]\nmkdir -p "$3/bin"\ncp "$FAKE/worker-python" "$3/bin/python"\n'
      'chmod +x "$3/bin/python"\n')
  for f in (bin_dir / "gcloud", bin_dir / "fakepy3"):
    f.chmod(0o755)
  (fake / "plan").write_text("")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EMJAX_", "VIRTUAL_ENV", "DRY_RUN"))}
  env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE=str(fake))

  class Cloud:
    home, gcs, root, head = fake / "home", fake / "gcs", repo, commit

    @staticmethod
    def plan(*lines):
      (fake / "plan").write_text("".join(f"{line}\n" for line in lines))

    @staticmethod
    def run(*args, timeout=60):
      """run.sh (of the copy) with the flags of a one-host spot slice and `args`: (status, stderr)."""
      proc = subprocess.run(["bash", str(repo / "launch" / "tpu" / "run.sh"), *V5E, "--python=fakepy3", *args],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
      return proc.returncode, proc.stderr

    @staticmethod
    def events():
      path = fake / "events"
      return path.read_text().splitlines() if path.exists() else []

    @staticmethod
    def calls():
      return (fake / "gcloud.log").read_text().splitlines()

    @staticmethod
    def wait_for(event, timeout=20):
      deadline = time.time() + timeout
      while not any(e.startswith(event) for e in Cloud.events()):
        assert time.time() < deadline, (event, Cloud.events())
        time.sleep(0.05)

  yield Cloud
  if (fake / "jobs").exists():
    for pid in (fake / "jobs").read_text().split():
      try:
        os.killpg(int(pid), signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass


ONE_HOST = ["--type=v5litepod-8", "--", "--config=configs/pretrain/tiny.py"]


def _installs(events):
  return sum(e.startswith("pip ") and e.endswith("[tpu]") for e in events)


def test_a_relaunch_on_one_host_keeps_a_workdir_on_its_disk(cloud):
  """--workdir=runs/tiny on a one-host slice: rerunning run.sh (with its setup) resumes, never starts over."""
  cloud.plan("complete", "complete")
  status, stderr = cloud.run(*ONE_HOST, "--workdir=runs/tiny")
  assert status == 0, stderr
  cloud.wait_for("end 1")
  status, stderr = cloud.run(*ONE_HOST, "--workdir=runs/tiny/")
  assert status == 0, stderr
  cloud.wait_for("end 2")
  assert _installs(cloud.events()) == 2
  assert [e for e in cloud.events() if e.startswith("start")] == ["start 1 from=scratch code=v1",
                                                                  "start 2 from=1 code=v1"]


def test_setup_never_removes_the_checkout_that_holds_the_workdir(cloud):
  """An absolute workdir inside ~/emjax (which setup replaces) is refused on the worker; nothing is removed."""
  inside = cloud.home / "emjax" / "runs" / "tiny"
  inside.mkdir(parents=True)
  (inside / "step").write_text("7")
  status, stderr = cloud.run(*ONE_HOST, f"--workdir={inside}")
  assert status != 0 and f"the workdir {inside} is inside" in stderr, stderr
  assert (inside / "step").read_text() == "7" and cloud.events() == []


def test_a_relaunch_stops_the_old_job_before_setup_replaces_its_code(cloud):
  cloud.plan("run 30", "complete")
  status, stderr = cloud.run("--type=v5litepod-16", "--", "--config=c.py", "--workdir=gs://bkt/run")
  assert status == 0, stderr
  cloud.wait_for("start 1")
  status, stderr = cloud.run("--type=v5litepod-16", "--", "--config=c.py", "--workdir=gs://bkt/run")
  assert status == 0, stderr
  cloud.wait_for("end 2")
  events = cloud.events()
  assert events.index("stopped 1") < [i for i, e in enumerate(events) if e.endswith("[tpu]")][1], events
  assert "start 2 from=1 code=v1" in events


# (slice, workdir, where the workdir's code/ ends up): a bucket on a slice of 4 workers; the one worker's disk
WORKDIRS = [("--type=v5litepod-16", "gs://bkt/run", ("gcs", "bkt", "run", "code")),
            ("--type=v5litepod-8", "runs/tiny", ("home", "emjax-runs", "runs", "tiny", "code"))]


@pytest.mark.parametrize("slice_type, workdir, code", WORKDIRS)
def test_relaunches_ship_the_code_of_the_first_launch_unless_new_code(cloud, slice_type, workdir, code):
  """The first launch stores an archive of the working tree and its version record in <workdir>/code/; a
  relaunch from a changed tree installs that archive again; --new-code ships (and records) the tree as it is."""
  cloud.plan("", "", "")
  flags = [slice_type, "--", "--config=c.py", f"--workdir={workdir}"]
  version = cloud.home.parent.joinpath(*code, "version.txt")
  assert cloud.run(*flags)[0] == 0
  cloud.wait_for("end 1")
  assert f"commit={cloud.head}\n" in version.read_text() and "dirty=0\n" in version.read_text()
  (cloud.root / "marker").write_text("v2")  # an uncommitted change
  status, stderr = cloud.run(*flags)
  assert status == 0, stderr
  cloud.wait_for("end 2")
  assert "start 2 from=1 code=v1" in cloud.events()
  log = (cloud.home / "emjax-job.log").read_text()  # the workers' log says which code runs
  assert f"commit={cloud.head}\ndirty=0\n" in log
  status, stderr = cloud.run("--new-code", *flags)
  assert status == 0, stderr
  cloud.wait_for("end 3")
  assert "start 3 from=2 code=v2" in cloud.events()
  assert f"commit={cloud.head}\n" in version.read_text() and "dirty=1\n" in version.read_text()
  assert f"commit={cloud.head}\ndirty=1\n" in (cloud.home / "emjax-job.log").read_text()


@pytest.mark.parametrize("slice_type, workdir, code", WORKDIRS)
def test_git_relaunches_check_out_the_commit_of_the_first_launch(cloud, slice_type, workdir, code):
  """--git=URL: the commit of the first launch is recorded in <workdir>/code/version.txt and checked out again
  when the branch has moved on; --new-code takes the branch as it is now."""
  cloud.plan("", "", "")
  git = ["git", "-C", str(cloud.root), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
  branch = subprocess.run([*git, "branch", "--show-current"], check=True, capture_output=True, text=True).stdout.strip()
  flags = [f"--git={cloud.root}", f"--ref={branch}", slice_type, "--", "--config=c.py", f"--workdir={workdir}"]
  version = cloud.home.parent.joinpath(*code, "version.txt")
  status, stderr = cloud.run(*flags)
  assert status == 0, stderr
  cloud.wait_for("end 1")
  assert f"commit={cloud.head}\n" in version.read_text()
  (cloud.root / "marker").write_text("v2")
  subprocess.run([*git, "commit", "-q", "-am", "v2"], check=True)
  status, stderr = cloud.run(*flags)
  assert status == 0, stderr
  cloud.wait_for("end 2")
  assert "start 2 from=1 code=v1" in cloud.events()
  assert f"commit={cloud.head}\ndirty=0\n" in (cloud.home / "emjax-job.log").read_text()
  status, stderr = cloud.run("--new-code", *flags)
  assert status == 0, stderr
  cloud.wait_for("end 3")
  assert "start 3 from=2 code=v2" in cloud.events()
  assert f"commit={cloud.head}\n" not in version.read_text()


def test_a_worker_that_cannot_fetch_the_code_fails_the_setup(cloud):
  """The archive download failing on a worker ends the install there (and run.sh): the old checkout is never
  installed and started as if it were the run's code."""
  cloud.plan("fault 'storage cp gs://bkt/run/code/emjax.tgz *'", "")
  flags = ["--type=v5litepod-16", "--", "--config=c.py", "--workdir=gs://bkt/run"]
  assert cloud.run(*flags)[0] == 0
  cloud.wait_for("end 1")
  status, stderr = cloud.run(*flags)
  assert status != 0 and "connection reset by peer" in stderr, stderr
  assert any(c.startswith("storage cp gs://bkt/run/code/emjax.tgz ") for c in cloud.calls()[-3:])  # the worker's
  assert _installs(cloud.events()) == 1 and cloud.events()[-1] == "end 1"


UNTIL_DONE = ["--type=v5litepod-16", "--until-done", "--poll=1", "--max-restarts=3", "--", "--config=c.py",
              "--workdir=gs://bkt/run"]


def test_until_done_reads_completed_before_the_slice_state(cloud):
  """A run that finished before its slice was preempted is done: nothing is re-created or relaunched."""
  cloud.plan("complete; preempt")
  status, stderr = cloud.run(*UNTIL_DONE)
  assert status == 0 and "gs://bkt/run/COMPLETED: the run is done" in stderr, stderr
  assert not any("queued-resources delete" in c for c in cloud.calls())
  assert [e for e in cloud.events() if e.startswith("start")] == ["start 1 from=scratch code=v1"]


def test_until_done_looks_again_after_a_failed_ssh_or_gcloud_call(cloud):
  """A dropped ssh connection to worker 0, a failed bucket listing or slice query: look again later; the
  live job is neither stopped nor reinstalled."""
  ssh0 = "'compute tpus tpu-vm ssh * --worker=0 *'"
  cloud.plan(f"fault {ssh0}; fault 'storage ls *'; fault 'compute tpus queued-resources describe *'; fault {ssh0}; "
             "run 5; complete")
  status, stderr = cloud.run(*UNTIL_DONE)
  assert status == 0 and "the run is done" in stderr, stderr
  events = cloud.events()
  assert [e for e in events if e.startswith(("start", "stopped"))] == ["start 1 from=scratch code=v1"], events
  assert _installs(events) == 1


def test_until_done_survives_a_failed_relaunch(cloud):
  """A preempted slice whose re-creation fails once: the babysitter tries again at the next look."""
  cloud.plan("fault 'compute tpus queued-resources create *'; preempt", "complete")
  status, stderr = cloud.run(*UNTIL_DONE)
  assert status == 0 and "the run is done" in stderr, stderr
  assert [e for e in cloud.events() if e.startswith("start")] == ["start 1 from=scratch code=v1",
                                                                  "start 2 from=1 code=v1"]
  assert sum("queued-resources create" in c for c in cloud.calls()) == 3  # the first, the failed one, the retry


def test_no_setup_still_sets_up_a_slice_that_run_sh_created(cloud):
  """--no-setup means "the workers are set up already": a slice created (or re-created after a preemption)
  by run.sh is new, so it is set up all the same."""
  cloud.plan("preempt", "complete")
  status, stderr = cloud.run("--no-setup", *UNTIL_DONE)
  assert status == 0 and "the run is done" in stderr, stderr
  assert _installs(cloud.events()) == 2


def test_until_done_needs_a_bucket_workdir(tools):
  """A preempted slice is re-created with new disks: only a bucket keeps the checkpoints and the markers
  --until-done reads (a local path would be looked up on this machine)."""
  for dry in (True, False):
    status, commands, stderr = launch(tools, f"{TPU}/run.sh", *V5E, "--type=v5litepod-8", "--until-done", "--",
                                      "--config=configs/pretrain/tiny.py", "--workdir=runs/tiny", dry=dry)
    assert status == 2 and "--until-done needs a workdir in a bucket (--workdir=gs://BUCKET/PATH)" in stderr, stderr
    assert commands == []


def test_the_workdir_path_is_normalised(tools):
  commands, _ = ok(tools, f"{TPU}/run.sh", *V5E, "--type=v5litepod-16", "--until-done", "--no-setup", "--",
                   "--config=configs/pretrain/tiny.py", "--workdir=gs://bkt//runs/tiny/")
  assert ["gcloud", "storage", "ls", "gs://bkt/runs/tiny/COMPLETED"] in commands
  job = [option(c, "command") for c in commands if " nohup " in c[-1]]
  assert len(job) == 1 and " --workdir=gs://bkt/runs/tiny >" in job[0], job
  assert not any("bkt//" in w or "tiny//" in w for c in commands for w in c), commands


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
