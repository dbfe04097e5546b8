# Sourced by launch/tpu/*.sh: a slice's shape, its queued resource, the install and the job on every worker.
#
# The slice is a queued resource and a TPU VM node of the same NAME. Every worker gets the same
# checkout (an archive of this working tree, or a git clone) in ~/emjax and the same virtualenv in
# ~/emjax-venv; the job runs detached on every worker (~/emjax-job.log, ~/emjax-job.pid), so a
# dropped ssh connection does not stop it. run.sh records the code of a run's first launch in
# <workdir>/code/ and installs that code again on every relaunch (--new-code: this tree as it is now).
# A relative workdir lives in ~/emjax-runs on the workers, outside the checkout that setup replaces.
#
# Reading the cloud: a gcloud call that fails for another reason than "not there" (a dropped
# connection, an expired token) is "unknown", never "absent" or "not running" (status 3 below).
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
TPU_NEW_CODE=0  # run.sh --new-code: ship this working tree even if the workdir has recorded code
TPU_CREATED=0   # set by tpu_ensure when it created the slice (its workers are new: never set up)

# Paths on the workers, expanded there (single-quoted here).
REMOTE_REPO='$HOME/emjax'
REMOTE_VENV='$HOME/emjax-venv'
REMOTE_TARBALL='$HOME/emjax.tgz'
REMOTE_RUNS='$HOME/emjax-runs'  # where a relative --workdir lives
JOB_LOG='$HOME/emjax-job.log'
JOB_PID='$HOME/emjax-job.pid'
VERSION_FILE=.emjax-version  # in the checkout: the code's commit, dirty flag and origin

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

tpu_state() {  # the queued resource's state (ACTIVE, SUSPENDED, ...), nothing if there is none; status 3: unknown
  local cmd=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --format="value(state.state)")
  if is_dry_run; then quote "${cmd[@]}" >&3; return 0; fi
  local err out status=0
  err="$(mktemp)"
  out="$("${cmd[@]}" 2>"$err")" || status=$?
  if [ "$status" = 0 ]; then
    echo "$out"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    status=0
  else
    say "could not read the state of $TPU_NAME (gcloud status $status): $(tail -n 2 "$err" | tr '\n' ' ')"
    status=3
  fi
  rm -f "$err"
  return "$status"
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
    state="$(tpu_state)" || state=UNKNOWN
    if is_dry_run; then return; fi
    case "$state" in
      ACTIVE) say "$TPU_NAME is ACTIVE"; return ;;
      FAILED|SUSPENDING|SUSPENDED)
        die "queued resource $TPU_NAME is $state; delete it (launch/tpu/delete.sh --name=$TPU_NAME --zone=$TPU_ZONE) and create it again" ;;
      "") die "queued resource $TPU_NAME does not exist (gcloud compute tpus queued-resources describe found nothing)" ;;
      UNKNOWN) sleep "${EMJAX_TPU_POLL_SECS:-30}" ;;
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
  state="$(tpu_state)" || die "cannot tell whether $TPU_NAME exists; try again"
  case "$state" in
    "") tpu_create; TPU_CREATED=1 ;;
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
      tpu_create
      TPU_CREATED=1 ;;
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

tpu_install_command() {  # $1: how the checkout gets to ~/emjax, $2: a check before anything (or nothing)
  local py="$TPU_PYTHON"
  # The job is stopped first: setup never replaces the code or the virtualenv under a running job.
  # `|| exit 1`: set -e ignores a failure inside an && chain, which would leave the old checkout installed.
  # emjax needs Python >= 3.11; the TPU VM images (Ubuntu 22.04) ship 3.10, apt has 3.11.
  echo "set -e; ${2:+$2; }$(tpu_stop_command); { $1; } || exit 1; if ! command -v $py >/dev/null; then sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y $py $py-venv; fi; if [ ! -x $REMOTE_VENV/bin/python ]; then $py -m venv $REMOTE_VENV; fi; $REMOTE_VENV/bin/python -m pip install -q --upgrade pip; $REMOTE_VENV/bin/python -m pip install -q -e \"$REMOTE_REPO[$TPU_EXTRAS]\""
}

