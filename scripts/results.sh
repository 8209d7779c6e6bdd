#!/usr/bin/env bash
# Rebuild docs/results/: the experiments of docs/results.md's pages, with the time each took.
#   scripts/results.sh                  every experiment, one after another
#   scripts/results.sh NAME [NAME...]   only those (e.g. digits-gamma); others' records stay
# Run folders go to runs/results/ (not committed); tables, JSON and plots are copied to
# docs/results/NAME/, and docs/results/commands.txt keeps one line per experiment: its time,
# the torch thread count it ran with, and the exact command.
set -euo pipefail
cd "$(dirname "$0")/.."
SQDF=.venv/bin/sqdf
LOG=docs/results/commands.txt
ALL=sqdf,draft,draft_lv,draft_kl,refl,alignprop,ddpo,best_of_n
BBO=sqdf,seiko,draft,alignprop,ddpo,best_of_n
GRPO_PARITY='method_params={std="population", global_std=true, group_by="condition", timestep_fraction=0.99, cell_order="sweep", drop_zero_advantage=true}'
DIGITS=(--task digits --config docs/results/digits.toml --num-samples 300)
declare -A EXPERIMENTS=(
    [gmm2d-linear]="--task gmm2d --methods $ALL --seeds 3"
    [gmm2d-quadratic]="--task gmm2d --methods $ALL --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie"
    [gmm2d-gamma]="--task gmm2d --methods sqdf --seeds 3 --sweep gamma=1.0,0.9,0.7"
    [gmm2d-estimator]="--task gmm2d --methods sqdf --seeds 3 --sweep estimator=tweedie,consistency,exact"
    # the exact soft value against the two x̂0 estimators where gamma = 1 makes it the right Q
    [gmm2d-estimator-gamma1]="--task gmm2d --methods sqdf --seeds 3 --set gamma=1.0 --sweep estimator=tweedie,consistency,exact"
    [gmm2d-quadratic-estimator]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --sweep estimator=tweedie,consistency,exact"
    [gmm2d-exact-steps]="--task gmm2d --methods sqdf --seeds 3 --set gamma=1.0 --set estimator=exact --sweep steps=300,1000"
    # where each estimator lands given time: 2000 updates
    [gmm2d-estimator-long]="--task gmm2d --methods sqdf --seeds 2 --set gamma=1.0 --set steps=2000 --sweep estimator=tweedie,exact"
    [gmm2d-exact-lr]="--task gmm2d --methods sqdf --seeds 2 --set gamma=1.0 --set estimator=exact --set steps=1000 --sweep lr=0.001,0.003"
    [gmm2d-exact-num-steps]="--task gmm2d --methods sqdf --seeds 2 --set gamma=1.0 --set estimator=exact --set steps=600 --set lr=0.003 --sweep num_steps=50,200"
    [gmm2d-quadratic-estimator-long]="--task gmm2d --methods sqdf --seeds 2 --set reward=quadratic --set gamma=1.0 --set steps=2000 --sweep estimator=tweedie,exact"
    # the Gaussian posterior's log-mean-exp (second-order Tweedie) against r(x̂0) and the exact soft value
    [gmm2d-gaussian-q]="--task gmm2d --methods sqdf --seeds 2 --set gamma=1.0 --sweep estimator=tweedie,gaussian_posterior,exact"
    [gmm2d-quadratic-gaussian-q]="--task gmm2d --methods sqdf --seeds 2 --set reward=quadratic --set gamma=1.0 --sweep estimator=tweedie,gaussian_posterior,exact"
    [gmm2d-buffer]="--task gmm2d --methods sqdf --seeds 3 --sweep buffer=uniform,on_policy,prioritized"
    [gmm2d-alpha]="--task gmm2d --methods sqdf --seeds 3 --sweep alpha=0.5,1.0,2.0,4.0"
    # the same two comparisons on the rectified-flow path (the flow SDE kernel, noise level 0.7)
    [gmm2d-flow-quadratic]="--task gmm2d --methods $ALL --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --set 'task_params={process=\"flow\"}'"
    [gmm2d-flow-linear]="--task gmm2d --methods $ALL --seeds 3 --set 'task_params={process=\"flow\"}'"
    # the flow path's gap, one factor at a time from gmm2d-flow-quadratic's sqdf row (tweedie,
    # noise level 0.7, 50 steps, gamma 1, 300 updates) toward the setting that lands
    # (one table of their rows, docs/results/gmm2d-flow-gap/: .venv/bin/python scripts/flow_gap_table.py)
    [gmm2d-flow-gap-estimator]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --set 'task_params={process=\"flow\"}' --sweep estimator=consistency,gaussian_posterior"
    [gmm2d-flow-gap-noise]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --sweep 'task_params=[{process=\"flow\", noise_level=1.0}, {process=\"flow\", noise_level=1.4142135623730951}]'"
    [gmm2d-flow-gap-noise-fine]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --sweep 'task_params=[{process=\"flow\", noise_level=0.85}, {process=\"flow\", noise_level=1.2}]'"
    # a level that runs linearly over the steps (noise_level at the first, noise_level_end at the last)
    [gmm2d-flow-gap-noise-schedule]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --sweep 'task_params=[{process=\"flow\", noise_level=1.4142135623730951, noise_level_end=0.7}, {process=\"flow\", noise_level=0.7, noise_level_end=1.4142135623730951}, {process=\"flow\", noise_level=1.4142135623730951, noise_level_end=0.35}, {process=\"flow\", noise_level=1.2, noise_level_end=0.5}]'"
    [gmm2d-flow-gap-num-steps]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --set 'task_params={process=\"flow\"}' --sweep num_steps=10,20,200"
    [gmm2d-flow-gap-updates]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --set 'task_params={process=\"flow\"}' --sweep steps=1000"
    [gmm2d-flow-gap-gamma]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set estimator=tweedie --set 'task_params={process=\"flow\"}' --sweep gamma=0.9"
    [gmm2d-flow-gap-shift]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --sweep 'task_params=[{process=\"flow\", shift=3.0}]'"
    # at noise level sqrt 2, where the exact soft value exists: each estimator, then 200 steps
    [gmm2d-flow-gap-full-noise]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --set 'task_params={process=\"flow\", noise_level=1.4142135623730951}' --sweep estimator=exact,consistency,gaussian_posterior"
    [gmm2d-flow-gap-full-noise-200]="--task gmm2d --methods sqdf --seeds 3 --set reward=quadratic --set gamma=1.0 --set 'task_params={process=\"flow\", noise_level=1.4142135623730951}' --set num_steps=200 --sweep estimator=exact,tweedie"
    # the setting that lands (the preset gmm2d-exact on the flow path at noise level sqrt 2), on this well
    [gmm2d-flow-gap-preset]="--task gmm2d --methods sqdf --seeds 1 --preset gmm2d-exact --set reward=quadratic --task-param process=flow --task-param noise_level=1.4142135623730951"
    # each method over its own regularisation, against the exact reward-KL frontier
    # (draft and alignprop diverge on the unbounded linear reward: gmm2d-linear; they are on the well)
    [gmm2d-frontier]="--task gmm2d --frontier --methods sqdf,draft_kl,best_of_n --seeds 2"
    [gmm2d-quadratic-frontier]="--task gmm2d --frontier --methods sqdf,draft_kl,draft,grpo,best_of_n --seeds 2 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --frontier-values sqdf=8,2,0.5 --frontier-values draft_kl=8,2,0.5"
    # the same at gamma 1 with the exact soft value: the frontier SQDF reaches without Q error
    [gmm2d-frontier-exact]="--task gmm2d --frontier --methods sqdf,best_of_n --seeds 2 --set gamma=1.0 --set estimator=exact"
    [digits-frontier]="${DIGITS[*]} --frontier --methods sqdf,draft_kl,draft,best_of_n --seeds 2 --frontier-values sqdf=0.4,0.1,0.025 --frontier-values draft_kl=0.4,0.1,0.025"
    # where SQDF lands on random mixtures (2-8 modes), against each one's exact optimum
    [gmm2d-families-estimator]="families --families 4 --alphas 1.0,4.0 --sweep estimator=tweedie,gaussian_posterior,exact --set gamma=1.0"
    [gmm2d-families-tweedie-200]="families --families 4 --alphas 1.0 --sweep estimator=tweedie --set gamma=1.0 --set num_steps=200 --set lr=0.003 --set steps=1000"
    [gmm2d-families-buffer]="families --families 4 --alphas 1.0 --sweep buffer=uniform,on_policy,prioritized --set gamma=1.0 --set estimator=exact"
    [gmm2d-families-updates]="families --families 4 --alphas 1.0 --sweep steps=300,1000 --set gamma=1.0 --set estimator=exact"
    [gmm2d-families-hidden64]="families --families 4 --alphas 1.0 --sweep estimator=exact --set gamma=1.0 --set 'task_params={hidden = 64}'"
    [gmm2d-families-hidden256]="families --families 4 --alphas 1.0 --sweep estimator=exact --set gamma=1.0 --set 'task_params={hidden = 256}'"
    [gmm2d-families-200-long]="families --families 4 --alphas 1.0 --sweep steps=1000 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set lr=0.003"
    # the same 1,000 updates under a cosine decay from twice the peak (the same mean rate)
    [gmm2d-families-200-cosine]="families --families 4 --alphas 1.0 --sweep lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000"
    [gmm2d-families-num-steps]="families --families 4 --alphas 1.0 --sweep num_steps=50,200 --set gamma=1.0 --set estimator=exact --set lr=0.003 --set steps=600"
    # no training: the best fixed-variance Gaussian steps with the exact soft value (the floor)
    [gmm2d-families-floor]="floor --families 4 --projections sqdf,first_order,moment --num-steps 50,200"
    # the num-steps table's runs with the soft Q taken to first order at the reference's step mean
    [gmm2d-families-q-at-mean]="families --families 4 --alphas 1.0 --sweep num_steps=50,200 --set gamma=1.0 --set estimator=exact --set lr=0.003 --set steps=600 --set 'method_params={q_at = \"reference_mean\"}'"
    # both: the first-order Q under the cosine decay, 200 steps, 1,000 updates
    [gmm2d-families-200-cosine-q-at-mean]="families --families 4 --alphas 1.0 --sweep lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}'"
    # and four micro-batches of replayed cells an update (the same fresh samples)
    [gmm2d-families-200-cosine-q-at-mean-accum4]="families --families 4 --alphas 1.0 --sweep grad_accum=4 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}'"
    [gmm2d-families-200-cosine-q-at-mean-accum8]="families --families 4 --alphas 1.0 --sweep grad_accum=8 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}'"
    # the preset's settings with 3 seeds a mixture (seed 0 is the run above again)
    [gmm2d-families-exact-seeds]="families --families 4 --seeds 3 --alphas 1.0 --sweep grad_accum=8 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}'"
    # the recommended settings (preset gmm2d-exact) at the other alphas, with their floor
    [gmm2d-families-exact-alphas]="families --families 4 --alphas 0.5,2.0,4.0 --sweep grad_accum=8 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}'"
    [gmm2d-families-floor-alphas]="floor --families 4 --alphas 0.5,2.0,4.0 --projections first_order,sqdf --num-steps 200"
    # the Gaussian posterior's covariance, full or isotropic (one Hutchinson probe)
    [gmm2d-families-q-cov]="families --families 4 --alphas 1.0,4.0 --sweep q_cov=full,isotropic --set estimator=gaussian_posterior --set gamma=1.0"
    # training-free soft values at the recommended settings (the preset's, estimator swapped)
    [gmm2d-families-exact-settings-training-free]="families --families 4 --alphas 1.0 --sweep estimator=tweedie,gaussian_posterior --set q_cov=isotropic --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set num_steps=200 --set steps=1000 --set grad_accum=8 --set 'method_params={q_at = \"reference_mean\"}'"
    # the consistency model beside the estimator table's three
    [gmm2d-families-consistency]="families --families 4 --alphas 1.0,4.0 --sweep estimator=consistency --set gamma=1.0"
    # the recommended settings on the flow path (the exact value needs the SDE at noise level sqrt 2)
    [gmm2d-families-flow-exact]="families --families 4 --alphas 1.0 --sweep estimator=exact --set 'task_params={process = \"flow\", noise_level = 1.4142135623730951}' --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set num_steps=200 --set steps=1000 --set grad_accum=8 --set 'method_params={q_at = \"reference_mean\"}'"
    # the same with 3 seeds a mixture (seed 0 is the run above again), and on the held-out mixtures 4-7
    [gmm2d-families-flow-exact-seeds]="families --families 4 --seeds 3 --alphas 1.0 --sweep estimator=exact --set 'task_params={process = \"flow\", noise_level = 1.4142135623730951}' --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set num_steps=200 --set steps=1000 --set grad_accum=8 --set 'method_params={q_at = \"reference_mean\"}'"
    [gmm2d-families-flow-exact-heldout]="families --families 4 --first-family 4 --alphas 1.0 --sweep estimator=exact --set 'task_params={process = \"flow\", noise_level = 1.4142135623730951}' --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set num_steps=200 --set steps=1000 --set grad_accum=8 --set 'method_params={q_at = \"reference_mean\"}'"
    [gmm2d-families-flow-exact-alphas]="families --families 4 --alphas 0.5,2.0,4.0 --sweep estimator=exact --set 'task_params={process = \"flow\", noise_level = 1.4142135623730951}' --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set num_steps=200 --set steps=1000 --set grad_accum=8 --set 'method_params={q_at = \"reference_mean\"}'"
    # the Gaussian-step floor on the flow path at its full noise level (the only one with the exact value)
    [gmm2d-families-flow-floor]="floor --families 4 --projections first_order --num-steps 50,200 --task-param process=flow --task-param noise_level=1.4142135623730951"
    # training-free Tweedie on the flow path at noise level 1.0, 50 steps, 300 updates
    [gmm2d-families-flow-tweedie-a1]="families --families 4 --alphas 1.0 --seeds 3 --sweep estimator=tweedie --set gamma=1.0 --set 'task_params={process = \"flow\", noise_level = 1.0}'"
    # the same at Flow-GRPO's 0.7, the sd task's flow default
    [gmm2d-families-flow-tweedie-a07]="families --families 4 --alphas 1.0 --seeds 3 --sweep estimator=tweedie --set gamma=1.0 --set 'task_params={process = \"flow\", noise_level = 0.7}'"
    # at noise level sqrt 2 with the training-free soft value that has the posterior's spread (the
    # Gaussian posterior, isotropic: one Hutchinson probe), 50 steps, 300 updates
    [gmm2d-families-flow-posterior]="families --families 4 --alphas 1.0 --seeds 3 --sweep estimator=gaussian_posterior --set q_cov=isotropic --set gamma=1.0 --set 'task_params={process = \"flow\", noise_level = 1.4142135623730951}'"
    # the same at 200 steps (one seed): what the 50-step floor's overshoot leaves
    [gmm2d-families-flow-posterior-200]="families --families 4 --alphas 1.0 --sweep estimator=gaussian_posterior --set q_cov=isotropic --set gamma=1.0 --set num_steps=200 --set 'task_params={process = \"flow\", noise_level = 1.4142135623730951}'"
    # the isotropic Gaussian posterior with the preset's training (its 200 steps, 1,000 updates,
    # 8 micro-batches, cosine decay, first-order Q) at full noise: is the rest the training?
    [gmm2d-families-flow-posterior-preset]="families --families 4 --alphas 1.0 --sweep estimator=gaussian_posterior --set q_cov=isotropic --set grad_accum=8 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}' --set 'task_params={process = \"flow\", noise_level = 1.4142135623730951}'"
    # the recommended settings on four mixtures they were not chosen on (mixtures 4-7)
    [gmm2d-families-exact-heldout]="families --families 4 --first-family 4 --alphas 1.0 --sweep grad_accum=8 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}'"
    [gmm2d-families-floor-heldout]="floor --families 4 --first-family 4 --projections first_order --num-steps 200"
    # sixteen micro-batches an update
    [gmm2d-families-exact-accum16]="families --families 4 --alphas 1.0 --sweep grad_accum=16 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}'"
    # on the held-out mixtures: sixteen micro-batches, and a policy network twice as wide
    [gmm2d-families-exact-heldout-accum16]="families --families 4 --first-family 4 --alphas 1.0 --sweep grad_accum=16 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}'"
    [gmm2d-families-exact-heldout-hidden256]="families --families 4 --first-family 4 --alphas 1.0 --sweep grad_accum=8 --set 'task_params={hidden = 256}' --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000 --set 'method_params={q_at = \"reference_mean\"}'"
    # the two held-out runs furthest from the target's shape, given 2 and 4 times the updates
    [gmm2d-family6-linear-exact-updates]="families --families 1 --first-family 6 --rewards linear --alphas 1.0 --sweep steps=1000,2000,4000 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set grad_accum=8 --set 'method_params={q_at = \"reference_mean\"}'"
    [gmm2d-family4-quadratic-exact-updates]="families --families 1 --first-family 4 --rewards quadratic --alphas 1.0 --sweep steps=1000,2000,4000 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set grad_accum=8 --set 'method_params={q_at = \"reference_mean\"}'"
    # the W2 floor read 8 times a mixture, and those runs' W2 bound against its mean
    [gmm2d-families-w2-floor-noise]="noise --families 8 --draws 8 --summary docs/results/gmm2d-families-200-cosine-q-at-mean-accum8/summary.json --summary docs/results/gmm2d-families-exact-heldout/summary.json --summary docs/results/gmm2d-families-exact-heldout-accum16/summary.json --summary docs/results/gmm2d-families-exact-heldout-hidden256/summary.json --summary docs/results/gmm2d-family6-linear-exact-updates/summary.json --summary docs/results/gmm2d-family4-quadratic-exact-updates/summary.json"
    # the same with the soft Q at the drawn sample (the paper's): what q_at adds
    [gmm2d-families-200-cosine-accum4]="families --families 4 --alphas 1.0 --sweep grad_accum=4 --set lr=0.006 --set lr_schedule=cosine --set lr_warmup=50 --set gamma=1.0 --set estimator=exact --set num_steps=200 --set steps=1000"
    [gmm2d-families-gamma]="families --families 4 --alphas 1.0 --sweep gamma=1.0,0.9,0.7 --set estimator=exact"
    [digits-methods]="${DIGITS[*]} --methods $ALL --seeds 3"
    # GRPO (added after the tables above were run): its rows with the same settings
    [gmm2d-quadratic-grpo]="--task gmm2d --methods grpo --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie"
    [gmm2d-flow-quadratic-grpo]="--task gmm2d --methods grpo --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --set 'task_params={process=\"flow\"}'"
    [digits-grpo]="${DIGITS[*]} --methods grpo --seeds 3"
    # the same GRPO rows with Flow-GRPO's advantages, groups and cells (docs/flow-grpo.md)
    [gmm2d-quadratic-grpo-parity]="--task gmm2d --methods grpo --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --set '$GRPO_PARITY'"
    [gmm2d-flow-quadratic-grpo-parity]="--task gmm2d --methods grpo --seeds 3 --set reward=quadratic --set gamma=1.0 --set estimator=tweedie --set 'task_params={process=\"flow\"}' --set '$GRPO_PARITY'"
    [digits-grpo-parity]="${DIGITS[*]} --methods grpo --seeds 3 --set '$GRPO_PARITY'"
    [digits-gamma]="${DIGITS[*]} --methods sqdf --seeds 3 --sweep gamma=1.0,0.9,0.7"
    [digits-estimator]="${DIGITS[*]} --methods sqdf --seeds 3 --sweep estimator=tweedie,consistency"
    # the Gaussian posterior with its isotropic covariance, beside digits-estimator's two
    [digits-posterior]="${DIGITS[*]} --methods sqdf --seeds 3 --sweep estimator=gaussian_posterior --set q_cov=isotropic"
    [digits-buffer]="${DIGITS[*]} --methods sqdf --seeds 3 --set replay_ratio=1 --sweep buffer=on_policy,uniform,prioritized"
    [digits-alpha]="${DIGITS[*]} --methods sqdf --seeds 3 --sweep alpha=0.03,0.1,0.3"
    # online black-box optimisation (sqdf bbo): every method at the same oracle query budget
    [bbo-gmm2d]="bbo --task gmm2d --methods $BBO --seeds 3 --set reward=quadratic --set num_steps=20 --set estimator=tweedie --set gamma=1.0 --set alpha=1.0 --set batch_size=64 --rounds 8 --queries-per-round 64 --updates-per-round 50"
    [bbo-digits]="bbo --task digits --config docs/results/digits.toml --methods $BBO --seeds 3 --rounds 4 --queries-per-round 64 --updates-per-round 20"
    # the two closest at 256 queries, at twice the budget: does SQDF catch up with best-of-N?
    [bbo-digits-512]="bbo --task digits --config docs/results/digits.toml --methods sqdf,best_of_n --seeds 3 --rounds 8 --queries-per-round 64 --updates-per-round 20"
)
ORDER=(gmm2d-linear gmm2d-quadratic gmm2d-gamma gmm2d-estimator gmm2d-estimator-gamma1
       gmm2d-quadratic-estimator gmm2d-exact-steps gmm2d-estimator-long
       gmm2d-quadratic-estimator-long gmm2d-exact-lr gmm2d-exact-num-steps gmm2d-gaussian-q gmm2d-quadratic-gaussian-q gmm2d-buffer gmm2d-alpha
       gmm2d-flow-quadratic gmm2d-flow-linear gmm2d-flow-gap-estimator gmm2d-flow-gap-noise gmm2d-flow-gap-noise-fine gmm2d-flow-gap-noise-schedule gmm2d-flow-gap-num-steps gmm2d-flow-gap-updates gmm2d-flow-gap-gamma gmm2d-flow-gap-shift gmm2d-flow-gap-full-noise gmm2d-flow-gap-full-noise-200 gmm2d-flow-gap-preset gmm2d-frontier gmm2d-frontier-exact gmm2d-quadratic-frontier gmm2d-families-estimator gmm2d-families-num-steps gmm2d-families-floor gmm2d-families-q-at-mean gmm2d-families-gamma gmm2d-families-200-long gmm2d-families-200-cosine gmm2d-families-200-cosine-q-at-mean gmm2d-families-200-cosine-q-at-mean-accum4 gmm2d-families-200-cosine-q-at-mean-accum8 gmm2d-families-exact-seeds gmm2d-families-200-cosine-accum4 gmm2d-families-exact-alphas gmm2d-families-floor-alphas gmm2d-families-exact-accum16 gmm2d-families-exact-heldout gmm2d-families-floor-heldout gmm2d-families-exact-heldout-accum16 gmm2d-families-exact-heldout-hidden256 gmm2d-family6-linear-exact-updates gmm2d-family4-quadratic-exact-updates gmm2d-families-w2-floor-noise gmm2d-families-q-cov gmm2d-families-exact-settings-training-free gmm2d-families-consistency gmm2d-families-flow-exact gmm2d-families-flow-exact-seeds gmm2d-families-flow-exact-heldout gmm2d-families-flow-exact-alphas gmm2d-families-flow-floor gmm2d-families-flow-tweedie-a1 gmm2d-families-flow-tweedie-a07 gmm2d-families-flow-posterior gmm2d-families-flow-posterior-200 gmm2d-families-flow-posterior-preset gmm2d-families-tweedie-200 gmm2d-families-buffer gmm2d-families-updates gmm2d-families-hidden64 gmm2d-families-hidden256 digits-methods gmm2d-quadratic-grpo gmm2d-flow-quadratic-grpo digits-grpo gmm2d-quadratic-grpo-parity gmm2d-flow-quadratic-grpo-parity digits-grpo-parity digits-gamma digits-estimator digits-posterior digits-buffer digits-alpha digits-frontier bbo-gmm2d bbo-digits bbo-digits-512)
