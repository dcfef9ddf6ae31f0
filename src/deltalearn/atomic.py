"""Atomic file writes: a reader (or a run resumed after a crash) sees the old file or the new one,
never a half-written one.

    from deltalearn.atomic import atomic_write_text
    atomic_write_text(run_dir / "summary.json", json.dumps(summary))

The data goes to a hidden temp file in the destination's folder (same filesystem, so the rename
is atomic), is flushed and fsynced, then ``os.replace`` puts it in place and the folder is
fsynced so the rename itself survives a power cut. On any error the temp file is removed and the
destination is left as it was. Only the standard library is used, so every layer may import this.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "remove_stale_temps",
    "temp_path",
]

_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # what temp_path makes


def fsync_file(path: str | Path) -> None:
    """Flush a file's data (already written and closed) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make renames and new entries in folder ``path`` durable (a no-op where unsupported)."""
    # Some filesystems refuse to fsync a directory; the rename is still atomic there.
    with contextlib.suppress(OSError):
        fsync_file(path)


def temp_path(path: str | Path) -> Path:
    """A fresh hidden name beside ``path``: ``.NAME.PID.RANDOM.tmp`` (unique per call)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files a killed writer left in ``folder`` (those of :func:`temp_path`
    whose process is gone); return them. Call it where no other process writes the folder."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it now: the caller is here instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (parent folder must exist)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:  # "x": never write through a file someone else created
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically and durably (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))