tpu_remote_workdir() {  # $1: a normalised workdir -> its name in the workers' shell (a relative one: under ~/emjax-runs)
  case "$1" in
    gs://*|/*) printf '%q' "$1" ;;
    *) printf '%s/%q' "$REMOTE_RUNS" "$1" ;;
  esac
}

tpu_workdir_guard() {  # $1: the workdir as the workers name it -> a command that refuses one inside ~/emjax
  echo "case \"\$(realpath -m -- $1)/\" in \"\$(realpath -m -- $REMOTE_REPO)\"/*) echo \"emjax setup: the workdir $1 is inside $REMOTE_REPO, which setup replaces; use a workdir outside it (a relative --workdir lives in ~/emjax-runs)\" >&2; exit 1 ;; esac"
}

gcs_probe() {  # $1: ls or cat, $2: gs://...; status 0: there (cat prints it), 1: no such object, 3: unknown
  if is_dry_run; then quote gcloud storage "$1" "$2" >&3; return 1; fi
  local err out status=0
  err="$(mktemp)"
  out="$(gcloud storage "$1" "$2" 2>"$err")" || status=$?
  if [ "$status" = 0 ]; then
    if [ "$1" = cat ]; then printf '%s\n' "$out"; fi
  elif grep -q "matched no objects" "$err"; then
    status=1
  else
    say "could not read $2 (gcloud storage $1, status $status): $(tail -n 2 "$err" | tr '\n' ' ')"
    status=3
  fi
  rm -f "$err"
  return "$status"
}

tpu_code_version() {  # the version record of this working tree: its commit, whether it differs from it, its origin
  local commit changes dirty=0
  commit="$(git -C "$LAUNCH_ROOT" rev-parse HEAD 2>/dev/null || echo none)"
  changes="$(git -C "$LAUNCH_ROOT" status --porcelain 2>/dev/null || true)"
  if [ -n "$changes" ]; then dirty=1; fi
  printf 'commit=%s\ndirty=%s\nsource=%s:%s\ncreated=%s\n' "$commit" "$dirty" "$(uname -n)" "$LAUNCH_ROOT" \
      "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if [ -n "$changes" ]; then printf '%s\n' "$changes" | sed 's/^/changed: /'; fi
}

tpu_pack_tree() {  # $1: an empty directory: $1/emjax.tgz, this working tree (tracked files and untracked ones
  # git does not ignore: no venvs, caches, runs) with its version record $VERSION_FILE, also left in $1
  local dir="$1"
  git -C "$LAUNCH_ROOT" ls-files -z --cached --others --exclude-standard >"$dir/files"
  tpu_code_version >"$dir/$VERSION_FILE"
  say "packing this working tree: $(tr -cd '\0' <"$dir/files" | wc -c) files, $(head -n 2 "$dir/$VERSION_FILE" | tr '\n' ' ')"
  run tar -czf "$dir/emjax.tgz" -C "$dir" "$VERSION_FILE" -C "$LAUNCH_ROOT" --null -T "$dir/files"
}

tpu_fetch_tree() {  # $1: the workdir (none: setup.sh) -> TPU_FETCH, how a worker gets the archive into ~/emjax
  local workdir="$1" pack code unpack="rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO && tar -xzf"
  case "$workdir" in
    gs://*)  # the archive of the run's first launch, stored in the bucket; the workers fetch it from there
      local recorded status=0
      code="$workdir/code"
      recorded="$(gcs_probe cat "$code/version.txt")" || status=$?
      if [ "$status" = 3 ]; then die "cannot tell whether $code/ holds the run's code; try again"; fi
      if [ "$status" = 0 ] && [ "$TPU_NEW_CODE" = 0 ]; then
        say "installing the code recorded at the run's first launch ($code/: $(printf '%s\n' "$recorded" | head -n 2 | tr '\n' ' ')); --new-code ships this working tree instead"
      else
        pack="$(mktemp -d)"
        tpu_pack_tree "$pack"
        say "recording it as the run's code in $code/"
        run gcloud storage cp "$pack/emjax.tgz" "$code/emjax.tgz"
        run gcloud storage cp "$pack/$VERSION_FILE" "$code/version.txt"  # last: a record means a whole archive
        rm -rf "$pack"
      fi
      TPU_FETCH="gcloud storage cp $(printf '%q' "$code/emjax.tgz") $REMOTE_TARBALL && $unpack $REMOTE_TARBALL -C $REMOTE_REPO" ;;
    *)
      pack="$(mktemp -d)"
      tpu_pack_tree "$pack"
      run gcloud compute tpus tpu-vm scp "$pack/emjax.tgz" "$TPU_NAME:emjax.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
      rm -rf "$pack"
      if [ -z "$workdir" ]; then
        TPU_FETCH="$unpack $REMOTE_TARBALL -C $REMOTE_REPO"
      else  # a workdir on the worker's own disk: the worker keeps the run's archive in it
        code="$(tpu_remote_workdir "$workdir")/code"
        say "the worker installs the code recorded in $workdir/code/ at the run's first launch$([ "$TPU_NEW_CODE" = 1 ] && echo ", replaced by this tree (--new-code)")"
        TPU_FETCH="mkdir -p $code && if [ $TPU_NEW_CODE = 1 ] || [ ! -f $code/emjax.tgz ]; then cp $REMOTE_TARBALL $code/emjax.tgz; fi && $unpack $code/emjax.tgz -C $REMOTE_REPO && cp $REMOTE_REPO/$VERSION_FILE $code/version.txt"
      fi ;;
  esac
}

