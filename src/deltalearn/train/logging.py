"""Run logs: one JSON object per line in ``RUN_DIR/log.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltalearn.atomic import atomic_write_text

__all__ = ["RunLogger", "read_log"]


class RunLogger:
    """Append-only JSONL log (rank 0 only); TensorBoard scalars when the package is installed."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / "log.jsonl"
        self.enabled = enabled
        self._tb: Any = None
        self._want_tb = enabled and tensorboard
        self._tb_dir = Path(run_dir) / "tensorboard"

    def _writer(self) -> Any:
        """The TensorBoard writer, created on first use (so nothing is written before then)."""
        if self._tb is None and self._want_tb:
            self._want_tb = False
            try:  # optional dependency, imported only when asked for
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self._tb_dir))
            except ImportError:
                self._tb = None
        return self._tb

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run re-logs them).

        The shortened log replaces the old one atomically: a crash here leaves one or the other.
        """
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_log(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer() is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._tb.add_scalar(key, value, step)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{key}/{i}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``log.jsonl`` (a torn last line from a crash is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
