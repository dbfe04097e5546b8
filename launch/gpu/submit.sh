#!/usr/bin/env bash
# Submit an emjax job to a SLURM cluster of GPU nodes (launch/gpu/slurm.sbatch runs it there).
USAGE="$(cat <<'TEXT'
usage: bash launch/gpu/submit.sh --nodes=N --gpus-per-node=G [options] -- EMJAX_FLAGS...

  e.g. bash launch/gpu/submit.sh --nodes=2 --gpus-per-node=8 --partition=gpu -- \
           --config=configs/pretrain/llama_1b.py --workdir=/shared/runs/llama_1b

Installs emjax with the cuda extra into the active virtualenv (else ./.venv; the nodes must see it
on a shared filesystem), then sbatch's launch/gpu/slurm.sbatch: one process per node owning all of
its GPUs, or with --per-gpu one process per GPU; jax.distributed is initialised from SLURM's
environment. Rerunning the same command resumes the run from its last checkpoint in the workdir.

options:
  --nodes=N            nodes (default 1)
  --gpus-per-node=G    GPUs per node (required)
  --per-gpu            one process per GPU instead of one per node
  --partition=P --account=A --time=T   passed to sbatch
  --sbatch-arg=ARG     any other sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)
  --no-install         the virtualenv has emjax already
  --dry-run            print the sbatch command instead of running it (also DRY_RUN=1)
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/../_launch.sh"
nodes=1 gpus="" per=node install=1
sbatch_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; EMJAX_ARGS=("$@"); break ;;
    --nodes=*) nodes="$(flag_value "$1")"; positive_int --nodes "$nodes" ;;
    --gpus-per-node=*) gpus="$(flag_value "$1")"; positive_int --gpus-per-node "$gpus" ;;
    --per-gpu) per=gpu ;;
    --partition=*|--account=*|--time=*) sbatch_args+=("$1"); flag_value "$1" >/dev/null ;;
    --sbatch-arg=*) sbatch_args+=("$(flag_value "$1")") ;;
    --nodes|--gpus-per-node|--partition|--account|--time|--sbatch-arg) flag_value "$1" ;;
    --no-install) install=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) echo "$USAGE"; exit 0 ;;
    *) usage_error "unknown option $1" ;;
  esac
  shift
done
check_dry_run_value
[ -n "$gpus" ] || usage_error "missing --gpus-per-node=G"
require_emjax_args
require_tool sbatch "submit from a SLURM login node"

if [ "$install" = 1 ]; then
  if is_dry_run; then
    say "dry run: would install emjax[cuda] (launch/_env.sh) before submitting"
  else
    source "$LAUNCH_ROOT/launch/_env.sh"
    emjax_install "[cuda]"
  fi
fi
python="$(emjax_python)"
# sbatch's --export is a comma-separated list: values with commas cannot pass through it.
for value in "$LAUNCH_ROOT" "$python"; do
  [[ "$value" != *,* ]] || die "$value: a path with a comma cannot be passed through sbatch --export"
done
if [ "$per" = gpu ]; then tasks_per_node="$gpus"; else tasks_per_node=1; fi
say "submitting: $nodes nodes x $gpus GPUs, $((nodes * tasks_per_node)) processes (one per $per)"
run sbatch --job-name=emjax --nodes="$nodes" --gpus-per-node="$gpus" --ntasks-per-node="$tasks_per_node" \
    "${sbatch_args[@]+"${sbatch_args[@]}"}" --chdir="$LAUNCH_ROOT" \
    --export=ALL,EMJAX_ROOT="$LAUNCH_ROOT",EMJAX_PROCESS_PER="$per",PYTHON="$python" \
    "$LAUNCH_ROOT/launch/gpu/slurm.sbatch" "${EMJAX_ARGS[@]}"