tpu_resolve_ref() {  # $1: a branch, tag or commit of --git -> a commit (a dry run: $1)
  local ref="$1" out commit
  if [[ "$ref" =~ ^[0-9a-f]{40}$ ]]; then echo "$ref"; return; fi
  out="$(query git ls-remote "$TPU_GIT" "$ref")" || die "git ls-remote $TPU_GIT $ref failed"
  if is_dry_run; then echo "$ref"; return; fi
  commit="$(printf '%s\n' "$out" | awk '$2 ~ /\^\{\}$/ {print $1; exit}')"  # an annotated tag's commit
  if [ -z "$commit" ]; then commit="$(printf '%s\n' "$out" | awk 'NF {print $1; exit}')"; fi
  if [ -z "$commit" ]; then
    [[ "$ref" =~ ^[0-9a-f]{7,39}$ ]] || die "--ref=$ref: no such branch or tag in $TPU_GIT"
    commit="$ref"  # an abbreviated commit: the workers check it out
  fi
  echo "$commit"
}

tpu_fetch_git() {  # $1: the workdir (none: setup.sh) -> TPU_FETCH, how a worker clones --git at the run's commit
  local workdir="$1" ref="${TPU_REF:-HEAD}" url code clone record
  url="$(printf '%q' "$TPU_GIT")"
  clone="rm -rf $REMOTE_REPO && git clone -q $url $REMOTE_REPO && git -C $REMOTE_REPO checkout -q"
  record="printf 'commit=%s\\ndirty=0\\nsource=%s\\n' \"\$(git -C $REMOTE_REPO rev-parse HEAD)\" $url >$REMOTE_REPO/$VERSION_FILE"
  case "$workdir" in
    "") TPU_FETCH="$clone $ref && $record" ;;
    gs://*)  # the commit of the run's first launch, recorded in the bucket
      local recorded status=0 commit pack
      code="$workdir/code"
      recorded="$(gcs_probe cat "$code/version.txt")" || status=$?
      if [ "$status" = 3 ]; then die "cannot tell whether $code/ records the run's code; try again"; fi
      if [ "$status" = 0 ] && [ "$TPU_NEW_CODE" = 0 ]; then
        commit="$(printf '%s\n' "$recorded" | sed -n 's/^commit=//p' | head -n 1)"
        [[ "$commit" =~ ^[0-9a-f]{7,40}$ ]] || die "$code/version.txt records no commit; --new-code records $ref"
        say "installing the commit recorded at the run's first launch ($commit in $code/version.txt); --new-code takes $ref instead"
      else
        commit="$(tpu_resolve_ref "$ref")"
        pack="$(mktemp -d)"
        printf 'commit=%s\ndirty=0\nsource=%s\nref=%s\ncreated=%s\n' "$commit" "$TPU_GIT" "$ref" \
            "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$pack/version.txt"
        say "recording $ref ($commit) of $TPU_GIT as the run's code in $code/version.txt"
        run gcloud storage cp "$pack/version.txt" "$code/version.txt"
        rm -rf "$pack"
      fi
      TPU_FETCH="$clone $commit && $record" ;;
    *)  # a workdir on the worker's own disk: the worker records the commit in it
      code="$(tpu_remote_workdir "$workdir")/code"
      TPU_FETCH="mkdir -p $code && ref=$ref && if [ $TPU_NEW_CODE = 0 ] && [ -f $code/version.txt ]; then ref=\$(sed -n 's/^commit=//p' $code/version.txt); fi && [ -n \"\$ref\" ] && $clone \$ref && $record && cp $REMOTE_REPO/$VERSION_FILE $code/version.txt" ;;
  esac
}

