# Sourced by launch/tpu/*.sh: a slice's shape, its queued resource, the install and the job on every worker.
#
# The slice is a queued resource and a TPU VM node of the same NAME. Every worker gets the same
# checkout (this working tree's files, or a git clone) in ~/emjax and the same virtualenv in
# ~/emjax-venv; the job runs detached on every worker (~/emjax-job.log, ~/emjax-job.pid), so a
# dropped ssh connection does not stop it.
source "$(dirname "${BASH_SOURCE[0]}")/../_launch.sh"

TPU_NAME=""
TPU_ZONE=""
TPU_PROJECT=""
TPU_TYPE=""
TPU_RUNTIME=""
TPU_TIER="spot"
TPU_PYTHON="python3.11"
TPU_EXTRAS="tpu"
TPU_GIT=""
TPU_REF=""
TPU_CHIPS=""
TPU_WORKERS=""
TPU_DEFAULT_RUNTIME=""

# Paths on the workers, expanded there (single-quoted here).
REMOTE_REPO='$HOME/emjax'
REMOTE_VENV='$HOME/emjax-venv'
REMOTE_TARBALL='$HOME/emjax.tgz'
JOB_LOG='$HOME/emjax-job.log'
JOB_PID='$HOME/emjax-job.pid'

tpu_flag() {  # consumes one flag shared by the TPU scripts; status 1 if it is not one of them
  case "$1" in
    --name=*) TPU_NAME="$(flag_value "$1")" ;;
    --zone=*) TPU_ZONE="$(flag_value "$1")" ;;
    --project=*) TPU_PROJECT="$(flag_value "$1")" ;;
    --name|--zone|--project) flag_value "$1" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) echo "$USAGE"; exit 0 ;;
    *) return 1 ;;
  esac
}

slice_flag() {  # what a new slice is made of (create.sh, run.sh)
  case "$1" in
    --type=*) TPU_TYPE="$(flag_value "$1")" ;;
    --runtime=*) TPU_RUNTIME="$(flag_value "$1")" ;;
    --tier=*) TPU_TIER="$(flag_value "$1")" ;;
    --type|--runtime|--tier) flag_value "$1" ;;
    *) return 1 ;;
  esac
}

setup_flag() {  # how the workers get emjax (setup.sh, run.sh)
  case "$1" in
    --git=*) TPU_GIT="$(flag_value "$1")" ;;
    --ref=*) TPU_REF="$(flag_value "$1")" ;;
    --python=*) TPU_PYTHON="$(flag_value "$1")" ;;
    --extras=*) TPU_EXTRAS="$(flag_value "$1")" ;;
    --git|--ref|--python|--extras) flag_value "$1" ;;
    *) return 1 ;;
  esac
}

tpu_require() {
  check_dry_run_value
  [ -n "$TPU_NAME" ] || usage_error "missing --name=NAME (the queued resource and its TPU VM)"
  [ -n "$TPU_ZONE" ] || usage_error "missing --zone=ZONE (e.g. us-west4-a)"
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
      || die "--name=$TPU_NAME: lowercase letters, digits and '-', starting with a letter"
  require_tool gcloud "install the Google Cloud SDK (https://cloud.google.com/sdk) and run gcloud auth login"
  GCLOUD_FLAGS=(--zone="$TPU_ZONE")
  if [ -n "$TPU_PROJECT" ]; then GCLOUD_FLAGS+=(--project="$TPU_PROJECT"); fi
}

tpu_shape() {  # TPU_TYPE -> TPU_CHIPS, TPU_WORKERS, TPU_DEFAULT_RUNTIME (once)
  [ -z "$TPU_CHIPS" ] || return 0
  [ -n "$TPU_TYPE" ] || usage_error "missing --type=ACCELERATOR_TYPE (e.g. v5litepod-16, v5p-64)"
  local family="${TPU_TYPE%-*}" n="${TPU_TYPE##*-}"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--type=$TPU_TYPE: expected FAMILY-SIZE, e.g. v5litepod-16 or v5p-64"
  case "$family" in
    v5litepod|v6e)  # the size counts chips; one host up to 8 chips, else 4 chips per host
      case "$n" in 1|4|8|16|32|64|128|256) ;; *) die "--type=$TPU_TYPE: $family slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;; esac
      TPU_CHIPS="$n"
      if [ "$n" -le 8 ]; then TPU_WORKERS=1; else TPU_WORKERS=$((n / 4)); fi
      if [ "$family" = v6e ]; then TPU_DEFAULT_RUNTIME=v2-alpha-tpuv6e; else TPU_DEFAULT_RUNTIME=v2-alpha-tpuv5-lite; fi
      ;;
    v5p|v4)  # the size counts TensorCores: two per chip, 4 chips per host
      [ $((n % 8)) -eq 0 ] || die "--type=$TPU_TYPE: $family sizes count TensorCores (2 per chip) in multiples of 8"
      TPU_CHIPS=$((n / 2))
      TPU_WORKERS=$((n / 8))
      if [ "$family" = v5p ]; then TPU_DEFAULT_RUNTIME=v2-alpha-tpuv5; else TPU_DEFAULT_RUNTIME=tpu-ubuntu2204-base; fi
      ;;
    *) die "--type=$TPU_TYPE: unsupported TPU family $family (supported: v4-N, v5p-N, v5litepod-N, v6e-N)" ;;
  esac
  TPU_RUNTIME="${TPU_RUNTIME:-$TPU_DEFAULT_RUNTIME}"
  case "$TPU_TIER" in
    spot|best-effort|reserved|on-demand) ;;
    *) die "--tier=$TPU_TIER: expected spot, best-effort, reserved or on-demand" ;;
  esac
  say "$TPU_TYPE: $TPU_CHIPS chips, $TPU_WORKERS workers, runtime $TPU_RUNTIME, tier $TPU_TIER"
}

