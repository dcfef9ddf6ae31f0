"""The named choices of the DDL building blocks, in one place for modules and model configs."""

from __future__ import annotations

from typing import Literal

Rule = Literal["additive", "delta", "write_only"]
ValueHeadKind = Literal["paper", "official"]
GateKind = Literal["linear", "mlp"]
DirectionForm = Literal["l2", "rms"]

RULES: tuple[str, ...] = ("additive", "delta", "write_only")
VALUE_HEADS: tuple[str, ...] = ("paper", "official")
GATES: tuple[str, ...] = ("linear", "mlp")
DIRECTION_FORMS: tuple[str, ...] = ("l2", "rms")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise `ValueError` naming `name`, the bad value and the allowed ones."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
