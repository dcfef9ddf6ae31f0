"""Keep the memory a CPU training step frees for the next step (glibc's malloc, Linux).

By default glibc serves each large allocation (an activation of a few MB and up) with a fresh
`mmap` and returns it to the OS on free, and trims the heap's free top; the next step then faults
every page in again. On the 2-core CPU at width 256 a training step took ~100k page faults (400 MB
zero-filled by the kernel) and ~16% of its time in them, for every variant alike; DDL's rebuilt
states (`ops.state_tape`) add a few thousand more, as a smaller peak leaves less freed memory to
reuse. Two `mallopt` settings stop that: no `mmap` for allocations (`M_MMAP_MAX` = 0: everything
comes from the heap, which is reused) and no trimming below 2 GiB (`M_TRIM_THRESHOLD`). The price
is resident memory: the process keeps its peak (and the heap's fragmentation; +15% peak RSS in that
run), which a training process reaches every step anyway.

`deltalearn train` and `deltalearn bench model` apply it when they run on a CPU;
`DELTALEARN_CPU_ALLOCATOR=default` leaves glibc as it is. Elsewhere (CUDA, which has its own caching
allocator; another C library) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import torch

ALLOCATOR_CHOICES = ("keep", "default")
# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest free heap top kept (2 GiB − 1).
_TRIM_KEEP = 2**31 - 1

_applied = False


def allocator_choice() -> str:
    """DELTALEARN_CPU_ALLOCATOR: "keep" (the default) or "default"."""
    choice = os.environ.get("DELTALEARN_CPU_ALLOCATOR", "keep")
    if choice not in ALLOCATOR_CHOICES:
        raise ValueError(
            f"DELTALEARN_CPU_ALLOCATOR must be one of {list(ALLOCATOR_CHOICES)}, got {choice!r}"
        )
    return choice


def applied() -> bool:
    """Whether this process runs with the settings above."""
    return _applied


def keep_freed_memory(device: torch.device | str) -> bool:
    """Apply the settings above for a run on `device` if it is a CPU, on Linux with glibc, and
    DELTALEARN_CPU_ALLOCATOR is not "default"; return whether they are in effect (once applied, for
    the rest of the process)."""
    global _applied
    if _applied:
        return True
    if torch.device(device).type != "cpu" or allocator_choice() == "default":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. No mmap first: a fixed trim threshold alone also fixes the
    # mmap threshold at its 128 KiB default, which faults more, not less (measured: 3x).
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_KEEP) == 1
    return _applied
