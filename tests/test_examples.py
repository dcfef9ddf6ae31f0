"""The examples in examples/ run as documented (short versions)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drop_in_mlp_trains_every_rule():
    results = _load("drop_in_mlp").main(["--steps", "40"])
    assert set(results) == {"additive", "delta", "write_only"}
    # every rule learns something: better than predicting zero (MSE = E|y|^2 / dim = 1)
    assert all(math.isfinite(v) and v < 1.0 for v in results.values())