tpu_setup() {  # $1 (run.sh): the run's workdir, whose code/ keeps the code of its first launch
  local workdir="${1:-}" guard=""
  setup_validate
  case "$workdir" in ""|gs://*) ;; *) guard="$(tpu_workdir_guard "$(tpu_remote_workdir "$workdir")")" ;; esac
  if [ -n "$TPU_GIT" ]; then
    tpu_fetch_git "$workdir"
    say "setting up every worker of $TPU_NAME from $TPU_GIT"
  else
    tpu_fetch_tree "$workdir"
    say "setting up every worker of $TPU_NAME"
  fi
  tpu_ssh all "$(tpu_install_command "$TPU_FETCH" "$guard")"
}

# ----------------------------------------------------------------------------- the job

tpu_stop_command() {  # stops the job of this worker: SIGINT (emjax writes FAILED and closes), then SIGKILL
  # The wait ends when no process of the group is alive: exited ones that nobody has reaped yet (zombies,
  # when the job's new parent is slow to wait for it) still answer `kill -0`.
  echo "p=\$(cat $JOB_PID 2>/dev/null || true); if [ -n \"\$p\" ] && kill -0 -- -\$p 2>/dev/null; then kill -INT -- -\$p 2>/dev/null || true; for i in \$(seq 60); do ps -eo pgid=,stat= | awk -v g=\$p '\$1 == g && \$2 !~ /^Z/ {a = 1} END {exit !a}' || break; sleep 1; done; kill -KILL -- -\$p 2>/dev/null || true; fi; rm -f $JOB_PID"
}

tpu_job_command() {  # the command every worker runs: stop an earlier job, start this one detached
  local distributed=0 flags="" a workdir
  if [ "${TPU_WORKERS:-1}" -gt 1 ]; then distributed=1; fi  # JAX finds the workers in the TPU VM metadata
  workdir="$(emjax_workdir)"
  for a in "${EMJAX_ARGS[@]+"${EMJAX_ARGS[@]}"}"; do
    case "$a" in
      --workdir=*|-workdir=*) flags+=" --workdir=$(tpu_remote_workdir "$workdir")" ;;  # normalised
      *) flags+=" $(printf '%q' "$a")" ;;
    esac
  done
  # Job control (set -m): the job is its own process group (the stop command signals that group) and
  # keeps SIGINT, which a non-interactive shell's background commands would otherwise ignore.
  # nohup: it outlives the ssh session. The log starts with the code's version record.
  echo "set -m; $(tpu_stop_command); cd $REMOTE_REPO || exit 1; { echo \"emjax code ($REMOTE_REPO/$VERSION_FILE):\"; cat $VERSION_FILE 2>/dev/null || echo unrecorded; } >$JOB_LOG; EMJAX_DISTRIBUTED=$distributed PYTHONUNBUFFERED=1 nohup $REMOTE_VENV/bin/python -m emjax.main$flags >>$JOB_LOG 2>&1 </dev/null & echo \$! >$JOB_PID"
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

tpu_job_status() {  # worker 0's job: "running" or "stopped"; status 3 (and nothing) if worker 0 did not answer
  local out err status=0
  err="$(mktemp)"
  out="$(query gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=0 \
      --command="if p=\$(cat $JOB_PID 2>/dev/null) && kill -0 -- -\$p 2>/dev/null; then echo emjax-job-running; else echo emjax-job-stopped; fi" \
      2>"$err")" || status=$?
  case "$out" in
    *emjax-job-running*) echo running; status=0 ;;
    *emjax-job-stopped*) echo stopped; status=0 ;;
    *) if ! is_dry_run; then say "worker 0 did not answer (gcloud status $status): $(tail -n 2 "$err" | tr '\n' ' ')"; fi
       status=3 ;;
  esac
  rm -f "$err"
  return "$status"
}
