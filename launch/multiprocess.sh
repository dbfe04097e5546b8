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
# Needs bash >= 5.1 (`wait -n -p`).
#
# Environment:
#   EMJAX_COORDINATOR_PORT  coordinator port (default: a free one, picked by binding port 0)
#   EMJAX_LOG_DIR           write process i's output to $EMJAX_LOG_DIR/process_i.log (default: terminal)
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

pids=()
running=()
stop_all() {
  for pid in "${running[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 143' TERM INT

for ((i = 0; i < N; i++)); do
  args=("$@" "--config.distributed.coordinator_address=127.0.0.1:$PORT"
        "--config.distributed.num_processes=$N" "--config.distributed.process_id=$i")
  if [ -n "${EMJAX_LOG_DIR:-}" ]; then
    "$PYTHON" -m emjax.main "${args[@]}" >"$EMJAX_LOG_DIR/process_$i.log" 2>&1 &
  else
    "$PYTHON" -m emjax.main "${args[@]}" &
  fi
  pids+=("$!")
  running=("${pids[@]}")
done

status=0
running=("${pids[@]}")
while [ "${#running[@]}" -gt 0 ]; do
  rc=0
  finished=""
  wait -n -p finished "${running[@]}" || rc=$?
  left=()
  for pid in "${running[@]}"; do [ "$pid" = "$finished" ] || left+=("$pid"); done
  running=("${left[@]}")
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "[emjax] multiprocess: a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
