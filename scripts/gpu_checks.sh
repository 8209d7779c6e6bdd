#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for the lent GPU machine (the `device` tool):
# the GPU tests, then the Stable Diffusion benchmarks at SD 1.5 size on random weights.
# Results go to $OUT (JSON) and to stdout; copy the tables into docs/performance.md.
#
# On the device machine diffusers and the evaluator's package are missing: carry wheels in
# .whl/ (pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl
#  diffusers==0.42.1 importlib_metadata digit-recognizer-py==0.1.0) and run
#     bash scripts/gpu_checks.sh            with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -3
python3 benchmarks/sd_update.py --preset sd15 --updates 4 --parts /tmp/sd15 --out "$OUT/sd15-update.json"
python3 benchmarks/update_speed.py --task sd --preset sd15 --updates 6 --eval-samples 8 \
    --parts /tmp/sd15 --out "$OUT/sd15-speed.json"
