"""What the state chain (`ops/state_chain.py`) saves a compiled training step, on a stack of rewrites.

A compiled DeltaLM step keeps every rewrite's input state for backward: the state tape that
rebuilds them in eager runs on saved-tensor hooks, which `torch.compile` does not run inside its
graphs. The state chain carries the rebuild through autograd instead (DELTALEARN_COMPILED_REBUILD).
This times it apart from a model, on a stack of matrix-state rewrites shaped like ddl-cc's — each
layer reads its input through the channel read the rewrite before it made, norms it, runs a
`tanh(W c)` branch and linear gate and value projections, and rewrites the state:

    saved          the rewrite as a compiled DeltaLM runs it by default (`rewrite_epilogue_traced`):
                   AOT autograd derives its backward and keeps each layer's input state
    chain          `StateChain.rewrite`: k, β and e kept a row, each input state rebuilt in backward
    kernels        the Triton kernels as custom ops (`ops.compiled_kernels.rewrite`, as
                   DELTALEARN_COMPILED_KERNELS=on runs them), keeping each input state
    chain-kernels  `StateChain.rewrite_kernel`: the same kernels on the chain, the backward kernel
                   rebuilding each input state (both switches on)

The two kernel modes need triton and a CUDA device (`--device cuda`), or on a CPU Triton's
interpreter (`TRITON_INTERPRET=1`, slow: small sizes only).

    python benchmarks/compiled_state_chain.py [--rows 2048 --width 128 --channels 4 --layers 24] \
        [--modes saved,chain,kernels,chain-kernels] [--device cpu|cuda] [--no-eager] \
        [--repeats 5] [--json FILE]

Printed per mode, eager and compiled (`fullgraph=True`): the step's peak bytes above what was
allocated before it (`bench.model.step_peak_bytes`), the median step time, and the worst relative
gradient difference from the eager `saved` step (‖g − g_ref‖ / ‖g_ref‖ over the parameters and the
input state). `deltalearn bench model --compile` measures the same on a DeltaLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from deltalearn.bench.model import step_peak_bytes
from deltalearn.ops import backend, compiled_kernels
from deltalearn.ops.epilogue import epilogue_generators
from deltalearn.ops.state_chain import StateChain
from deltalearn.ops.traced_epilogue import rewrite_epilogue_traced

MODES = ("saved", "chain", "kernels", "chain-kernels")


class RewriteStack(nn.Module):
    """`layers` ddl-cc-like sublayers on a `(rows, width, channels)` state (module docstring)."""

    def __init__(self, width: int, channels: int, layers: int) -> None:
        super().__init__()
        self.branch = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.gate_value = nn.ModuleList(nn.Linear(width, 1 + channels) for _ in range(layers))
        self.compress = nn.Parameter(torch.full((width, channels), 1.0 / channels))

    def forward(self, X: torch.Tensor, mode: str) -> torch.Tensor:
        C = self.compress
        x = (X * C).sum(-1)
        chain = StateChain(X) if mode.startswith("chain") else None
        for branch, gate_value in zip(self.branch, self.gate_value, strict=True):
            c = F.rms_norm(x, (x.shape[-1],))
            h = torch.tanh(branch(c))
            zp = gate_value(c)
            z, p = zp[..., 0], zp[..., 1:]
            if mode == "kernels":
                X, x = compiled_kernels.rewrite(
                    X, h, z, p, C, rule="delta", value_head="paper", value_scale=4.0, k_eps=1e-5
                )
            elif mode == "chain-kernels":
                X, x = chain.rewrite_kernel(X, h, z, p, C, False, 4.0, 1e-5)
            else:
                k, beta, v = epilogue_generators(h, z, p)
                if chain is None:
                    X, x = rewrite_epilogue_traced(X, k, beta, v, "delta", C)
                else:
                    X, x = chain.rewrite(X, k, beta, v, "delta", C)
        if chain is not None:
            x = chain.finish(x)
        return x.square().mean()


def measure(model: RewriteStack, X0: torch.Tensor, mode: str, compiled: bool, repeats: int):
    """`(peak bytes, median seconds, gradients)` of a training step of `model` run `mode`."""
    torch._dynamo.reset()
    forward = torch.compile(model, fullgraph=True) if compiled else model

    def step() -> None:
        model.zero_grad(set_to_none=True)
        X0.grad = None
        forward(X0, mode).backward()

    step()  # compiles; lazily made state resident
    peak = step_peak_bytes(step, X0.device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    grads = [p.grad.clone() for p in model.parameters()] + [X0.grad.clone()]
    return peak, statistics.median(seconds), grads


def worst_difference(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--modes", default="saved,chain")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-eager", action="store_true", help="compiled runs only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    kernel_modes = [m for m in modes if m.endswith("kernels")]
    interpreted = args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if kernel_modes and not (backend.triton_available() and (args.device != "cpu" or interpreted)):
        parser.error(
            f"--modes {','.join(kernel_modes)} run the Triton kernels: they need triton and "
            f"--device cuda (or TRITON_INTERPRET=1 on a CPU); got --device {args.device}"
        )

    torch.manual_seed(0)
    model = RewriteStack(args.width, args.channels, args.layers).to(args.device)
    X0 = torch.randn(args.rows, args.width, args.channels, device=args.device, requires_grad=True)
    state_mb = X0.numel() * X0.element_size() / 1e6
    reference = measure(model, X0, "saved", compiled=False, repeats=1)[2]
    print(
        f"{args.layers} rewrites of a ({args.rows}, {args.width}, {args.channels}) fp32 state "
        f"({state_mb:.1f} MB), {X0.device}, torch {torch.__version__}"
    )
    print("| mode | compiled | step peak MB | median step ms | worst gradient difference |")
    print("|---|---|---|---|---|")
    rows = []
    for mode in modes:
        for compiled in (False, True) if not args.no_eager else (True,):
            peak, seconds, grads = measure(model, X0, mode, compiled, args.repeats)
            row = dict(
                mode=mode, compiled=compiled, step_peak_MB=peak / 1e6, step_ms=seconds * 1e3,
                worst_gradient_difference=worst_difference(grads, reference),
            )  # fmt: skip
            rows.append(row)
            print(
                f"| {mode} | {'yes' if compiled else 'no'} | {row['step_peak_MB']:.1f} | "
                f"{row['step_ms']:.1f} | {row['worst_gradient_difference']:.1e} |"
            )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        report = dict(benchmark="compiled_state_chain", torch=torch.__version__, state_MB=state_mb)
        with open(args.json, "w") as f:
            json.dump({**report, "settings": settings, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
