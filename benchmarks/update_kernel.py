"""One DDL update on this CPU, forward + backward, two ways side by side: the whole update as one C
kernel each way (`ops.native.update_native`: the gate and value projections inside the rewrite
epilogue's row loop, the default since 2026-11-29) against the projections in PyTorch ops (one
autograd Function of products and sums, `nn.generators.gate_and_value`) before the epilogue's C
kernel (`DELTALEARN_UPDATE_KERNEL=off`), as a DeltaLM training step calls them (freed memory kept,
as `deltalearn train` and `deltalearn bench model` keep it: no page faults in either).

    python benchmarks/update_kernel.py [--rows 2048] [--repeats 41]

Printed per shape (width d, value channels dv, with the next channel read or not): the median
microseconds of each, interleaved call by call, and their ratio. The shapes are those of the
`tiny` (d = 128) and width-256 CPU benchmarks' sublayers, 8 × 256 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deltalearn.nn import residual
from deltalearn.ops import epilogue
from deltalearn.train.host_allocator import keep_freed_memory

SHAPES = ((128, 1, False), (128, 4, True), (256, 1, False), (256, 4, True))


def update_step(d: int, dv: int, compress: bool, rows: int):
    """A forward + backward of one `DeltaUpdate` (the linear gate, the official value head) on
    random operands; returns a callable."""
    torch.manual_seed(0)
    update = residual.DeltaUpdate(d, dv, value_head="official")
    update.record = False
    X = torch.randn(rows, d, *((dv,) if dv > 1 else ()), requires_grad=True)
    h, c, u = (torch.randn(rows, d, requires_grad=True) for _ in range(3))
    C = torch.randn(d, dv, requires_grad=True) if compress else None
    grad_Y, grad_next = torch.randn_like(X), torch.randn(rows, d)

    def step() -> None:
        if C is None:
            update(X, h, c, u).backward(grad_Y)
        else:
            torch.autograd.backward(list(update(X, h, c, u, C)), [grad_Y, grad_next])
        for t in (X, h, c, u, C, *update.parameters()):
            if t is not None:
                t.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=41)
    args = parser.parse_args()
    keep_freed_memory("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows} rows")
    print("| d | dv | next read | one kernel µs | projections apart µs | apart ÷ one |")
    print("|---|---|---|---|---|---|")
    for d, dv, compress in SHAPES:
        step = update_step(d, dv, compress, args.rows)
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.repeats + 5):
            for apart in (False, True):
                epilogue.UPDATE_KERNEL = "off" if apart else "on"
                start = time.perf_counter()
                step()
                if i >= 5:  # warm: kernels built, memory kept
                    times[apart].append(time.perf_counter() - start)
        one, two = statistics.median(times[False]), statistics.median(times[True])
        read = "yes" if compress else "no"
        print(f"| {d} | {dv} | {read} | {one * 1e6:.0f} | {two * 1e6:.0f} | {two / one:.2f} |")
    epilogue.UPDATE_KERNEL = None


if __name__ == "__main__":
    main()
