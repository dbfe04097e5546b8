#!/usr/bin/env bash
# Run an emjax job on every worker of a Cloud TPU slice, creating or re-creating the slice as needed.
USAGE="$(cat <<'TEXT'
usage: bash launch/tpu/run.sh --name=NAME --zone=ZONE --type=TYPE [options] -- EMJAX_FLAGS...

  e.g. bash launch/tpu/run.sh --name=emjax-v5e --zone=us-west4-a --type=v5litepod-16 --until-done -- \
           --config=configs/pretrain/tiny.py --workdir=gs://BUCKET/runs/tiny

1. the slice: an ACTIVE queued resource NAME is used as it is; a missing one is created (as by
   launch/tpu/create.sh); a preempted (SUSPENDED) or FAILED one is deleted and created again;
2. every worker is set up the same way (as by launch/tpu/setup.sh; --no-setup skips it);
3. `python -m emjax.main EMJAX_FLAGS` starts detached on every worker, after stopping an earlier
   job there. On a slice of several workers jax.distributed finds them itself (EMJAX_DISTRIBUTED=1)
   and the workdir must be a bucket (gs://...) that every worker reads and writes.

Rerunning the same command after a preemption resumes the run from its last checkpoint in the
workdir. --until-done does that by itself: every --poll seconds, while the workdir has neither
COMPLETED nor FAILED, it re-creates a preempted slice (or restarts a job that died) and reruns.

options:
  --name=NAME --zone=ZONE [--project=PROJECT]
  --type=TYPE            accelerator type: v5litepod-N (v5e), v5p-N, v6e-N or v4-N
  --runtime=VERSION      TPU software version (default by family: v2-alpha-tpuv5-lite for v5e,
                         v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4)
  --tier=TIER            spot (default), best-effort (gcloud alpha), reserved or on-demand
  --git=URL [--ref=REF]  the workers clone URL at REF instead of receiving this working tree
  --python=PY            the interpreter of the workers' virtualenv (default python3.11)
  --extras=LIST          pip extras to install (default tpu; e.g. tpu,wandb)
  --no-setup             the workers are set up already
  --follow               stream worker 0's log until the job ends
  --until-done           relaunch after preemptions until COMPLETED or FAILED is in the workdir
  --poll=SECONDS         how often --until-done looks (default 300)
  --max-restarts=N       --until-done gives up after N relaunches (default 20)
  --dry-run              print every command instead of running it (also DRY_RUN=1)
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/_tpu.sh"

setup=1 follow=0 until_done=0 poll=300 max_restarts=20
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; EMJAX_ARGS=("$@"); break ;;
    --no-setup) setup=0 ;;
    --follow) follow=1 ;;
    --until-done) until_done=1 ;;
    --poll=*) poll="$(flag_value "$1")"; positive_int --poll "$poll" ;;
    --max-restarts=*) max_restarts="$(flag_value "$1")"; positive_int --max-restarts "$max_restarts" ;;
    --poll|--max-restarts) flag_value "$1" ;;
    *) tpu_flag "$1" || slice_flag "$1" || setup_flag "$1" || usage_error "unknown option $1" ;;
  esac
  shift
done
tpu_require
[ -n "$TPU_TYPE" ] || usage_error "missing --type=ACCELERATOR_TYPE (e.g. v5litepod-16, v5p-64)"
require_emjax_args
workdir="$(emjax_workdir)"
tpu_shape  # the flags are checked before anything is created
tpu_require_bucket_workdir
if [ "$setup" = 1 ]; then setup_validate; fi

bring_up_and_launch() {
  tpu_ensure
  if [ "$setup" = 1 ]; then tpu_setup; fi
  tpu_launch
}

why=""
check_once() {  # exits when the workdir has COMPLETED or FAILED; else sets `why` when a relaunch is due
  local state
  why=""
  state="$(tpu_state)"
  if ! is_dry_run && [ "$state" != ACTIVE ]; then
    why="$TPU_NAME is ${state:-gone} (preempted?)"
  elif workdir_has "$workdir" COMPLETED; then
    say "$workdir/COMPLETED: the run is done"
    exit 0
  elif workdir_has "$workdir" FAILED; then
    say "$workdir/FAILED: $(gcloud storage cat "$workdir/FAILED" 2>/dev/null || true)"
    exit 1
  elif ! tpu_job_running >/dev/null 2>&1; then
    why="the job is not running on worker 0 and the workdir has neither COMPLETED nor FAILED"
  fi
}

bring_up_and_launch
if [ "$until_done" = 0 ]; then
  if [ "$follow" = 1 ]; then tpu_follow; fi
  exit 0
fi
if is_dry_run; then
  say "dry run: every ${poll}s --until-done looks at the slice, the workdir's markers and worker 0's job:"
  check_once
  exit 0
fi
restarts=0
while :; do
  sleep "$poll"
  check_once
  [ -n "$why" ] || continue
  restarts=$((restarts + 1))
  [ "$restarts" -le "$max_restarts" ] || die "$why; stopping after $max_restarts relaunches (--max-restarts)"
  say "$why: relaunch $restarts of at most $max_restarts; the run resumes from its last checkpoint in $workdir"
  bring_up_and_launch
done
