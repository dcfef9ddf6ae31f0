"""One compiled training step's gradients against the eager step's, at a real size: each variant
compiled with Inductor's defaults (`torch.compile` of the model) and as `DeltaLM.compile` compiles
it (Inductor's mix-order reduction off, `deltalearn/models/compiling.py`).

    python benchmarks/compiled_gradients.py --device cuda [--variants ddl-cc,ddl-tc] \
        [--size small --set num_layers=2 --batch 8 --seq 1024] [--dtype bfloat16|float32] \
        [--ways inductor-defaults,deltalm-compile]

Why: on an H200 (torch 2.11.0) compiled ddl-cc training at `small`, 8 × 1024, failed in its first
backward with Inductor's defaults ("invalid gradient ... got [768] but expected ... [1, 768]"),
a failure Inductor's CPU code does not have. This prints, for each variant and way of compiling,
the step's loss and the worst relative gradient difference (‖g − g_eager‖ / ‖g_eager‖ over the
parameters), or the error; under bf16 autocast a few 1e-2 is the rounding of the two paths.
`gpu_check.sh` stage `compilegrads` runs it at two layers of `small`, and stage `compiledkernels`
with the Triton kernels in the compiled graph (`DELTALEARN_COMPILED_KERNELS=on`).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from step_arguments import add_step_arguments, step_bench

from deltalearn.bench.model import ModelBench, build_variant

WAYS = ("inductor-defaults", "deltalm-compile")


def step_gradients(bench: ModelBench, variant: str, way: str) -> tuple[float, dict]:
    """The loss and the gradients of one training step of `variant` run `way` ("eager" or one of
    WAYS), from the same weights and tokens (seed 0) every time."""
    torch._dynamo.reset()
    run = build_variant(bench, variant)
    if way == "inductor-defaults":
        torch.nn.Module.compile(run.model)  # not DeltaLM.compile's options
    elif way == "deltalm-compile":
        run.model.compile()
    run.model.train()
    with run.autocast():
        loss = run.model(run.ids, labels=run.ids).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in run.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def compare(bench: ModelBench, variant: str, ways: tuple[str, ...] = WAYS) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    eager_loss, eager = step_gradients(bench, variant, "eager")
    rows.append({"variant": variant, "way": "eager", "loss": eager_loss,
                 "seconds": time.perf_counter() - t0})  # fmt: skip
    for way in ways:
        t0 = time.perf_counter()
        row: dict = {"variant": variant, "way": way}
        try:
            loss, grads = step_gradients(bench, variant, way)
        except Exception as error:  # the finding to report, not a reason to stop
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        else:
            diffs = {n: ((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item()
                     for n, g in eager.items()}  # fmt: skip
            worst = max(diffs, key=diffs.get)
            row.update(loss=loss, worst_relative_gradient_difference=diffs[worst],
                       worst_parameter=worst)  # fmt: skip
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.set_defaults(variants="ddl-cc,ddl-tc", batch=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"some of {', '.join(WAYS)}")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    ways = tuple(args.ways.split(","))
    if not set(ways) <= set(WAYS):
        parser.error(f"--ways: expected some of {', '.join(WAYS)}, got {args.ways!r}")
    bench = step_bench(args, args.dtype, device=args.device)
    rows = [row for variant in bench.variants for row in compare(bench, variant, ways)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
