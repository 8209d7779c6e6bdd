#!/usr/bin/env bash
# Rebuild docs/results/: every experiment of docs/results.md, one after another, with times.
# Run folders go to runs/results/ (not committed); tables, JSON and plots are copied to
# docs/results/. Took 57 min on 2 CPU cores (docs/results/commands.txt has each time).
set -euo pipefail
cd "$(dirname "$0")/.."
SQDF=.venv/bin/sqdf
run() {  # name, sqdf compare arguments...
    local name=$1; shift
    rm -rf "runs/results/$name"
    local t0=$SECONDS
    "$SQDF" compare --out "runs/results/$name" --no-progress "$@" > /dev/null
    mkdir -p "docs/results/$name"
    cp runs/results/$name/{results.md,results.json,pareto.png,curves.png} "docs/results/$name/"
    [ -f "runs/results/$name/samples.png" ] && cp "runs/results/$name/samples.png" "docs/results/$name/"
    echo "$name: $((SECONDS - t0)) s: sqdf compare $*" | tee -a docs/results/commands.txt
}
: > docs/results/commands.txt
ALL=sqdf,draft,draft_lv,draft_kl,refl,alignprop,ddpo,best_of_n
run gmm2d-linear --task gmm2d --methods $ALL --seeds 3
run gmm2d-quadratic --task gmm2d --methods $ALL --seeds 3 --set reward='"quadratic"' --set gamma=1.0 --set estimator='"tweedie"'
run gmm2d-gamma --task gmm2d --methods sqdf --seeds 3 --sweep gamma=1.0,0.9,0.7
run gmm2d-estimator --task gmm2d --methods sqdf --seeds 3 --sweep estimator=tweedie,consistency
run gmm2d-buffer --task gmm2d --methods sqdf --seeds 3 --sweep buffer=uniform,on_policy,prioritized
run gmm2d-alpha --task gmm2d --methods sqdf --seeds 3 --sweep alpha=0.5,1.0,2.0,4.0
run digits-methods --task digits --config docs/results/digits.toml --methods sqdf,draft,draft_kl,ddpo,best_of_n --seeds 2 --num-samples 300
run digits-estimator --task digits --config docs/results/digits.toml --methods sqdf --seeds 2 --sweep estimator=tweedie,consistency --num-samples 300
