#!/usr/bin/env bash
# Stop the job on every worker of a slice (SIGINT: emjax closes its checkpointer and writes FAILED;
# SIGKILL after 60 s). The slice stays; rerunning launch/tpu/run.sh resumes from the last checkpoint.
USAGE="$(cat <<'TEXT'
usage: bash launch/tpu/stop.sh --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run]
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/_tpu.sh"
while [ $# -gt 0 ]; do
  tpu_flag "$1" || usage_error "unknown option $1"
  shift
done
tpu_require
say "stopping the job on every worker of $TPU_NAME"
tpu_ssh all "$(tpu_stop_command)"
