#!/usr/bin/env bash
# Run an emjax job on this machine's GPUs: one process owning all of them (or those of --gpus).
USAGE="$(cat <<'TEXT'
usage: bash launch/gpu/local.sh [--gpus=0,1,...] [--no-install] [--dry-run] -- EMJAX_FLAGS...

  e.g. bash launch/gpu/local.sh -- --config=configs/pretrain/tiny.py --workdir=runs/tiny

One process sees every GPU (or those of --gpus, as CUDA_VISIBLE_DEVICES) and the mesh spans them
(config.mesh: data=-1 takes all devices). JAX_PLATFORMS=cuda: no GPU is an error, not a silent run
on the CPU. EMJAX_DISTRIBUTED=0: one process, even inside a SLURM allocation of several tasks.
Installs emjax with the cuda extra into the active virtualenv (else ./.venv) unless --no-install.
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/../_launch.sh"
gpus="" install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; EMJAX_ARGS=("$@"); break ;;
    --gpus=*) gpus="$(flag_value "$1")" ;;
    --gpus) flag_value "$1" ;;
    --no-install) install=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) echo "$USAGE"; exit 0 ;;
    *) usage_error "unknown option $1" ;;
  esac
  shift
done
check_dry_run_value
require_emjax_args
[ -z "$gpus" ] || [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus=$gpus: expected GPU indices, e.g. --gpus=0,1"
if ! is_dry_run; then
  command -v nvidia-smi >/dev/null || die "no NVIDIA driver here (nvidia-smi not found)"
  count="$(nvidia-smi -L | wc -l)"
  for i in ${gpus//,/ }; do
    [ "$i" -lt "$count" ] || die "--gpus=$gpus: this machine has $count GPUs (0..$((count - 1)))"
  done
  if [ "$install" = 1 ]; then
    source "$LAUNCH_ROOT/launch/_env.sh"
    emjax_install "[cuda]"
  fi
fi
env_args=(JAX_PLATFORMS=cuda EMJAX_DISTRIBUTED=0)
if [ -n "$gpus" ]; then env_args+=(CUDA_VISIBLE_DEVICES="$gpus"); fi
python="$(emjax_python)"
cd "$LAUNCH_ROOT"
if is_dry_run; then
  run env "${env_args[@]}" "$python" -m emjax.main "${EMJAX_ARGS[@]}"
else
  # The job replaces this shell: a SIGTERM sent to it (a supervisor, `kill`) reaches the job, which saves a
  # checkpoint at the step it is at and exits with status 75 (rerun to resume).
  exec env "${env_args[@]}" "$python" -m emjax.main "${EMJAX_ARGS[@]}"
fi
