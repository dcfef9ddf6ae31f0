"""Reading the small JSON files a run folder holds, with one-line errors that name the file; and
where deltalearn caches what it makes on the user's machine (prepared data, compiled kernels)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deltalearn.errors import UserError

__all__ = ["cache_root", "read_json_object"]


def cache_root() -> Path:
    """`$DELTALEARN_CACHE`, else `~/.cache/deltalearn` (honouring `$XDG_CACHE_HOME`)."""
    env = os.environ.get("DELTALEARN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "deltalearn"


def read_json_object(
    path: str | Path, what: str, error: type[UserError] = UserError
) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` (a :class:`UserError`) naming ``what`` and the file
    when it is missing, a folder, unreadable, empty, truncated, not JSON or not an object."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path}: missing")
    if not path.is_file():
        raise error(f"{what} {path}: is a folder, expected a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{what} {path}: cannot read it ({e.strerror})") from None
    if not raw:
        raise error(f"{what} {path}: empty (0 bytes)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = str(e).splitlines()[0]
        raise error(f"{what} {path}: not valid JSON, truncated or corrupt ({reason})") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data
