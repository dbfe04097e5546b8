#!/usr/bin/env bash
# Request a Cloud TPU slice as a queued resource and wait until it is ACTIVE.
USAGE="$(cat <<'TEXT'
usage: bash launch/tpu/create.sh --name=NAME --zone=ZONE --type=TYPE [--runtime=VERSION] [--tier=TIER]
                                 [--project=PROJECT] [--dry-run]

  e.g. bash launch/tpu/create.sh --name=emjax-v5p --zone=us-east5-a --type=v5p-64

  --type=TYPE        v5litepod-N (v5e: N chips), v5p-N (N TensorCores, N/2 chips), v6e-N, v4-N
  --runtime=VERSION  default by family: v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                     v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4)
  --tier=TIER        spot (default: preemptible, cheapest), best-effort (gcloud alpha), reserved, on-demand
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/_tpu.sh"
while [ $# -gt 0 ]; do
  tpu_flag "$1" || slice_flag "$1" || usage_error "unknown option $1"
  shift
done
tpu_require
tpu_create