tpu_ssh() {  # $1: worker (all or an index), $2: the command, run there by the login shell
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command="$2"
}

# ----------------------------------------------------------------------------- the queued resource

tpu_state() {  # the queued resource's state (ACTIVE, SUSPENDED, ...), or nothing if there is none
  query gcloud compute tpus queued-resources describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      --format="value(state.state)" 2>/dev/null || true
}

tpu_create() {
  tpu_shape
  local cmd=(gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${GCLOUD_FLAGS[@]}"
             --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_RUNTIME")
  case "$TPU_TIER" in
    spot) cmd+=(--spot) ;;  # preemptible at any time, no run-time limit
    best-effort) cmd=(gcloud alpha "${cmd[@]:1}" --best-effort) ;;  # the preemptible tier: gcloud alpha only
    reserved) cmd+=(--reserved) ;;
    on-demand) ;;
  esac
  say "requesting $TPU_NAME ($TPU_TYPE) in $TPU_ZONE"
  run "${cmd[@]}"
  tpu_wait_active
}

tpu_wait_active() {
  local state
  while :; do
    state="$(tpu_state)"
    if is_dry_run; then return; fi
    case "$state" in
      ACTIVE) say "$TPU_NAME is ACTIVE"; return ;;
      FAILED|SUSPENDING|SUSPENDED)
        die "queued resource $TPU_NAME is $state; delete it (launch/tpu/delete.sh --name=$TPU_NAME --zone=$TPU_ZONE) and create it again" ;;
      "") die "queued resource $TPU_NAME does not exist (gcloud compute tpus queued-resources describe found nothing)" ;;
      *) say "$TPU_NAME is $state; waiting"; sleep "${EMJAX_TPU_POLL_SECS:-30}" ;;
    esac
  done
}

tpu_delete() {
  say "deleting $TPU_NAME (the queued resource and its TPU VM)"
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
}

tpu_ensure() {  # an ACTIVE slice: created if absent, re-created if preempted or failed
  local state
  state="$(tpu_state)"
  case "$state" in
    "") tpu_create ;;
    ACTIVE)
      tpu_shape
      local actual
      actual="$(query gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --format="value(acceleratorType)")"
      if ! is_dry_run && [ "$actual" != "$TPU_TYPE" ]; then
        die "$TPU_NAME exists as a ${actual:-slice of unknown type}, not --type=$TPU_TYPE; use that type, another --name, or delete it"
      fi ;;
    FAILED|SUSPENDING|SUSPENDED)
      say "$TPU_NAME is $state (preempted or failed): re-creating it"
      tpu_delete
      tpu_create ;;
    *) tpu_shape; tpu_wait_active ;;
  esac
}

# ----------------------------------------------------------------------------- the install