run() {  # name
    local name=$1 t0=$SECONDS
    local -a args
    eval "args=(${EXPERIMENTS[$name]})"
    local command=compare files=(results.md results.json pareto.png curves.png)
    if [ "${args[0]}" = bbo ]; then  # an entry may name its command; compare by default
        command=bbo files=(results.md results.json bbo_curve.png)
        args=("${args[@]:1}")
    elif [ "${args[0]}" = families ] || [ "${args[0]}" = floor ]; then
        # scripts/gmm_families.py: compare on random mixtures; scripts/gaussian_floor.py: the
        # Gaussian-step floor on the same mixtures
        command=${args[0]} files=(summary.md summary.json families.json)
        args=("${args[@]:1}")
    elif [ "${args[0]}" = noise ]; then  # scripts/w2_floor_noise.py: the W2 floor's spread
        command=noise files=(floor_noise.json)
        args=("${args[@]:1}")
    fi
    rm -rf "runs/results/$name"
    if [ "$command" = families ]; then
        .venv/bin/python scripts/gmm_families.py --out "runs/results/$name" "${args[@]}" > /dev/null
    elif [ "$command" = floor ]; then
        .venv/bin/python scripts/gaussian_floor.py --out "runs/results/$name" "${args[@]}" > /dev/null
    elif [ "$command" = noise ]; then
        .venv/bin/python scripts/w2_floor_noise.py --out "runs/results/$name" "${args[@]}" > /dev/null
    else
        "$SQDF" "$command" --out "runs/results/$name" --no-progress "${args[@]}" > /dev/null
    fi
    mkdir -p "docs/results/$name"
    for f in "${files[@]}"; do cp "runs/results/$name/$f" "docs/results/$name/"; done
    for f in samples.png frontier.md frontier.json frontier.png; do  # where the run wrote them
        [ -f "runs/results/$name/$f" ] && cp "runs/results/$name/$f" "docs/results/$name/"
    done
    local line="$name: $((SECONDS - t0)) s, threads=${OMP_NUM_THREADS:-all}: sqdf $command --out runs/results/$name --no-progress ${args[*]}"
    [ "$command" = families ] && line="$name: $((SECONDS - t0)) s, threads=${OMP_NUM_THREADS:-all}: python scripts/gmm_families.py --out runs/results/$name ${args[*]}"
    [ "$command" = floor ] && line="$name: $((SECONDS - t0)) s, threads=${OMP_NUM_THREADS:-all}: python scripts/gaussian_floor.py --out runs/results/$name ${args[*]}"
    [ "$command" = noise ] && line="$name: $((SECONDS - t0)) s, threads=${OMP_NUM_THREADS:-all}: python scripts/w2_floor_noise.py --out runs/results/$name ${args[*]}"
    # flock: several invocations may run side by side (e.g. one torch thread each)
    (flock 9; { grep -v "^$name: " "$LOG" || true; } > "$LOG.tmp"; echo "$line" >> "$LOG.tmp"
     mv "$LOG.tmp" "$LOG") 9> "$LOG.lock"
    echo "$line"
}
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
    [ -n "${EXPERIMENTS[$name]+x}" ] || { echo "unknown experiment $name; known: ${ORDER[*]}" >&2; exit 2; }
done
for name in "${names[@]}"; do run "$name"; done
