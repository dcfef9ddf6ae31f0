"""On/off switches of the fast paths: a module-level override, else an environment variable."""

from __future__ import annotations

import os

SWITCH_CHOICES = ("on", "off")


def switched_on(override: str | None, variable: str, setting: str, what: str) -> bool:
    """`override` if set, else the environment variable `variable` ("on" by default); a value other
    than "on"/"off" is a ValueError naming `what`, the module `setting` and the variable."""
    choice = override if override is not None else os.environ.get(variable, "on")
    if choice not in SWITCH_CHOICES:
        raise ValueError(
            f"{what} ({setting} or {variable}) must be one of {list(SWITCH_CHOICES)}, "
            f"got {choice!r}"
        )
    return choice == "on"
