"""The GPU path's training-step peak memory, measured on any CPU: each variant's step as `deltalearn
bench model --dtype bfloat16` takes it, on the code path it takes on CUDA (the Triton rewrite and
read Functions), with every kernel launch recorded instead of made (`ops.triton_aot.recording`,
arguments not kept), under CPU bf16 autocast.

    python benchmarks/gpu_path_memory.py [--variants baseline,ddl,ddl-cc,ddl-tc] [--size small] \
        [--batch 1 --seq 1024] [--set KEY=VALUE ...] [--top 12] \
        [--gpu-baseline-gb 9.0 --gpu-tokens 8192]

Why: which tensors a step allocates and keeps is decided by the host code, not the device, so the
peak of allocated bytes (what `torch.cuda.max_memory_allocated` reports on a GPU) can be counted
here — `bench model`'s CPU memory measure, the allocator's events under `torch.profiler` — without a
GPU. Printed per variant: the step's peak above what was allocated before it, its excess over the
first variant (the baseline) and their ratio. What PyTorch's CPU ops allocate differs from its CUDA
kernels' (the CPU RMSNorm keeps its normalised input besides, for every variant alike), so the
ratio here is not the GPU's; DDL's excess is made of deltalearn's own tensors, the same on both.
With `--gpu-baseline-gb` (the baseline's peak measured on a GPU at `--gpu-tokens` tokens a step)
the GPU ratio is estimated as 1 + excess · (gpu tokens / tokens here) / that peak. `--top N`: the
N largest groups of allocations alive at each variant's peak, by the deltalearn line (and op)
that made them.
"""

from __future__ import annotations

import argparse
import collections
import re

import torch
from step_arguments import add_step_arguments, step_bench
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from deltalearn.bench.model import ModelBench, build_variant, step_peak_bytes
from deltalearn.ops import triton_aot
from deltalearn.train.host_allocator import keep_freed_memory

_SOURCE_LINE = re.compile(r"deltalearn/(.*\.py)\((\d+)\): (\w+)")


def _made_at(event) -> str:
    """Where an allocation was made: the innermost deltalearn line and the op around it."""
    line, ops, node = None, [], event.parent
    while node is not None:
        found = _SOURCE_LINE.search(node.name)
        if found and line is None:
            line = f"{found.group(1)}:{found.group(2)} {found.group(3)}"
        elif ".py(" not in node.name and not node.name.startswith("<") and len(ops) < 2:
            ops.append(node.name)
        node = node.parent
    return f"{line or '-'} | {' < '.join(ops)}"


def _events(nodes):
    for node in nodes:
        yield node
        yield from _events(node.children)


def peak_breakdown(step, top: int) -> list[tuple[int, int, str]]:
    """`(bytes, allocations, where made)` of the `top` largest groups alive at the step's peak."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        step()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = [e for e in _events(tree) if e.tag == _EventType.Allocation]
    live, at_peak, level, peak = {}, {}, 0, 0
    for event in sorted(allocations, key=lambda e: e.start_time_ns):
        size = event.extra_fields.alloc_size  # negative: a free
        level += size
        if size > 0:
            live[event.extra_fields.ptr] = (size, event)
        else:
            live.pop(event.extra_fields.ptr, None)
        if level > peak:
            peak, at_peak = level, dict(live)
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for size, event in at_peak.values():
        group = groups[_made_at(event)]
        group[0] += size
        group[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])[:top]
    return [(size, count, where) for where, (size, count) in ranked]


def measure(bench: ModelBench, top: int = 0) -> dict[str, tuple[int, list]]:
    """Per variant: the step's peak bytes and (with `top`) its breakdown."""
    keep_freed_memory("cpu")  # as `deltalearn train` and `bench model` run on a CPU
    results = {}
    with triton_aot.recording(keep_arguments=False) as launches:
        for variant in bench.variants:
            run = build_variant(bench, variant)
            run.train_step()  # AdamW state and the allocator's heap in place
            launches.clear()
            peak = step_peak_bytes(run.train_step, torch.device("cpu"))
            breakdown = peak_breakdown(run.train_step, top) if top else []
            launches.clear()
            results[variant] = peak, breakdown
            del run
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.add_argument("--top", type=int, default=0, help="groups alive at each peak to print")
    parser.add_argument("--gpu-baseline-gb", type=float, help="the baseline's peak on a GPU")
    parser.add_argument("--gpu-tokens", type=int, default=8 * 1024, help="its tokens a step")
    args = parser.parse_args()
    bench = step_bench(args, "bfloat16")
    results = measure(bench, args.top)
    base = results[bench.variants[0]][0]
    scale = args.gpu_tokens / (args.batch * args.seq)
    estimate = args.gpu_baseline_gb is not None
    head = "| variant | step peak MB | excess MB | × first |"
    print(head + (" est. GPU × |" if estimate else ""))
    print("|---" * (5 if estimate else 4) + "|")
    for variant, (peak, _) in results.items():
        row = f"| {variant} | {peak / 1e6:.1f} | {(peak - base) / 1e6:+.1f} | {peak / base:.3f} |"
        if estimate:
            row += f" {1 + (peak - base) * scale / (args.gpu_baseline_gb * 1e9):.3f} |"
        print(row)
    for variant, (peak, breakdown) in results.items():
        if breakdown:
            print(f"\n{variant}: alive at the peak ({peak / 1e6:.1f} MB), largest groups")
            for size, count, where in breakdown:
                print(f"{size / 1e6:9.1f} MB {count:5d}x  {where}")


if __name__ == "__main__":
    main()
