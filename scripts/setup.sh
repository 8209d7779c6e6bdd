#!/usr/bin/env bash
# Set up sqdf for development or use: a virtual environment at .venv in the repository
# root, torch installed first (pinned, so pip takes the CPU build that lies on disk here,
# or the CUDA build from PyPI on a machine with a GPU), then sqdf with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The digits evaluator's weights come inside this MIT-licensed package. Its declared
# dependencies include torchvision, which breaks beside this torch, and we only read its
# weight file, so it is installed without them.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "digit-recognizer-py==0.1.0"
