"""Benchmarks behind `deltalearn bench`: the Delta operator (fused vs reference vs additive) and
whole-model training throughput (DDL variants vs the additive baseline).

Every figure is a ratio against the baseline measured in the same run, interleaved and summarised by
the median, because shared machines have bursts where everything runs several times slower.
Memory: on CUDA the peak allocated bytes; everywhere the bytes autograd saves for backward (counted
with saved-tensor hooks — deterministic, and the quantity the fused operator is designed to cut).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deltalearn.ops import delta_rewrite, delta_rewrite_reference, normalize_direction


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward while running `fn` (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def median_seconds(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of each callable, run interleaved (A B C A B C ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


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
            _sync(device)
            row["peak_MB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        rows.append(row)
    return rows


def model_benchmark(
    variants: list[str],
    size: str,
    batch: int,
    seq: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    compile_model: bool = False,
) -> list[dict[str, object]]:
    """Training-step throughput (forward+backward+AdamW) of DeltaLM presets, baseline first."""
    from deltalearn import DeltaLM, DeltaLMConfig

    steps: dict[str, Callable[[], None]] = {}
    params: dict[str, int] = {}
    for variant in variants:
        torch.manual_seed(0)
        cfg = DeltaLMConfig.preset(variant, size)
        model = DeltaLM(cfg).to(device)
        params[variant] = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        fwd = torch.compile(model) if compile_model else model
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        def train_step(fwd=fwd, opt=opt, ids=ids, autocast=autocast) -> None:
            with autocast:
                loss = fwd(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[variant] = train_step
    times = median_seconds(steps, device, repeats)
    base = variants[0]
    rows: list[dict[str, object]] = [
        {
            "variant": v,
            "size": size,
            "params_M": params[v] / 1e6,
            "tokens_per_s": batch * seq / times[v],
            "throughput_vs_" + base: times[base] / times[v],
        }
        for v in variants
    ]
    if device.type == "cuda":  # activation peak of one step above what is resident before it
        for row in rows:
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
            steps[str(row["variant"])]()
            _sync(device)
            row["step_peak_GiB"] = (torch.cuda.max_memory_allocated(device) - resident) / 2**30
    return rows


def _table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltalearn bench", description=__doc__)
    parser.add_argument("what", choices=["operator", "model"], nargs="?", default="operator")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--value-channels", type=int, default=4)
    parser.add_argument("--size", default="tiny", help="model preset size for `model`")
    parser.add_argument(
        "--variants",
        default="baseline,ddl,ddl-cc,ddl-tc,write-only-cc",
        help="comma-separated presets for `model`; the first is the reference",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.what == "operator":
        rows = operator_benchmark(
            args.batch, args.seq, args.dim, args.value_channels, device, dtype, args.repeats
        )
    else:
        rows = model_benchmark(
            args.variants.split(","),
            args.size,
            args.batch,
            args.seq,
            device,
            dtype,
            args.repeats,
            args.compile,
        )
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU, {torch.get_num_threads()} threads")
    )
    print(f"{args.what} benchmark on {machine}, torch {torch.__version__}")
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
