"""Instructions a process executes between marks, counted by valgrind's callgrind: the same from run
to run, where timings of a few milliseconds on a shared CPU move by more than the change measured.
Shared by `decode_instructions.py` and `host_overhead.py --count`.

The process under count calls `mark()` (a `getppid()` call) at each boundary; callgrind, started with
`--dump-before=getppid`, writes out its counts there and starts again from zero, so the n-th dump
after the first holds the instructions between the n-th and the (n+1)-th mark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

MARK = "getppid"
PORTABLE_ARCH = "-march=x86-64-v3"  # AVX2 and FMA: what valgrind runs (no AVX-512)


def mark() -> None:
    """A boundary between counted intervals (a no-op outside callgrind)."""
    os.getppid()


def use_portable_kernels() -> None:
    """Build deltalearn's C kernels for x86-64-v3 instead of this CPU (in the process under count,
    before anything builds them): valgrind cannot run AVX-512."""
    from deltalearn.ops import native_build

    fastest = native_build.FLAG_SETS[0]  # the default build, for another architecture
    native_build.FLAG_SETS = (tuple(PORTABLE_ARCH if f == "-march=native" else f for f in fastest),)


def require_valgrind() -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: install it (Debian: apt install valgrind)")


def dumped_instructions(path: Path) -> int:
    """The instruction count of one callgrind dump (its summary line)."""
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"{path} holds no summary line: did callgrind finish?")


def count_between_marks(command: list[str], env: dict, prefix: Path) -> list[int]:
    """Run `command` under callgrind (its files `prefix.N`); the instructions between each mark and
    the next, in order. Raises RuntimeError, with the end of its stderr, if the run fails."""
    run = [
        "valgrind",
        "--tool=callgrind",
        f"--dump-before={MARK}",
        f"--callgrind-out-file={prefix}",
    ]
    done = subprocess.run([*run, *command], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind run failed:\n{done.stderr[-2000:]}")
    counts, n = [], 2  # dump 1: from the start to the first mark
    while Path(f"{prefix}.{n}").exists():
        counts.append(dumped_instructions(Path(f"{prefix}.{n}")))
        n += 1
    return counts
