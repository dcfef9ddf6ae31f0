"""Tile sizes of the Triton rewrite epilogue on this GPU: forward and backward time of one
sublayer's rewrite as the model calls it under bf16 autocast (fp32 state, bf16 branch output and
value pre-activation, fp32 gate logits), for each tile budget and warp count.

    python benchmarks/epilogue_tiles.py [--rows 8192 --dim 768] [--json FILE]

Prints microseconds per call and the achieved bandwidth (bytes the kernel must move / time). A
call is timed with its launch from Python (`triton.testing.do_bench`), so kernels faster than the
host can issue them show the host's floor: about 100-150 µs a call on the H200 of
`results/h200_epilogue_tiles.json`, where the model's profile saw the same forward take 52 µs on the
GPU. Compare tiles above that floor.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from deltalearn.ops import backend
from deltalearn.ops import epilogue as ep
from deltalearn.ops import triton_epilogue as te


def inputs(rows: int, d: int, dv: int, compress: bool, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    state = (rows, d, dv) if dv > 1 else (rows, d)
    X = torch.randn(state, device=device, generator=gen)
    h = torch.randn(rows, d, device=device, generator=gen).bfloat16()
    z = torch.randn(rows, device=device, generator=gen)
    p = torch.randn((rows, dv) if dv > 1 else (rows,), device=device, generator=gen).bfloat16()
    leaves = [X, h, z, p]
    if compress:
        leaves.append(torch.randn(d, dv, device=device, generator=gen) / dv)
    return [t.requires_grad_() for t in leaves]


def moved_bytes(leaves: list[torch.Tensor], backward: bool) -> int:
    """Bytes a kernel must read and write at least: forward X, h, z, p in and Y out; backward X,
    h, z, p and ∂Y in, ∂X, ∂h, ∂z, ∂p out (C and ∂C are negligible)."""
    io = sum(t.numel() * t.element_size() for t in leaves[:4])
    state = leaves[0].numel() * leaves[0].element_size()  # Y, ∂Y and ∂X have the state's size
    return 2 * io + state if backward else io + state


def time_case(leaves: list[torch.Tensor]) -> tuple[float, float]:
    X, h, z, p, *C = leaves
    C = C[0] if C else None
    out = ep.rewrite_epilogue(X, h, z, p, rule="delta", value_head="official", compress=C)
    outs = out if isinstance(out, tuple) else (out,)
    ups = [torch.randn_like(o) for o in outs]

    def forward() -> None:
        ep.rewrite_epilogue(X, h, z, p, rule="delta", value_head="official", compress=C)

    def backward() -> None:
        torch.autograd.grad(outs, leaves, ups, retain_graph=True)

    return triton.testing.do_bench(forward) * 1e3, triton.testing.do_bench(backward) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--json")
    parser.add_argument(
        "--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    backend.BACKEND = "triton"  # the kernels, also on CPU tensors under the interpreter
    default_warps = te._num_warps
    rows = []
    cases = [(1, False), (4, False), (4, True)]
    for (dv, compress), tile, warps in itertools.product(
        cases, (256, 512, 1024, 2048, 4096), (0, 8)
    ):
        te.MAX_TILE_BWD = te.MAX_TILE = tile
        te._num_warps = default_warps if warps == 0 else (lambda *a, w=warps: w)
        leaves = inputs(args.rows, args.dim, dv, compress, device)
        try:
            fwd_us, bwd_us = time_case(leaves)
        except Exception as e:  # a tile the compiler refuses (registers, shared memory)
            failed = f"dv {dv} compress {compress} tile {tile} warps {warps}: {type(e).__name__}"
            print(f"{failed} {e}"[:300])
            continue
        block_m, block_d, chunks, _ = te.launch_config(args.dim, dv, tile)
        row = {
            "dv": dv, "compress": compress, "tile": tile, "warps": warps or "auto",
            "block_m": block_m, "block_d": block_d, "chunks": chunks,
            "fwd_us": fwd_us, "bwd_us": bwd_us,
            "fwd_GBps": moved_bytes(leaves, False) / fwd_us / 1e3,
            "bwd_GBps": moved_bytes(leaves, True) / bwd_us / 1e3,
        }  # fmt: skip
        rows.append(row)
        line = " ".join(
            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
        )
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
