#!/usr/bin/env bash
# Set up sqdf for development or use: a virtual environment at .venv in the repository
# root, torch installed first (pinned, so pip takes the CPU build that lies on disk here,
# or the CUDA build from PyPI on a machine with a GPU), then sqdf with its test tools.
# With --browser it also installs Debian's chromium (where apt-get exists) for the tests that
# open HTML reports in a headless browser (tests/browser.py); without one those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
BROWSER=0
for arg in "$@"; do
    case "$arg" in
        --browser) BROWSER=1 ;;
        *) echo "usage: bash scripts/setup.sh [--browser]" >&2; exit 2 ;;
    esac
done
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

# Optional: Debian's chromium for the browser tests, only where it is missing. A failed install
# is not fatal: those tests then skip, saying so.
if [ "$BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""
    elif command -v sudo >/dev/null; then SUDO="sudo"
    else SUDO="none"
    fi
    if ! command -v apt-get >/dev/null || [ "$SUDO" = none ]; then
        echo "note: cannot install chromium here (needs apt-get, as root or with sudo); browser tests will be skipped"
    elif ! { $SUDO apt-get update -qq \
        && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
        echo "note: apt-get install chromium failed; browser tests will be skipped" >&2
    fi
fi
