#!/usr/bin/env bash
# Regenerate docs/images/demo.png, the picture the README's quick start shows: the demo's
# reference, SQDF and ReFL grids side by side from the same noise and classes, with the
# evaluation's reward and agreement under each (RUN/demo.png of a fresh `sqdf demo`; about
# 3 minutes on 2 cores). The demo's table and timing are printed as it runs.
#   scripts/demo_picture.sh              with .venv/bin/sqdf
#   SQDF="python -m sqdf" scripts/demo_picture.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SQDF=${SQDF:-.venv/bin/sqdf}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$SQDF demo --out "$tmp/demo" --no-progress
mkdir -p docs/images
cp "$tmp/demo/demo.png" docs/images/demo.png
size=$(stat -c %s docs/images/demo.png)
echo "wrote docs/images/demo.png ($size bytes)"
if [ "$size" -ge 200000 ]; then
    echo "docs/images/demo.png is $size bytes: keep it under 200 KB (lower the picture's dpi)" >&2
    exit 1
fi
