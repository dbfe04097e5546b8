#!/usr/bin/env bash
# Wheels that the GPU device image lacks (Python 3.12, x86-64), for `benchmarks/gpu.sh`.
# Run here, in the repo root; `.whl/` is git-ignored and travels with the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
rm -rf .whl && mkdir -p .whl
# grain + its needs missing there (array-record, portpicker); ml-collections (pyyaml is there).
for spec in grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$spec"
done
ls -la .whl
du -sh .whl
