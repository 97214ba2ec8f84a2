#!/usr/bin/env bash
# The GPU measurements of issue 6, in chunks of a few minutes each (compilation of Swin-B takes
# 1-2 minutes per compiled case). Run from the repository root on the GPU machine:
#   pip install -e '.[bench]' && bash experiments/benchmarks/run_gpu.sh
# Writes experiments/results/bench_step_<gpu>_<chunk>.md (+ .json); commit them.
set -euo pipefail
GPU=${GPU:-$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")}
OUT=experiments/results
COMMON=(--device cuda --model swin_base --batch 32 64 --views dino authors
        --warmup 5 --iters 10 --repeats 3)
run() {  # chunk name, extra arguments
  python experiments/benchmarks/bench_step.py "${COMMON[@]}" "${@:2}" \
      --out "$OUT/bench_step_${GPU}_$1.md" --json "$OUT/bench_step_${GPU}_$1.json"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
run baselines --impl authors lightly
run eager     --impl midol midol-dinoce midol-dino --compile off --ckpt off on --sync-audit
run compile   --impl midol midol-dino --compile on --ckpt off on
run compile-dinoce --impl midol-dinoce --compile on --ckpt off on
