"""The examples in examples/ run as documented (short versions)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

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


# --- beyond language models: each example at a tiny setting (seconds), its files and numbers ---


def _read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_digits_resnet_smoke(tmp_path):
    out = tmp_path / "digits"
    argv = ["--seeds", "2", "--epochs", "1", "--widths", "4,8", "--blocks", "1",
            "--batch-size", "256", "--out", str(out)]  # fmt: skip
    results = _load("digits_resnet").main(argv)
    assert (out / "digits_resnet.png").stat().st_size > 0
    assert _read_results(out) == json.loads(json.dumps(results))
    runs = results["runs"]
    assert sorted((r["rule"], r["seed"]) for r in runs) == [
        (rule, seed) for rule in ("additive", "delta", "write_only") for seed in (0, 1)
    ]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in runs)
    acc = results["summary"]["test_accuracy"]["delta"]
    assert acc["n"] == 2 and math.isfinite(acc["half_width"])
    assert set(results["summary"]["paired_difference"]) == {
        "delta - additive",
        "write_only - additive",
    }
    # β recorded for the rules that have gates, on every test pixel of every block
    beta = next(r["beta"] for r in runs if r["rule"] == "delta")
    assert len(beta["per_block_mean"]) == 2 and 0.0 < beta["mean"] < 2.0
    assert "beta" not in next(r for r in runs if r["rule"] == "additive")


def test_dynamical_systems_smoke(tmp_path):
    out = tmp_path / "dyn"
    argv = ["--seeds", "2", "--steps", "3", "--depths", "1,2", "--tasks", "tent,billiard",
            "--test-size", "64", "--out", str(out)]  # fmt: skip
    results = _load("dynamical_systems").main(argv)
    assert (out / "dynamical_systems.png").stat().st_size > 0
    assert _read_results(out)["settings"]["depths"] == [1, 2]
    assert len(results["runs"]) == 2 * 2 * 3 * 2  # tasks × depths × rules × seeds
    table = results["summary"]["relative_mse"]
    assert table["tent"]["write_only"]["2"]["n"] == 2
    deepest_ddl = [r for r in results["runs"] if "beta" in r]
    assert {(r["task"], r["rule"], r["depth"]) for r in deepest_ddl} == {
        ("tent", "delta", 2),
        ("billiard", "delta", 2),
    }
    b = deepest_ddl[0]["beta"]
    assert sum(b["histogram"]) == 2 * 64  # blocks × test samples
    assert {"flip", "no_flip"} <= set(b)


def test_dynamical_systems_ground_truth():
    """The example's targets are the dynamics they claim: checked against small-step simulation."""
    torch = __import__("torch")
    dyn = _load("dynamical_systems")
    g = torch.Generator().manual_seed(0)
    # billiard: free flight with elastic walls, 1,500 small steps
    x, y, flip = dyn.billiard(32, g)
    p, v = x[:, :2].double(), x[:, 2:].double()
    for _ in range(1500):
        p = p + v * 1e-3
        low, high = p < 0, p > 1
        p = torch.where(low, -p, torch.where(high, 2 - p, p))
        v = torch.where(low | high, -v, v)
    torch.testing.assert_close(torch.cat([p, v], -1).float(), y, atol=2e-3, rtol=0)
    assert torch.equal(flip, ((v * x[:, 2:].double()) < 0).any(-1))
    # oscillator: RK4 on x'' = -ω²x - 2ζωx'
    x, y, flip = dyn.oscillator(16, g)
    s, w, dt = x[:, :2].double(), x[:, 2].double(), 1e-2

    def f(s):
        return torch.stack([s[:, 1], -(w**2) * s[:, 0] - 2 * 0.05 * w * s[:, 1]], -1)

    for _ in range(600):
        k1 = f(s)
        k2 = f(s + dt / 2 * k1)
        k3 = f(s + dt / 2 * k2)
        k4 = f(s + dt * k3)
        s = s + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(
        torch.stack([s[:, 0], s[:, 1] / w], -1).float(), y, atol=1e-4, rtol=0
    )
    # tent: three steps of 1 - 2|x|; `flip` marks a negative slope of the iterate at x
    x, y, flip = dyn.tent(256, g)

    def iterate(z):
        for _ in range(3):
            z = 1 - 2 * z.abs()
        return z

    xd = x.double()
    torch.testing.assert_close(iterate(xd).float(), y)
    right, left = iterate(xd + 1e-7) - iterate(xd), iterate(xd) - iterate(xd - 1e-7)
    smooth = (right * left > 0)[:, 0]  # away from a kink
    assert smooth.sum() > 250
    assert torch.equal(flip[smooth], (right < 0)[:, 0][smooth])
    assert 0.3 < flip.float().mean() < 0.7


def test_depth_stability_smoke(tmp_path):
    out = tmp_path / "depth"
    argv = ["--depths", "2,4", "--seeds", "2", "--steps", "3", "--out", str(out)]
    results = _load("depth_stability").main(argv)
    assert (out / "depth_stability.png").stat().st_size > 0
    assert _read_results(out)["settings"]["steps"] == 3
    assert len(results["runs"]) == 2 * 3 * 2
    run = next(r for r in results["runs"] if (r["rule"], r["depth"]) == ("delta", 4))
    assert len(run["init"]["block_grad_norms"]) == len(run["init"]["state_rms"]) == 4
    assert len(run["train"]["losses"]) == 3 and isinstance(run["train"]["diverged"], bool)
    assert run["train"]["failed"] == (run["train"]["diverged"] or run["train"]["final_loss"] >= 1)
    s = results["summary"]["additive"]["4"]
    assert s["runs"] == 2 and s["grad_norm_at_init"]["n"] == 2


def test_depth_stability_targets_have_unit_scale():
    """A failed run is one no better than predicting zero, whose loss must then be 1."""
    torch = __import__("torch")
    _, y = _load("depth_stability").teacher(8192, torch.Generator().manual_seed(3))
    assert 0.95 < y.pow(2).mean().item() < 1.05


def test_examples_refuse_bad_flags(capsys):
    for name, argv in (
        ("digits_resnet", ["--seeds", "0"]),
        ("dynamical_systems", ["--tasks", "pendulum"]),
        ("depth_stability", ["--steps", "0"]),
        ("depth_stability", ["--depths", "4,0"]),
        ("digits_resnet", ["--rules", "additive,plain"]),
        ("dynamical_systems", ["--depths", "two"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            _load(name).main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown ['pendulum']" in err and "unknown ['plain']" in err
    assert "--seeds must be >= 1, got 0" in err and "--depths must be >= 1, got (4, 0)" in err
    assert "expected comma-separated integers, got 'two'" in err
