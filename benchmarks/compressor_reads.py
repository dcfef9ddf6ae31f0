"""The compressor reads of an expanded state on this GPU, each implementation side by side: forward
and forward + backward time of one sublayer's channel (CC) and token (TC) read as the model calls
them (fp32 state `(batch, tokens, d, dv)`, fp32 weights), for the Triton kernel
(`ops/triton_mixing.py`), the PyTorch Functions written for the CPU (a strided op per value channel)
and the plain reference.

    python benchmarks/compressor_reads.py [--batch 8 --tokens 1024 --dim 768 --dv 4] [--json FILE]

Each figure is the median of `--repeats` CUDA-event timings of `--iters` back-to-back calls, so
the host's launch time is hidden whenever the GPU is the slower side. `GBps` is the state bytes the
read must move (forward: the state; backward: the state read and ∂state written) per second.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from deltalearn.ops import backend, channel_mix, token_mix


def time_ms(fn, iters: int, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dv", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    shape = (args.batch, args.tokens, args.dim, args.dv)
    X = torch.randn(shape, device=dev, generator=gen, requires_grad=True)
    G = torch.randn(shape[:-1], device=dev, generator=gen)
    state_bytes = X.numel() * X.element_size()
    reads = {
        "channel": (channel_mix, torch.randn(args.dim, args.dv, device=dev, requires_grad=True)),
        "token": (token_mix, torch.randn(args.dim, args.dv, 4, device=dev, requires_grad=True)),
    }
    rows = []
    for (name, (op, W)), impl in (
        (r, i) for r in reads.items() for i in ("triton", "torch", "reference")
    ):
        backend.BACKEND = impl

        def forward(op=op, W=W) -> None:
            with torch.no_grad():
                op(X, W)

        def train(op=op, W=W) -> None:
            torch.autograd.grad(op(X, W), (X, W), G)

        fwd = time_ms(forward, args.iters, args.repeats)
        both = time_ms(train, args.iters, args.repeats)
        row = {
            "read": name, "impl": impl, "fwd_ms": fwd, "fwd_bwd_ms": both,
            "fwd_GBps": state_bytes / fwd / 1e6, "fwd_bwd_GBps": 3 * state_bytes / both / 1e6,
        }  # fmt: skip
        rows.append(row)
        print(
            " ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
        )
    backend.BACKEND = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "shape": shape, "rows": rows}, f)


if __name__ == "__main__":
    main()
