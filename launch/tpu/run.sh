#!/usr/bin/env bash
# Run an emjax job on every worker of a Cloud TPU slice, creating or re-creating the slice as needed.
USAGE="$(cat <<'TEXT'
usage: bash launch/tpu/run.sh --name=NAME --zone=ZONE --type=TYPE [options] -- EMJAX_FLAGS...

  e.g. bash launch/tpu/run.sh --name=emjax-v5e --zone=us-west4-a --type=v5litepod-16 --until-done -- \
           --config=configs/pretrain/tiny.py --workdir=gs://BUCKET/runs/tiny

1. the slice: an ACTIVE queued resource NAME is used as it is; a missing one is created (as by
   launch/tpu/create.sh); a preempted (SUSPENDED) or FAILED one is deleted and created again;
2. every worker is set up the same way (as by launch/tpu/setup.sh; --no-setup skips it on a slice
   that exists): an earlier job there is stopped first, then the code of the run is installed;
3. `python -m emjax.main EMJAX_FLAGS` starts detached on every worker. On a slice of several workers
   jax.distributed finds them itself (EMJAX_DISTRIBUTED=1) and the workdir must be a bucket
   (gs://...) that every worker reads and writes.

The code of a run is the code of its first launch: an archive of this working tree (or the commit
of --ref in --git) and its version record (commit, dirty flag) are stored in WORKDIR/code/ and
installed again by every later launch, whatever this tree holds by then; --new-code ships (and
records) the tree as it is now. Every worker's log starts with the version record.

Rerunning the same command after a preemption resumes the run from its last checkpoint in the
workdir. --until-done does that by itself and needs a gs:// workdir (a re-created slice has new
disks): every --poll seconds it reads the workdir's COMPLETED and FAILED first (either ends it),
then re-creates a preempted slice or restarts a job that died, and reruns. A gcloud or ssh call
that fails (a dropped connection) means "look again later", never "relaunch".

A workdir on a worker's own disk (one-worker slices only): a relative --workdir lives in
~/emjax-runs on the worker, outside the checkout (~/emjax) that setup replaces; a workdir inside
~/emjax is refused.

options:
  --name=NAME --zone=ZONE [--project=PROJECT]
  --type=TYPE            accelerator type: v5litepod-N (v5e), v5p-N, v6e-N or v4-N
  --runtime=VERSION      TPU software version (default by family: v2-alpha-tpuv5-lite for v5e,
                         v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4)
  --tier=TIER            spot (default), best-effort (gcloud alpha), reserved or on-demand
  --git=URL [--ref=REF]  the workers clone URL at REF instead of receiving this working tree
  --python=PY            the interpreter of the workers' virtualenv (default python3.11)
  --extras=LIST          pip extras to install (default tpu; e.g. tpu,wandb)
  --no-setup             the workers are set up already (a slice that run.sh creates is set up anyway)
  --new-code             install this working tree (or --ref) and record it as the run's code, not the
                         code recorded in WORKDIR/code/ at the run's first launch
  --follow               stream worker 0's log until the job ends
  --until-done           relaunch after preemptions until COMPLETED or FAILED is in the (gs://) workdir
  --poll=SECONDS         how often --until-done looks (default 300)
  --max-restarts=N       --until-done gives up after N relaunches, failed ones included (default 20)
  --dry-run              print every command instead of running it (also DRY_RUN=1)
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/_tpu.sh"

setup=1 follow=0 until_done=0 poll=300 max_restarts=20
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; EMJAX_ARGS=("$@"); break ;;
    --no-setup) setup=0 ;;
    --new-code) TPU_NEW_CODE=1 ;;
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
workdir="$(emjax_workdir)"  # normalised: gs://b/run/ is gs://b/run
tpu_shape  # the flags are checked before anything is created
tpu_require_bucket_workdir
if [ "$until_done" = 1 ] && [[ "$workdir" != gs://* ]]; then
  die "--workdir=$workdir: --until-done needs a workdir in a bucket (--workdir=gs://BUCKET/PATH): a preempted slice is re-created with new disks, and --until-done reads the run's COMPLETED and FAILED markers from here"
fi
if [ "$setup" = 1 ]; then setup_validate; fi

bring_up_and_launch() {  # the slice, the install (stopping an earlier job first), the job
  TPU_CREATED=0
  tpu_ensure
  if [ "$setup" = 1 ]; then
    tpu_setup "$workdir"
  elif [ "$TPU_CREATED" = 1 ]; then
    say "$TPU_NAME is new: setting it up (--no-setup is for workers that are set up already)"
    tpu_setup "$workdir"
  fi
  tpu_launch
}

markers() {  # exits when the workdir has COMPLETED (0) or FAILED (1); status 0: neither, 3: could not tell
  local status=0
  gcs_probe ls "$workdir/COMPLETED" >/dev/null || status=$?
  case "$status" in
    0) say "$workdir/COMPLETED: the run is done"; exit 0 ;;
    1) ;;
    *) return 3 ;;
  esac
  status=0
  gcs_probe ls "$workdir/FAILED" >/dev/null || status=$?
  case "$status" in
    0) say "$workdir/FAILED: $(gcloud storage cat "$workdir/FAILED" 2>/dev/null || true)"; exit 1 ;;
    1) return 0 ;;
    *) return 3 ;;
  esac
}

why=""
check_once() {  # exits when the workdir has COMPLETED or FAILED; sets `why` when a relaunch is due.
  # The markers come first (a run that finished is done, whatever became of its slice since); any
  # question that gets no answer (gcloud or ssh failed) means "look again later", never "relaunch".
  local state job
  why=""
  markers || { say "looking again in ${poll}s"; return 0; }
  state="$(tpu_state)" || { say "looking again in ${poll}s"; return 0; }
  if ! is_dry_run && [ "$state" != ACTIVE ]; then
    why="$TPU_NAME is ${state:-gone} (preempted?)"
    return 0
  fi
  job="$(tpu_job_status)" || { is_dry_run || say "looking again in ${poll}s"; return 0; }
  if [ "$job" = stopped ]; then
    markers || { say "looking again in ${poll}s"; return 0; }  # it may have finished since the first look
    why="the job is not running on worker 0 and the workdir has neither COMPLETED nor FAILED"
  fi
}

bring_up_and_launch
TPU_NEW_CODE=0  # relaunches install the code that the first launch recorded
if [ "$until_done" = 0 ]; then
  if [ "$follow" = 1 ]; then tpu_follow; fi
  exit 0
fi
if is_dry_run; then
  say "dry run: every ${poll}s --until-done looks at the workdir's markers, the slice and worker 0's job:"
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
  # A relaunch that fails (gcloud refused, ssh dropped) is tried again at the next look, not the babysitter's end;
  # set -e holds inside the subshell, which `if` or `||` would switch off.
  set +e
  (set -e; bring_up_and_launch)
  status=$?
  set -e
  if [ "$status" != 0 ]; then say "relaunch $restarts failed (status $status); looking again in ${poll}s"; fi
done
