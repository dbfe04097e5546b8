#!/usr/bin/env bash
# Set up (virtualenv + install) and run the main job: pretrain a tiny model from scratch on a
# mixture of built-in synthetic sources, offline, on this machine's CPU (a couple of minutes).
#   bash launch/quickstart.sh [WORKDIR] [extra flags, e.g. --config.train.steps=100]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
emjax_install ""
# A first argument that starts with "-" is a flag for emjax.main, not the workdir.
WORKDIR="runs/tiny"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  WORKDIR="$1"
  shift
fi
for arg in "$@"; do  # a --workdir among the flags wins (absl takes the last), for the summary below too
  case "$arg" in --workdir=*|-workdir=*) WORKDIR="${arg#*=}" ;; esac
done
python -m emjax.main --config=configs/pretrain/tiny.py --workdir="$WORKDIR" "$@"
python - "$WORKDIR" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
print(f"[emjax] step {rows[0]['step']}: loss {rows[0]['loss']:.3f}  ->  step {rows[-1]['step']}: "
      f"loss {rows[-1]['loss']:.3f}, {rows[-1]['tokens_per_s']:.0f} tokens/s; outputs in {sys.argv[1]}")
PY
