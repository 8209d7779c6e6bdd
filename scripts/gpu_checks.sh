#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for the lent GPU machine (the `device` tool):
# the GPU tests, then the Stable Diffusion benchmarks at SD 1.5 size on random weights.
# Results go to $OUT (JSON) and to stdout; copy the tables into docs/performance.md.
#
# On the device machine diffusers and the evaluator's package are missing: carry wheels in
# .whl/ (pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl
#  diffusers==0.42.1 importlib_metadata digit-recognizer-py==0.1.0) and run
#     bash scripts/gpu_checks.sh [STAGE...]      with carry [".whl"]
# Stages (default: sd15 tests knobs, in this order, most wanted first; sdxl only when named;
# device time is short,
# so give one stage per call, `sd15` first; each is meant to fit one 10-minute call, but none
# has been timed on a GPU yet):
#   sd15    one gradient step's peak memory (step_memory.py, which prints sqdf.cost's traced
#           estimate of the same step beside max_memory_allocated; also with the isotropic Gaussian
#           posterior's soft value at 4 draws), then the five update designs
#           at SD 1.5 size (s/update, sampling share, peak memory, reward gain/s): issue 6's
#           24 GB check and issue 7's table
#   tests   tests/test_gpu.py and the FSDP config through accelerate launch on one GPU
#   knobs   the reference design at SD 1.5 size: as is, without gradient checkpointing,
#           with channels_last, with torch.compile
#   sdxl    SDXL size (random parts, LCM-LoRA x̂0, bf16): one gradient step's peak memory at
#           batch 2 x 1024 px and batch 4 x 512 px, then s/update of the reference design
#           and replay4 at each (issue 16's table). Writing the random SDXL parts (~15 GB)
#           takes minutes of the call; /tmp/sdxl keeps them for a rerun on a warm machine
#   flow    SD 3.5 Medium size on the flow kernel (random parts: its 2.2 B-parameter
#           transformer in bf16, CLIP-L/G, no T5; Tweedie's x̂0): one gradient step's peak
#           memory at batch 4 x 512 px, then s/update of the reference design and replay4
#           (issue 20's table). Only when named, like sdxl
#   flux    FLUX.1-dev size on the flow kernel (random parts: its 11.9 B-parameter transformer
#           in bf16, CLIP-L, a T5 of T5-XXL's width with 2 of its 24 layers, as prompts are
#           encoded once and the encoders let go; Tweedie's x̂0; the guidance scale an input,
#           one pass per step): one gradient step's peak memory at batch 4 x 512 px and batch
#           1 x 1024 px, then s/update of the reference design and replay4 at batch 4 x 512 px
#           (s/update at 1024 px is left out: by estimate it would not fit the same call).
#           Only when named, like sdxl. The parts (~27 GB in /tmp/fluxdev) are initialised on
#           the GPU, then written (estimated 1-3 minutes, not timed); a warm machine that
#           still holds /tmp/sdxl and /tmp/sd35m has little of its 64 GiB disk left for them
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(sd15 tests knobs)  # sdxl, flow, flux: only when asked (minutes of writing parts)
for stage in "${stages[@]}"; do
    case $stage in
    tests)
        python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -3
        python3 -c "from sqdf.tasks.sd_random import write_parts; write_parts('/tmp/tiny')"
        python3 -m accelerate.commands.launch \
            --config_file configs/accelerate/fsdp_full_finetune.yaml \
            --num_processes 1 -m sqdf.cli train --task sd --model /tmp/tiny/sd \
            --task-param finetune=full --reward aesthetic --reward-param clip=/tmp/tiny/clip \
            --reward-param head=/tmp/tiny/head.safetensors --num-steps 4 --batch-size 2 \
            --steps 2 --checkpoint-every 1 --out "$OUT/fsdp-tiny" --no-progress
        ;;
    sd15)
        python3 benchmarks/step_memory.py --preset sd15 --parts /tmp/sd15 \
            --out "$OUT/sd15-step.json"
        # the same step with the isotropic Gaussian posterior's soft value (4 draws)
        python3 benchmarks/step_memory.py --preset sd15 --parts /tmp/sd15 \
            --set estimator=gaussian_posterior --set q_cov=isotropic --set q_draws=4 \
            --out "$OUT/sd15-step-posterior.json"
        python3 benchmarks/update_speed.py --task sd --preset sd15 --updates 9 \
            --eval-samples 8 --parts /tmp/sd15 --out "$OUT/sd15-speed.json"
        ;;
    knobs)  # each against the reference design of the same call
        for knob in "" gradient_checkpointing=false channels_last=true compile=true; do
            python3 benchmarks/update_speed.py --task sd --preset sd15 --designs reference \
                --updates 6 --eval-samples 0 --parts /tmp/sd15 ${knob:+--task-param "$knob"} \
                --out "$OUT/sd15-knob-${knob:-none}.json"
        done
        ;;
    sdxl)
        python3 -c "from sqdf.tasks.sd_random import write_parts; write_parts('/tmp/sdxl', 'sdxl')"
        for size in "2 1024" "4 512"; do
            set -- $size
            python3 benchmarks/step_memory.py --preset sdxl --parts /tmp/sdxl --batch-size "$1" \
                --resolution "$2" --out "$OUT/sdxl-step-b$1-$2px.json"
            python3 benchmarks/update_speed.py --task sd --preset sdxl --parts /tmp/sdxl \
                --batch-size "$1" --task-param resolution="$2" --designs reference,replay4 \
                --updates 5 --eval-samples 0 --out "$OUT/sdxl-speed-b$1-$2px.json"
        done
        ;;
    flow)
        python3 -c "from sqdf.tasks.sd_random import write_parts; write_parts('/tmp/sd35m', 'sd35m')"
        python3 benchmarks/step_memory.py --preset sd35m --parts /tmp/sd35m --batch-size 4 \
            --resolution 512 --out "$OUT/sd35m-step-b4-512px.json"
        python3 benchmarks/update_speed.py --task sd --preset sd35m --parts /tmp/sd35m \
            --batch-size 4 --task-param resolution=512 --designs reference,replay4 \
            --updates 5 --eval-samples 0 --out "$OUT/sd35m-speed-b4-512px.json"
        ;;
    flux)
        python3 -c "from sqdf.tasks.sd_random import write_parts; write_parts('/tmp/fluxdev', 'fluxdev')"
        for size in "4 512" "1 1024"; do
            set -- $size
            python3 benchmarks/step_memory.py --preset fluxdev --parts /tmp/fluxdev \
                --batch-size "$1" --resolution "$2" --out "$OUT/fluxdev-step-b$1-$2px.json"
        done
        python3 benchmarks/update_speed.py --task sd --preset fluxdev --parts /tmp/fluxdev \
            --batch-size 4 --task-param resolution=512 --designs reference,replay4 \
            --updates 5 --eval-samples 0 --out "$OUT/fluxdev-speed-b4-512px.json"
        ;;
    *) echo "unknown stage $stage (tests, sd15, knobs, sdxl, flow, flux)" >&2; exit 2 ;;
    esac
done
