#!/usr/bin/env bash
# One device run (the `run` tool of a session lent a GPU): GPU identity, then the sampler and training
# benchmarks on the Qwen2.5-0.5B shape, each side by side with HF in the same process. JSON lines go to
# $OUT (what comes back) and stdout. Prepare here first: `bash launch/device_wheels.sh` (grain,
# ml-collections for the training benchmark), then call `run` with carry [".whl"] and
#   command: bash benchmarks/gpu.sh      (timeout_s 540; each benchmark has its own time limit below)
# Dry run on a CPU: PY=.venv312/bin/python SAMPLER_ARGS="--preset=cpu-tiny --batches=1" \
#   TRAIN_ARGS="--preset=cpu-small --steps=1 --warmup=1" OUT=/tmp/gpu_out bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/emjax_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the GPU
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/emjax_site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/emjax_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 || echo "no nvidia-smi";
  "$PY" -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  2>&1 | tee "$OUT/device.txt"
status=0
timeout "${SAMPLER_TIMEOUT:-300}" "$PY" benchmarks/sampler.py ${SAMPLER_ARGS:---preset=qwen2.5-0.5b --repeats=2} \
  2>"$OUT/sampler.err" | tee "$OUT/sampler.jsonl" || { status=1; echo "sampler benchmark failed: tail of sampler.err:"; tail -n 20 "$OUT/sampler.err"; }
timeout "${TRAIN_TIMEOUT:-200}" "$PY" benchmarks/train.py ${TRAIN_ARGS:---preset=qwen2.5-0.5b} \
  2>"$OUT/train.err" | tee "$OUT/train.jsonl" || { status=1; echo "train benchmark failed: tail of train.err:"; tail -n 20 "$OUT/train.err"; }
exit $status
