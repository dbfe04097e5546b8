#!/usr/bin/env bash
# Stream the job's log (~/emjax-job.log) from a worker of a slice.
USAGE="$(cat <<'TEXT'
usage: bash launch/tpu/logs.sh --name=NAME --zone=ZONE [--worker=N|all] [--no-follow] [--project=PROJECT] [--dry-run]

  --worker=N|all  worker 0 by default (process 0 writes the metrics); all: every worker's, interleaved
  --no-follow     print the log so far and return (default: follow it, Ctrl-C to stop)
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/_tpu.sh"
worker=0 follow=1
while [ $# -gt 0 ]; do
  case "$1" in
    --worker=*) worker="$(flag_value "$1")" ;;
    --no-follow) follow=0 ;;
    *) tpu_flag "$1" || usage_error "unknown option $1" ;;
  esac
  shift
done
tpu_require
[[ "$worker" =~ ^(all|[0-9]+)$ ]] || die "--worker=$worker: expected a worker index or all"
if [ "$follow" = 1 ]; then
  tpu_ssh "$worker" "tail -n +1 -F $JOB_LOG"
else
  tpu_ssh "$worker" "cat $JOB_LOG"
fi
