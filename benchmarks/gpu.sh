#!/usr/bin/env bash
# One device run (the `run` tool of a session lent a GPU): the smoke check first, then the sampler and
# training benchmarks on the Qwen2.5-0.5B shape, each side by side with HF in the same process. JSON lines
# go to $OUT (what comes back) and stdout. Prepare here first: `bash launch/device_wheels.sh` (grain,
# ml-collections for the training benchmark), then call `run` with carry [".whl"] and
#   command: bash benchmarks/gpu.sh      (timeout_s 540; each step has its own time limit below)
#
# The GPU is checked before anything is timed: JAX_PLATFORMS=cuda (a CUDA plugin that fails to start is
# an error, not a silent run on the CPU) and benchmarks/smoke.py --expect=gpu, which stops the script when
# jax is on anything else. Each benchmark prints emjax's figures before it builds the transformers side.
#
# Settings (environment):
#   EXPECT=gpu      (default) the figures must come from the GPU; EXPECT=cpu is the dry run on a CPU
#                   (JAX_PLATFORMS=cpu, the CPU presets, a few minutes on 2 cores)
#   MODE=first      (default) one sampler batch size (64 on the GPU, 1 in the dry run): what fits the first
#                   session's device time; MODE=full: the presets' batch sizes (1 and 64); MODE=eval: the
#                   smoke check, then benchmarks/continuous.py alone (the eval workload's answer lengths:
#                   continuous vs static batching vs transformers `generate`, Qwen2.5-0.5B shape, 256
#                   answers capped at 600 tokens, 64 slots), a second call
#   PY, OUT, SAMPLER_ARGS, TRAIN_ARGS, CONTINUOUS_ARGS, SMOKE_TIMEOUT, SAMPLER_TIMEOUT, TRAIN_TIMEOUT,
#   CONTINUOUS_TIMEOUT override the rest.
# Exit codes: 0 everything ran; 1 a benchmark failed (its stderr tail is printed); 2 bad settings;
#   3 jax is not on the expected backend (nothing was timed); 4 emjax does not import on this jax;
#   6 an emjax model did not run; 7 the smoke check crashed or timed out.
#   (Smoke exit 5, cuDNN attention failing on the GPU, is not fatal: training then runs with
#   model.attention=fused.)
#
#   bash benchmarks/gpu.sh                              # on the GPU
#   EXPECT=cpu PY=/path/to/python bash benchmarks/gpu.sh  # the dry run here
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/emjax_gpu_out}
EXPECT=${EXPECT:-gpu}
MODE=${MODE:-first}
mkdir -p "$OUT"
if [ "$MODE" = eval ] && [ ! -f benchmarks/eval_lengths.json ]; then
  echo "gpu.sh: MODE=eval needs benchmarks/eval_lengths.json (python benchmarks/continuous.py --write_lengths)" >&2
  exit 2
fi
case "$EXPECT" in
  gpu) export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} ;;
  cpu) export JAX_PLATFORMS=cpu ;;
  *) echo "gpu.sh: EXPECT=$EXPECT: expected gpu (the device run) or cpu (the dry run)" >&2; exit 2 ;;
esac
case "$MODE" in
  first|full|eval) ;;
  *) echo "gpu.sh: MODE=$MODE: expected first (one sampler batch size), full or eval" >&2; exit 2 ;;
esac
if [ "$EXPECT" = cpu ]; then
  batches=$([ "$MODE" = first ] && echo "--batches=1" || echo "")
  SAMPLER_ARGS=${SAMPLER_ARGS:---preset=cpu-tiny --prompt=64 --new_tokens=32 --repeats=1 $batches}
  TRAIN_ARGS=${TRAIN_ARGS:---preset=cpu-small --steps=1 --warmup=1 --rounds=1}
  CONTINUOUS_ARGS=${CONTINUOUS_ARGS:---preset=cpu-tiny --answers=16 --cap=32 --batch=8}
