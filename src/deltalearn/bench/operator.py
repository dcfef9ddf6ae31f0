"""`deltalearn bench operator`: forward + backward of one rewrite of a `(B, T, d, dv)` state, the
fused operator against the plain reference and the additive update `X + h` it replaces.

Memory: "saved" = bytes autograd keeps for backward (counted with saved-tensor hooks —
deterministic, and the quantity the fused operator is designed to cut); on CUDA also the peak
allocated above the inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltalearn.bench.timing import median_seconds, saved_bytes, sync
from deltalearn.ops import delta_rewrite, delta_rewrite_reference, normalize_direction


def operator_benchmark(
    batch: int,
    seq: int,
    dim: int,
    value_channels: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> list[dict[str, object]]:
    """Forward+backward of one rewrite on a `(batch, seq, dim, dv)` state."""
    shape = (batch, seq, dim, value_channels)
    X = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    k_raw = torch.randn(shape[:-1], device=device, dtype=dtype, requires_grad=True)
    beta = torch.rand(shape[:-2], device=device, dtype=torch.float32, requires_grad=True)
    v = torch.randn((*shape[:-2], value_channels), device=device, dtype=dtype, requires_grad=True)
    h = torch.randn(shape[:-1], device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn(shape, device=device, dtype=dtype)

    def run(op: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: op(X, normalize_direction(k_raw), beta * 1, v)

    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "additive": lambda: X + h.unsqueeze(-1),
        "reference": run(delta_rewrite_reference),
        "fused": run(delta_rewrite),
    }

    def step(fwd: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: fwd().backward(upstream)

    times = median_seconds({n: step(f) for n, f in forwards.items()}, device, repeats)
    rows = []
    for name, fwd in forwards.items():
        row: dict[str, object] = {
            "impl": name,
            "shape": list(shape),
            "dtype": str(dtype).removeprefix("torch."),
            "ms": 1e3 * times[name],
            "time_vs_additive": times[name] / times["additive"],
            "saved_MB": saved_bytes(fwd) / 2**20,
        }
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(fwd)()
            sync(device)
            row["peak_MB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        rows.append(row)
    return rows
