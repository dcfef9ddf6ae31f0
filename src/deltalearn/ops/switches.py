"""On/off switches of the fast paths: a module-level override, else an environment variable."""

from __future__ import annotations

import os

import torch

SWITCH_CHOICES = ("on", "off")
_ENCODED: dict[str, bytes] = {}


def environment_value(variable: str, default: str) -> str:
    """The environment variable `variable`, else `default`, read at every call (it may change while
    the process runs). On POSIX straight from the bytes dict behind `os.environ` (which its setters
    keep current): ~0.25 µs a call, not the ~0.7–0.9 µs of `os.environ.get` — several switches
    are read a sublayer, and eager training on a GPU and one-token decoding are bound by host
    time. Traced by `torch.compile`, the name is encoded afresh: a read of the encoding cache,
    which the first eager call of a switch fills, would recompile the graph once it had."""
    data = getattr(os.environ, "_data", None) if os.name == "posix" else None
    if not isinstance(data, dict):
        return os.environ.get(variable, default)
    if torch.compiler.is_compiling():
        key = os.fsencode(variable)
    else:
        key = _ENCODED.get(variable)
        if key is None:
            key = _ENCODED[variable] = os.fsencode(variable)
    raw = data.get(key)
    return default if raw is None else os.fsdecode(raw)


def switched_on(
    override: str | None, variable: str, setting: str, what: str, default: str = "on"
) -> bool:
    """`override` if set, else the environment variable `variable` (`default` where unset); a value
    other than "on"/"off" is a ValueError naming `what`, the module `setting` and the variable."""
    choice = override if override is not None else environment_value(variable, default)
    if choice not in SWITCH_CHOICES:
        raise ValueError(
            f"{what} ({setting} or {variable}) must be one of {list(SWITCH_CHOICES)}, "
            f"got {choice!r}"
        )
    return choice == "on"
