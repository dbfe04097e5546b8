#!/usr/bin/env bash
# Run any emjax job as N processes on this machine, as one multi-process (multi-host) JAX job:
# process i gets DEVICES_PER_PROCESS fake CPU devices and joins a coordinator on 127.0.0.1.
#
#   bash launch/multiprocess.sh N DEVICES_PER_PROCESS --config=FILE[:ARG] --workdir=DIR [--config.x=y ...]
#
# e.g. 2 processes x 4 devices on the 2x2x2 mesh:
#   bash launch/multiprocess.sh 2 4 --config=configs/pretrain/tiny.py:smoke --workdir=/tmp/mp \
#       --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2
#
# Every process runs `python -m emjax.main` with the same flags plus
# --config.distributed.{coordinator_address,num_processes,process_id}. The script waits for all of
# them and exits with the first failure's status; when one process fails the others are stopped
# (they would otherwise wait at the next collective until jax's timeouts).
#
# Stopping: SIGTERM (or SIGINT) to this script sends SIGTERM to every process and waits for them. A
# training job takes it as a preemption: every process saves a checkpoint at the same step and exits
# with status 75 (resumable: rerun the same command), which is then the script's status. A process
# that exits 75 by itself (SIGTERM sent to it alone) is no failure: the others stop at the same step.
# Processes still running EMJAX_STOP_GRACE_S seconds after a stop (a job that does not save on
# SIGTERM), or after a second signal, are killed (SIGKILL).
#
# Needs bash >= 5.1 (`wait -n -p`).
#
# Environment:
#   EMJAX_COORDINATOR_PORT  coordinator port (default: a free one, picked by binding port 0)
#   EMJAX_LOG_DIR           write process i's output to $EMJAX_LOG_DIR/process_i.log (default: terminal)
#   EMJAX_STOP_GRACE_S      seconds a stopped process has to save and exit before SIGKILL (default 60)
#   JAX_PLATFORMS           default cpu (the fake devices are CPU devices)
#   PYTHON                  interpreter (default: the active virtualenv's python, else ./.venv, else python3)
set -euo pipefail

if [ "$#" -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]] || ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/multiprocess.sh N DEVICES_PER_PROCESS --config=FILE --workdir=DIR [flags]" >&2
  exit 2
fi
N="$1"
DEVICES="$2"
shift 2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"
  else PYTHON=python3
  fi
fi
PORT="${EMJAX_COORDINATOR_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

# Drop any device-count flag already in XLA_FLAGS; keep the others.
XLA_REST="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
export XLA_FLAGS="$XLA_REST --xla_force_host_platform_device_count=$DEVICES"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -n "${EMJAX_LOG_DIR:-}" ]; then mkdir -p "$EMJAX_LOG_DIR"; fi

GRACE="${EMJAX_STOP_GRACE_S:-60}"
if ! [[ "$GRACE" =~ ^[0-9]+$ ]]; then
  echo "EMJAX_STOP_GRACE_S=$GRACE: expected a number of seconds" >&2
  exit 2
fi
PREEMPTED=75  # emjax's exit status after saving a checkpoint on a preemption (emjax/train/loop.py)

pids=()
running=()
declare -A index_of=()
stopping=0
watchdog=""

say() { echo "[emjax] multiprocess: $*" >&2; }

kill_running() {
  for pid in "${running[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

arm_watchdog() {  # SIGKILL to whatever still runs GRACE seconds from now (once)
  if [ -n "$watchdog" ]; then return; fi
  local targets=("${running[@]}")
  (
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$GRACE" </dev/null >/dev/null 2>&1 &
    sleeper=$!
    wait "$sleeper"
    alive=()
    for pid in "${targets[@]}"; do if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi; done
    if [ "${#alive[@]}" -gt 0 ]; then
      echo "[emjax] multiprocess: ${#alive[@]} process(es) still running ${GRACE}s after the stop: SIGKILL" >&2
      kill -KILL "${alive[@]}" 2>/dev/null || true
    fi
  ) &
  watchdog=$!
}

stop_all() {  # SIGTERM to every running process (a training job saves a checkpoint and exits), SIGKILL later
  stopping=1
  for pid in "${running[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  arm_watchdog
}

on_signal() {
  if [ "$stopping" = 1 ]; then
    say "stopped again: SIGKILL to the ${#running[@]} process(es) still running"
    kill_running
    return
  fi
  say "stopping: SIGTERM to every process (a training job saves a checkpoint at a step all of them reach," \
      "then exits with status $PREEMPTED); SIGKILL to any still running in ${GRACE}s or on a second signal"
  stop_all
}
trap on_signal TERM INT

for ((i = 0; i < N; i++)); do
  args=("$@" "--config.distributed.coordinator_address=127.0.0.1:$PORT"
        "--config.distributed.num_processes=$N" "--config.distributed.process_id=$i")
  if [ -n "${EMJAX_LOG_DIR:-}" ]; then
    "$PYTHON" -m emjax.main "${args[@]}" >"$EMJAX_LOG_DIR/process_$i.log" 2>&1 &
  else
    "$PYTHON" -m emjax.main "${args[@]}" &
  fi
  pids+=("$!")
  index_of[$!]=$i
  running=("${pids[@]}")
done

status=0
preempted=0
running=("${pids[@]}")
while [ "${#running[@]}" -gt 0 ]; do
  rc=0
  finished=""
  wait -n -p finished "${running[@]}" 2>/dev/null || rc=$?
  if [ -z "${finished:-}" ]; then
    # A signal cut the wait short (on_signal ran), or bash had already collected a process that ended
    # (wait -n then finds "no such job"): such a process's status is still there for a plain `wait PID`.
    for pid in "${running[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        finished=$pid
        rc=0
        wait "$pid" 2>/dev/null || rc=$?
        break
      fi
    done
    if [ -z "${finished:-}" ]; then
      if [ "$rc" -eq 127 ]; then sleep 0.1; fi  # nothing to wait for yet none has ended: look again shortly
      continue
    fi
  fi
  left=()
  for pid in "${running[@]}"; do [ "$pid" = "$finished" ] || left+=("$pid"); done
  running=("${left[@]}")
  if [ "$rc" -eq "$PREEMPTED" ]; then
    if [ "$preempted" = 0 ] && [ "${#running[@]}" -gt 0 ]; then
      say "process ${index_of[$finished]} saved a checkpoint on a preemption and stopped (status $rc);" \
          "the others stop at the same step"
    fi
    preempted=1
    if [ "${#running[@]}" -gt 0 ]; then arm_watchdog; fi
  elif [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    say "process ${index_of[$finished]} exited with status $rc; stopping the others"
    stop_all
  fi
done
if [ -n "$watchdog" ]; then kill "$watchdog" 2>/dev/null || true; fi
if [ "$status" -eq 0 ] && [ "$preempted" = 1 ]; then
  say "preempted: every process saved the same step and stopped; rerun the same command to resume"
  status=$PREEMPTED
fi
exit "$status"