else
  batches=$([ "$MODE" = first ] && echo "--batches=64" || echo "")
  SAMPLER_ARGS=${SAMPLER_ARGS:---preset=qwen2.5-0.5b --repeats=2 $batches}
  TRAIN_ARGS=${TRAIN_ARGS:---preset=qwen2.5-0.5b}
  CONTINUOUS_ARGS=${CONTINUOUS_ARGS:---preset=qwen2.5-0.5b --answers=256 --cap=600 --batch=64}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the GPU
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/emjax_site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/emjax_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
t0=$SECONDS
{ date -u +%FT%TZ; echo "EXPECT=$EXPECT MODE=$MODE JAX_PLATFORMS=$JAX_PLATFORMS";
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 || echo "no nvidia-smi"; } \
  2>&1 | tee "$OUT/device.txt"

echo "== smoke (benchmarks/smoke.py --expect=$EXPECT)"
timeout "${SMOKE_TIMEOUT:-150}" "$PY" benchmarks/smoke.py --expect="$EXPECT" --out="$OUT/smoke.json" \
  2>"$OUT/smoke.err" | tee "$OUT/smoke.txt"
smoke=${PIPESTATUS[0]}
case "$smoke" in
  0) ;;
  3) echo "gpu.sh: STOP (exit 3): jax is not on the $EXPECT backend, so no benchmark ran (it would time another"
     echo "  machine). smoke.py says:"; grep '^SMOKE STOP' "$OUT/smoke.txt"; tail -n 5 "$OUT/smoke.err"; exit 3 ;;
  4|6) echo "gpu.sh: STOP (exit $smoke): emjax does not run on this jax; tail of smoke.err:"
       tail -n 20 "$OUT/smoke.err"; exit "$smoke" ;;
  5) echo "gpu.sh: cuDNN attention failed on this GPU (see smoke.txt); training runs with --attention=fused"
     TRAIN_ARGS="$TRAIN_ARGS --attention=fused" ;;
  124) echo "gpu.sh: STOP (exit 7): the smoke check ran past ${SMOKE_TIMEOUT:-150} s; tail of smoke.err:"
       tail -n 20 "$OUT/smoke.err"; exit 7 ;;
  *) echo "gpu.sh: STOP (exit 7): the smoke check crashed (exit $smoke); tail of smoke.err:"
     tail -n 20 "$OUT/smoke.err"; exit 7 ;;
esac
echo "== smoke done at $((SECONDS - t0)) s"

status=0
if [ "$MODE" = eval ]; then
  echo "== continuous (benchmarks/continuous.py $CONTINUOUS_ARGS)"
  timeout "${CONTINUOUS_TIMEOUT:-420}" "$PY" benchmarks/continuous.py $CONTINUOUS_ARGS \
    2>"$OUT/continuous.err" | tee "$OUT/continuous.jsonl"
  [ "${PIPESTATUS[0]}" = 0 ] || { status=1; echo "continuous benchmark failed: tail of continuous.err:"
                                  tail -n 20 "$OUT/continuous.err"; }
  echo "== all done at $((SECONDS - t0)) s, exit $status"
  exit $status
fi
echo "== sampler (benchmarks/sampler.py $SAMPLER_ARGS)"
timeout "${SAMPLER_TIMEOUT:-240}" "$PY" benchmarks/sampler.py $SAMPLER_ARGS \
  2>"$OUT/sampler.err" | tee "$OUT/sampler.jsonl"
[ "${PIPESTATUS[0]}" = 0 ] || { status=1; echo "sampler benchmark failed: tail of sampler.err:"; tail -n 20 "$OUT/sampler.err"; }
echo "== sampler done at $((SECONDS - t0)) s"
echo "== train (benchmarks/train.py $TRAIN_ARGS)"
timeout "${TRAIN_TIMEOUT:-200}" "$PY" benchmarks/train.py $TRAIN_ARGS \
  2>"$OUT/train.err" | tee "$OUT/train.jsonl"
[ "${PIPESTATUS[0]}" = 0 ] || { status=1; echo "train benchmark failed: tail of train.err:"; tail -n 20 "$OUT/train.err"; }
echo "== all done at $((SECONDS - t0)) s, exit $status"
exit $status