setup_validate() {  # the setup flags, checked before anything is created
  [[ "$TPU_PYTHON" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--python=$TPU_PYTHON: expected an interpreter name or path"
  [[ "$TPU_EXTRAS" =~ ^[a-z0-9_,-]+$ ]] || die "--extras=$TPU_EXTRAS: expected comma-separated extras, e.g. tpu,wandb"
  if [ -n "$TPU_GIT" ]; then
    [[ "$TPU_GIT" =~ ^[A-Za-z0-9_./:@+-]+$ ]] || die "--git=$TPU_GIT: expected a repository URL"
    [[ "${TPU_REF:-HEAD}" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--ref=$TPU_REF: expected a branch, tag or commit"
  else
    [ -z "$TPU_REF" ] || die "--ref=$TPU_REF needs --git=URL (without it this working tree is copied)"
    git -C "$LAUNCH_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
        || die "$LAUNCH_ROOT is not a git working tree: give --git=URL for the workers to clone"
  fi
}

tpu_install_command() {  # $1: how the checkout gets to ~/emjax; the one install command of every worker
  local py="$TPU_PYTHON"
  # emjax needs Python >= 3.11; the TPU VM images (Ubuntu 22.04) ship 3.10, apt has 3.11.
  echo "set -e; $1; if ! command -v $py >/dev/null; then sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y $py $py-venv; fi; if [ ! -x $REMOTE_VENV/bin/python ]; then $py -m venv $REMOTE_VENV; fi; $REMOTE_VENV/bin/python -m pip install -q --upgrade pip; $REMOTE_VENV/bin/python -m pip install -q -e \"$REMOTE_REPO[$TPU_EXTRAS]\""
}

tpu_setup() {
  local fetch
  setup_validate
  if [ -n "$TPU_GIT" ]; then
    local ref="${TPU_REF:-HEAD}"
    fetch="rm -rf $REMOTE_REPO && git clone -q $TPU_GIT $REMOTE_REPO && git -C $REMOTE_REPO checkout -q $ref"
    say "setting up every worker of $TPU_NAME from $TPU_GIT ($ref)"
  else
    # This working tree: tracked files and untracked ones git does not ignore (no venvs, caches, runs).
    local pack list
    pack="$(mktemp -d)"
    list="$pack/files"
    git -C "$LAUNCH_ROOT" ls-files -z --cached --others --exclude-standard >"$list"
    say "setting up every worker of $TPU_NAME from this working tree ($(tr -cd '\0' <"$list" | wc -c) files)"
    run tar -C "$LAUNCH_ROOT" --null -T "$list" -czf "$pack/emjax.tgz"
    run gcloud compute tpus tpu-vm scp "$pack/emjax.tgz" "$TPU_NAME:emjax.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
    rm -rf "$pack"
    fetch="rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO && tar -xzf $REMOTE_TARBALL -C $REMOTE_REPO"
  fi
  tpu_ssh all "$(tpu_install_command "$fetch")"
}

# ----------------------------------------------------------------------------- the job

tpu_stop_command() {  # stops the job of this worker: SIGINT (emjax writes FAILED and closes), then SIGKILL
  # The wait ends when no process of the group is alive: exited ones that nobody has reaped yet (zombies,
  # when the job's new parent is slow to wait for it) still answer `kill -0`.
  echo "p=\$(cat $JOB_PID 2>/dev/null || true); if [ -n \"\$p\" ] && kill -0 -- -\$p 2>/dev/null; then kill -INT -- -\$p; for i in \$(seq 60); do ps -eo pgid=,stat= | awk -v g=\$p '\$1 == g && \$2 !~ /^Z/ {a = 1} END {exit !a}' || break; sleep 1; done; kill -KILL -- -\$p 2>/dev/null || true; fi; rm -f $JOB_PID"
}

tpu_job_command() {  # the command every worker runs: stop an earlier job, start this one detached
  local distributed=0 flags=""
  if [ "${TPU_WORKERS:-1}" -gt 1 ]; then distributed=1; fi  # JAX finds the workers in the TPU VM metadata
  if [ "${#EMJAX_ARGS[@]}" -gt 0 ]; then flags="$(printf ' %q' "${EMJAX_ARGS[@]}")"; fi
  # Job control (set -m): the job is its own process group (the stop command signals that group) and
  # keeps SIGINT, which a non-interactive shell's background commands would otherwise ignore.
  # nohup: it outlives the ssh session.
  echo "set -m; $(tpu_stop_command); cd $REMOTE_REPO || exit 1; EMJAX_DISTRIBUTED=$distributed PYTHONUNBUFFERED=1 nohup $REMOTE_VENV/bin/python -m emjax.main$flags >$JOB_LOG 2>&1 </dev/null & echo \$! >$JOB_PID"
}

tpu_require_bucket_workdir() {  # several workers must share the checkpoints: a bucket, not each one's disk
  local workdir
  workdir="$(emjax_workdir)"
  if [ "${TPU_WORKERS:-1}" -gt 1 ] && [[ "$workdir" != gs://* ]]; then
    die "--workdir=$workdir: a slice of $TPU_WORKERS workers needs a workdir in a bucket (--workdir=gs://BUCKET/PATH); each worker has its own disk"
  fi
}

tpu_launch() {
  say "starting the job on every worker of $TPU_NAME (log: ~/emjax-job.log on each)"
  tpu_ssh all "$(tpu_job_command)"
}

tpu_follow() {  # worker 0's log until its job ends
  tpu_ssh 0 "tail -n +1 -F --pid=\$(cat $JOB_PID) $JOB_LOG"
}

tpu_job_running() {  # status 0 if worker 0's job is still running
  query gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=0 \
      --command="p=\$(cat $JOB_PID 2>/dev/null) && kill -0 -- -\$p 2>/dev/null"
}

workdir_has() {  # $1: workdir (gs://...), $2: a file name; status 0 if it exists (never in a dry run)
  if is_dry_run; then quote gcloud storage ls "$1/$2" >&3; return 1; fi
  gcloud storage ls "$1/$2" >/dev/null 2>&1
}
