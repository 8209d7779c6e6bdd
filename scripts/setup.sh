#!/usr/bin/env bash
# Set up sqdf for development or use: a virtual environment at .venv in the repository
# root, torch and torchvision installed first as a matching pinned pair (PyPI's Linux wheels,
# a CUDA build that also runs on the CPU), then sqdf with its test tools and the documentation
# site's Sphinx packages (the docs extra). In an existing CUDA environment, any matching
# torch/torchvision pair from PyPI will do: pip install -e ".[dev]".
# With --browser it also installs Debian's chromium (where apt-get exists) for the tests that
# open HTML reports in a headless browser (tests/browser.py); without one those tests skip.
# With --quant it also installs torchao (the int8 base, task_params.quantize_base, and its tests).
set -euo pipefail
cd "$(dirname "$0")/.."
BROWSER=0
QUANT=0
for arg in "$@"; do
    case "$arg" in
        --browser) BROWSER=1 ;;
        --quant) QUANT=1 ;;
        *) echo "usage: bash scripts/setup.sh [--browser] [--quant]" >&2; exit 2 ;;
    esac
done
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,docs,hpsv2,metrics,imagereward]"
# The reward packages the tests check our rewards against (image-reward is also what the
# imagereward reward runs). Their own pins (hpsv2x: pytest==7.2.0 and protobuf<4; image-reward:
# timm==0.6.13, against open_clip's timm>=1.0.17) would break the test tools and open_clip, and
# only their scoring code is imported, so they come without their declared dependencies; clint
# is what hpsv2x's scoring module imports beyond ours, the imagereward extra what BLIP's does.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    "hpsv2x==1.2.0" "image-reward==1.5"
.venv/bin/python -m pip install --quiet --disable-pip-version-check "clint==0.5.1"
# With --quant, torchao for task_params.quantize_base (the quant extra). Not by default: with
# torch 2.14.1 every torchao release prints warnings whenever diffusers is imported (diffusers
# imports torchao when it is installed), and that import costs every process about a second.
if [ "$QUANT" = 1 ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[quant]"
fi
# The digits evaluator's weights come inside this MIT-licensed package (we read its weight file).
.venv/bin/python -m pip install --quiet --disable-pip-version-check "digit-recognizer-py==0.1.0"

# Optional: Debian's chromium for the browser tests, only where it is missing. A failed install
# is not fatal here: outside CI those tests then skip, giving the reason kept in
# .venv/chromium-unavailable; under CI (CI set) they fail (tests/browser.py).
rm -f .venv/chromium-unavailable
if [ "$BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""
    elif command -v sudo >/dev/null; then SUDO="sudo"
    else SUDO="none"
    fi
    if ! command -v apt-get >/dev/null || [ "$SUDO" = none ]; then
        echo "cannot install chromium here (needs apt-get, as root or with sudo)" >.venv/chromium-unavailable
    elif ! { $SUDO apt-get update -qq \
        && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
        echo "apt-get install chromium failed" >.venv/chromium-unavailable
    fi
    if [ -f .venv/chromium-unavailable ]; then
        echo "note: $(cat .venv/chromium-unavailable); browser tests will be skipped" >&2
    fi
fi
