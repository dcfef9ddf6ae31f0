"""Where results came from: the git commit of the source, the machine, the command line."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["command_line", "machine_info", "source_commit"]


def source_commit() -> str:
    """The git commit of the deltalearn source in use (``+dirty`` with uncommitted changes to
    tracked files), or ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit or not (root / "src" / "deltalearn").is_dir():
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """What the runs ran on: OS, CPU, memory, accelerators and library versions."""
    import torch

    import deltalearn
    from deltalearn.bench.timing import cpu_name

    memory_gib = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": memory_gib,
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deltalearn": deltalearn.__version__,
    }


def command_line(parts: list[str]) -> str:
    """A shell-quoted command line."""
    return " ".join(shlex.quote(p) for p in parts)
