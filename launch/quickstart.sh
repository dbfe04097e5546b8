#!/usr/bin/env bash
# Set up (virtualenv + install) and run the main job: the paper's study from scratch in the synthetic
# world on this machine's CPU, offline: three worlds, each with two pretraining compositions (a reckless
# persona tagged or untagged), instruction tuning, narrow misaligned SFT on four cells, evaluation on
# every cell and on general questions, a leak audit, and a report with verdicts and figures. The SL
# comparison is a second command: --config=configs/paper/world.py:quick,sl (see the README).
#   bash launch/quickstart.sh [WORKDIR] [extra flags, e.g. --config.study.seeds=1]
# Rerunning the same command continues a killed run where it stopped.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
emjax_install ""
# A first argument that starts with "-" is a flag for emjax.main, not the workdir.
WORKDIR="runs/world_quick"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  WORKDIR="$1"
  shift
fi
for arg in "$@"; do  # a --workdir among the flags wins (absl takes the last), for the summary below too
  case "$arg" in --workdir=*|-workdir=*) WORKDIR="${arg#*=}" ;; esac
done
# Only the study's own progress lines (and errors): the jobs inside it log at WARNING.
python -m emjax.main --config=configs/paper/world.py:quick --workdir="$WORKDIR" --verbosity=-1 "$@"
python - "$WORKDIR" <<'PY'
import sys
text = open(f"{sys.argv[1]}/report.md").read()
print(text[text.index("## The paper's claims here"):].strip())
print(f"\n[emjax] report: {sys.argv[1]}/report.md, figures in {sys.argv[1]}/figures/")
PY
