#!/usr/bin/env bash
# Set up every worker of a slice the same way: the checkout in ~/emjax, `pip install -e ".[tpu]"` into ~/emjax-venv.
USAGE="$(cat <<'TEXT'
usage: bash launch/tpu/setup.sh --name=NAME --zone=ZONE [--git=URL [--ref=REF]] [--python=PY] [--extras=LIST]
                                [--project=PROJECT] [--dry-run]

Without --git this working tree (tracked files and untracked ones git does not ignore) is packed with
its version record (~/emjax/.emjax-version: commit, dirty flag) and copied to every worker; with --git
every worker clones URL at REF. Then one install command, the same on every worker: a running job is
stopped, the checkout replaced, a virtualenv of PY made (default python3.11, installed with apt if
missing) and pip install -e "~/emjax[LIST]" run (default LIST: tpu; e.g. tpu,wandb). launch/tpu/run.sh
installs the code recorded in the run's workdir instead (see its --help).
TEXT
)"
source "$(dirname "${BASH_SOURCE[0]}")/_tpu.sh"
while [ $# -gt 0 ]; do
  tpu_flag "$1" || setup_flag "$1" || usage_error "unknown option $1"
  shift
done
tpu_require
tpu_setup
