#!/usr/bin/env bash
# One prepared device check (a GPU session's budget is minutes): the CUDA tests, then the
# whole-model benchmark at `small`, bf16, 8 x 1024, fused path and reference path, then cached
# generation with the static cache and a compiled decode step.
# Usage (repo root, venv with torch+CUDA and triton):  bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -x tests/test_cuda_ops.py tests/test_cuda_model.py tests/test_cuda_distributed.py \
    tests/test_ops_epilogue.py 2>&1 | tail -25 | tee "$out/cuda_tests.txt"
for impl in default reference; do
    timeout 240 deltalearn bench model --size small --dtype bfloat16 --batch 8 --seq 1024 \
        --variants baseline,ddl,ddl-cc,ddl-tc,write-only-cc --repeats 5 --impl "$impl" \
        --json "$out/h200_model_${impl}.json" 2>&1 | tail -9
done
# cached generation: dynamic vs static cache, eager vs compiled (CUDA graphs) decode step
timeout 240 deltalearn bench decode --size small --dtype bfloat16 --variants baseline,ddl,ddl-cc \
    --tokens 128 --repeats 5 --json "$out/h200_decode.json" 2>&1 | tail -12
