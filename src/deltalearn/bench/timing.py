"""What every benchmark shares: interleaved timing, saved-for-backward bytes, the machine line, the
table and the atomic JSON write.

Timing runs the contenders interleaved (A B C A B C ...) and keeps the median, because shared
machines have bursts where everything runs several times slower; a ratio of two medians measured in
the same run survives such bursts far better than two absolute figures.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltalearn.atomic import atomic_write_text


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """`fn` as a callable returning its own wall time in seconds (device work included)."""

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    return run


def interleaved_samples(
    fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """The seconds each callable reports about itself in each of `repeats` rounds, run interleaved
    (A B C A B C ...). Each callable times itself, so it can leave set-up work (e.g. a prefill) out
    of its figure."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds[name].append(fn())
    return seconds


def interleaved_medians(
    fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median of the seconds each callable reports about itself, run interleaved (A B C A B C)."""
    samples = interleaved_samples(fns, repeats, warmup)
    return {name: statistics.median(s) for name, s in samples.items()}


def paired_ratio_quartiles(
    reference: list[float], other: list[float]
) -> tuple[float, float, float] | None:
    """Quartiles (first, median, third) of `reference[i] / other[i]` over the rounds: a speed
    ratio whose two sides ran back to back in each round (a slow spell of the machine moves both)
    and its spread; None for fewer than two rounds. Interpolated between the rounds' ratios
    (`method="inclusive"`, numpy's default), never beyond them: the "exclusive" method extrapolates
    past the extremes of a few rounds, to a negative speed ratio where two rounds differ by 5×."""
    if len(reference) != len(other):
        raise ValueError(f"rounds differ: {len(reference)} against {len(other)}")
    if len(reference) < 2:
        return None
    ratios = [r / o for r, o in zip(reference, other, strict=True)]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q2, q3


def quartiles_as_text(row: dict[str, Any]) -> dict[str, Any]:
    """`row` for a table: each `*_quartiles` (`paired_ratio_quartiles`) written "median (q1–q3)",
    or left out where there is none."""
    out = dict(row)
    for key, value in row.items():
        if key.endswith("_quartiles"):
            if value is None:
                del out[key]
            else:
                q1, median, q3 = value
                out[key] = f"{median:.3f} ({q1:.3f}–{q3:.3f})"
    return out


def median_seconds(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of each callable, run interleaved (A B C A B C ...)."""
    return interleaved_medians({n: timed(f, device) for n, f in fns.items()}, repeats, warmup)


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


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name from `cpuinfo` with its family and model numbers (a virtual machine
    may call every generation "AMD EPYC"), or what the platform says where there is none."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key:  # the first processor's block ends here
                    break
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine(device: torch.device) -> str:
    """The machine line: the CUDA device name, or the CPU model, the widest vector instructions
    torch uses there (the C kernels, built with -march=native, follow the CPU too) and torch's
    thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_name()}, {capability}, {torch.get_num_threads()} threads"


def run_header(device: torch.device) -> dict[str, str]:
    """Machine, torch version and UTC date: what every report starts with."""
    return {
        "machine": machine(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def format_table(rows: list[dict[str, object]], columns: dict[str, str] | None = None) -> str:
    """A Markdown table of `rows`; `columns` maps row keys to headers (default: every key)."""
    columns = columns or {k: k for k in rows[0]}
    keys = [k for k in columns if any(k in r for r in rows)]

    def fmt(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e3 else f"{x:,.0f}"
        return "–" if x is None else str(x)

    lines = ["| " + " | ".join(columns[k] for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: Path, report: dict[str, object]) -> None:
    """Write `report` to `path` atomically (see `deltalearn.atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")


def settings_report(benchmark: str, device: torch.device, settings, rows: list) -> dict:
    """A benchmark's JSON report: its name, the machine line (`run_header`), its settings (a
    dataclass) and its rows."""
    return {
        "benchmark": benchmark,
        **run_header(device),
        "settings": dataclasses.asdict(settings),
        "rows": rows,
    }


def size_text(settings: dict) -> str:
    """ "size tiny" and the `--set` overrides of a report's settings, e.g. "size tiny d_v=2"."""
    sets = " ".join(f"{k}={v}" for k, v in settings["overrides"].items())
    return f"size {settings['size']}{' ' + sets if sets else ''}"
