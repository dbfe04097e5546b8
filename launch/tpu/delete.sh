#!/usr/bin/env bash
# Delete a slice: its queued resource and TPU VM (the workdir in its bucket stays).
USAGE="$(cat <<'TEXT'
usage: bash launch/tpu/delete.sh --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run]
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/_tpu.sh"
while [ $# -gt 0 ]; do
  tpu_flag "$1" || usage_error "unknown option $1"
  shift
done
tpu_require
tpu_delete
