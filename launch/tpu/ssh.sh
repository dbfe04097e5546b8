#!/usr/bin/env bash
# Run one shell command on every worker of a slice (or one worker), e.g. to look at a worker's disk.
USAGE="$(cat <<'TEXT'
usage: bash launch/tpu/ssh.sh --name=NAME --zone=ZONE [--worker=N|all] [--project=PROJECT] [--dry-run] -- COMMAND...

  e.g. bash launch/tpu/ssh.sh --name=emjax-v5e --zone=us-west4-a -- ls -la ~/emjax
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/_tpu.sh"
worker=all
command=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; command=("$@"); break ;;
    --worker=*) worker="$(flag_value "$1")" ;;
    *) tpu_flag "$1" || usage_error "unknown option $1" ;;
  esac
  shift
done
tpu_require
[[ "$worker" =~ ^(all|[0-9]+)$ ]] || die "--worker=$worker: expected a worker index or all"
[ "${#command[@]}" -gt 0 ] || usage_error "no command: add -- COMMAND..."
tpu_ssh "$worker" "${command[*]}"
