"""What a compiled training step asks of a GPU, counted on any CPU: the kernels and the bytes of
Inductor's forward and backward graphs for each variant, as `deltalearn train --compile` compiles
them (the model compiled in place, bf16 autocast by default).

    python benchmarks/compiled_graph.py [--variants baseline,ddl,ddl-cc,ddl-tc] [--size small] \
        [--batch 1 --seq 1024] [--set KEY=VALUE ...] [--dtype bfloat16|float32] [--json FILE] \
        [--device cuda]

Why: on a GPU the compiled step is the fast path (an H200 ran the compiled baseline 1.98× faster
than the eager one), and what a DDL variant adds to it is kernels — each a launch and a pass of its
own — and bytes moved by memory-bound kernels. Which kernels Inductor makes, and which tensors
each reads and writes, is decided by the traced program, not by the device, so both can be
counted here: Inductor's own per-graph metrics (`count_bytes`: each scheduled kernel's reads and
writes, library calls included) with the code generated for a CPU. Inductor's CPU backend fuses
somewhat differently from its Triton one, so the counts are the CPU's; the differences between
variants come from the traced program, which is the same on both. With `--device cuda` (on a GPU
machine) the counts are those of the Triton code Inductor generates there: the check that its
Triton scheduler fuses what the CPU's does (`gpu_check.sh` stage `graphs`, two layers: seconds
of compiling, not minutes). Every graph is compiled afresh
(the FX graph and AOT autograd caches off: a cached graph reports no metrics), about 1–4 minutes a
variant at `small` on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from step_arguments import add_step_arguments, step_bench

from deltalearn.bench.model import ModelBench, build_variant

_METRICS_LOGGER = "torch._inductor.compile_fx.__inductor_metrics"


class _GraphMetrics(logging.Filter):
    """Keeps the metrics Inductor logs for each graph it compiles, in order, and drops the record
    (a page of text a graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.graphs: list[dict] = []

    def filter(self, record: logging.LogRecord) -> bool:
        metrics = record.args  # one dict argument: logging keeps the dict itself
        if isinstance(metrics, dict) and "num_bytes_accessed" in metrics:
            kinds = [type(node).__name__ for node, _ in metrics["nodes_num_elem"]]
            self.graphs.append(
                {
                    "bytes": int(metrics["num_bytes_accessed"]),
                    "kernels": sum(kind != "NopKernelSchedulerNode" for kind in kinds),
                    "library_calls": kinds.count("ExternKernelSchedulerNode"),
                }
            )
        return False


def count(bench: ModelBench) -> dict[str, dict]:
    """Per variant: the `forward` and `backward` graphs' bytes, kernels and library calls, and
    `first_step_s`, the seconds of the first training step (both compiles and a step)."""
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._logging.set_logs(inductor_metrics=True)
    logger = logging.getLogger(_METRICS_LOGGER)
    handler = _GraphMetrics()
    logger.addFilter(handler)
    results = {}
    try:
        for variant in bench.variants:
            torch._dynamo.reset()
            handler.graphs.clear()
            run = build_variant(bench, variant)
            start = time.perf_counter()
            run.train_step()  # compiles the forward graph, then the backward
            seconds = time.perf_counter() - start
            if len(handler.graphs) != 2:
                raise RuntimeError(
                    f"{variant}: expected a forward and a backward graph, Inductor compiled "
                    f"{len(handler.graphs)} (a graph break?)"
                )
            forward, backward = handler.graphs
            results[variant] = {"forward": forward, "backward": backward, "first_step_s": seconds}
            del run
    finally:
        logger.removeFilter(handler)
        torch._logging.set_logs()
    return results


def table(results: dict[str, dict]) -> str:
    base = results[next(iter(results))]
    base_bytes = base["forward"]["bytes"] + base["backward"]["bytes"]
    base_kernels = base["forward"]["kernels"] + base["backward"]["kernels"]
    lines = [
        "| variant | forward kernels (library) | backward kernels (library) | kernels × first "
        "| forward MB | backward MB | bytes × first | first step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, counts in results.items():
        fwd, bwd = counts["forward"], counts["backward"]
        total_bytes = fwd["bytes"] + bwd["bytes"]
        kernels = fwd["kernels"] + bwd["kernels"]
        lines.append(
            f"| {variant} | {fwd['kernels']} ({fwd['library_calls']}) | {bwd['kernels']} "
            f"({bwd['library_calls']}) | {kernels / base_kernels:.3f} | {fwd['bytes'] / 1e6:.1f} "
            f"| {bwd['bytes'] / 1e6:.1f} | {total_bytes / base_bytes:.3f} | "
            f"{counts['first_step_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", help="also write the counts here")
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda: Inductor's Triton code on a GPU"
    )
    args = parser.parse_args()
    bench = step_bench(args, args.dtype, compile=True, device=args.device)
    results = count(bench)
    print(
        f"compiled training graphs: {args.size} {' '.join(args.set)}, {args.batch} x {args.seq} "
        f"tokens, {args.dtype}, torch {torch.__version__}, Inductor's "
        f"{'Triton' if args.device.startswith('cuda') else 'CPU'} code"
    )
    print(table(results))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "torch": torch.__version__, "graphs": results}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
