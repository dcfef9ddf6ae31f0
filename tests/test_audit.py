"""The gate audit: its numbers equal what the model's gates say, its rewrite check passes on the
activations of trained runs and fails on a broken rewrite, and it writes its report and figures."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import random_ids, tiny_model
from train_helpers import tiny_train_args

from deltalearn.analysis.audit import (
    BASELINE_NOTE,
    ContractionCheckError,
    audit_model,
    audit_run,
    collect_gate_stats,
)
from deltalearn.analysis.regimes import (
    BETA_EDGES,
    LOG_EDGES,
    histogram_quantiles,
    log_histogram,
    regime_counts,
)
from deltalearn.cli import main
from deltalearn.errors import UserError
from deltalearn.nn import DeltaUpdate
from deltalearn.ops import channel_mix

PNG = b"\x89PNG\r\n\x1a\n"
BATCHES = [random_ids(2, 7, seed=1), random_ids(3, 5, seed=2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs on the same corpus: ddl-cc (dv = 4) and the baseline."""
    root = tmp_path_factory.mktemp("audit")
    for variant in ("ddl-cc", "baseline"):
        args = tiny_train_args(root / variant, root / "cache", "--variant", variant)
        assert main(args) == 0
    return root


def _audit_args(run: Path, *extra: str) -> list[str]:
    return ["audit", str(run), "--max-batches", "2", "--batch-size", "2", *extra]


# ---------------------------------------------------------------------- a trained run, end to end


def test_check_passes_on_a_trained_run_and_the_figures_are_written(runs, capsys):
    run = runs / "ddl-cc"
    assert main(_audit_args(run, "--against", str(runs / "baseline"))) == 0
    out = capsys.readouterr().out
    assert "rewrite check passed: e_post = (1 − β) e_pre" in out
    folder = run / "audit"
    result = json.loads((folder / "audit.json").read_text())
    check = result["contraction_check"]
    assert check["passed"] and check["failures"] == 0
    tokens = 2 * 2 * 32  # 2 batches of 2 × 32 tokens
    assert result["tokens"] == tokens
    assert check["values"] == tokens * 4 * 4  # tokens × 4 sublayers × dv
    assert 0 < check["max_error_over_tolerance"] < 1
    figures = ["beta_heatmap.png", "regimes.png", "contraction.png"]
    figures += ["update_norms.png", "channels.png"]
    assert result["figures"] == figures
    report = (folder / "report.md").read_text()
    assert "**PASSED.**" in report
    for name in figures:
        assert (folder / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in report
    assert sorted(p.name for p in folder.iterdir()) == sorted([*figures, "report.md", "audit.json"])
    assert not [p for p in run.iterdir() if p.name.startswith(".audit")]  # no temp folder left
    assert result["against"]["variant"] == "baseline" and result["against"]["tokens"] == tokens
    for r in result["layers"]:  # today's keys are still there, beside the new ones
        for key in ("beta_mean", "beta_std", "frac_beta_gt_1", "abs_discrepancy_mean", "tokens"):
            assert key in r
        assert math.isclose(sum(r["regimes"].values()), 1.0)
        assert r["baseline_update_ratio_mean"] > 0 and r["update_ratio_mean"] > 0
        assert len(r["channels"]["write_share"]) == 4
        assert math.isclose(sum(r["channels"]["read_share"]), 1.0)


def test_baseline_gets_branch_norms_only(runs, capsys):
    run = runs / "baseline"
    assert main(_audit_args(run)) == 0
    assert BASELINE_NOTE in capsys.readouterr().out
    result = json.loads((run / "audit" / "audit.json").read_text())
    assert result["contraction_check"] is None and result["figures"] == ["update_norms.png"]
    assert BASELINE_NOTE in (run / "audit" / "report.md").read_text()
    for r in result["layers"]:
        assert "beta_mean" not in r and r["branch_norm_mean"] > 0


def test_against_must_be_a_baseline_of_the_same_depth(runs, tmp_path, capsys):
    with pytest.raises(UserError, match="expected an additive baseline run"):
        audit_run(runs / "ddl-cc", max_batches=1, against=runs / "ddl-cc", out_dir=tmp_path / "a")
    deeper = tmp_path / "deeper"
    args = tiny_train_args(deeper, runs / "cache", "--variant", "baseline", steps=1)
    assert main([*args, "--set=model.overrides.num_layers=3"]) == 0
    capsys.readouterr()
    assert main(_audit_args(runs / "ddl-cc", "--against", str(deeper))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 3 layers, the audited run 2" in err[0]
    assert not (tmp_path / "a").exists()


def test_python_returns_what_the_file_holds_and_a_failed_write_keeps_it(
    runs, tmp_path, monkeypatch
):
    out = tmp_path / "audit"
    result = audit_run(runs / "ddl-cc", batch_size=2, max_batches=1, out_dir=out)
    saved = json.loads((out / "audit.json").read_text())
    assert (result.pop("path"), result.pop("folder")) == (str(out / "audit.json"), str(out))
    assert result.pop("report") == str(out / "report.md")
    assert saved == json.loads(json.dumps(result))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(result, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("deltalearn.analysis.figures.write_figures", broken)
    with pytest.raises(UserError, match="No space left on device"):
        audit_run(runs / "ddl-cc", batch_size=2, max_batches=2, out_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["audit"]  # no temp folder left behind


# -------------------------------------------------------------------- the check can fail


def _break_rewrites(monkeypatch, how: str) -> None:
    """Make every rewrite of the model slightly wrong."""
    forward = DeltaUpdate.forward

    def wrong(self, X, h, c, u, compress=None):
        out = forward(self, X, h, c, u)
        if how == "overshoot":  # the update 0.1 % too large, as with a β off by 1e-3
            out = X + (out - X) * 1.001
        else:  # "offset": a small write outside k
            out = out + 1e-4 * X.abs().amax()
        # With the fused compressor read the next sublayer reads the (broken) state written here.
        return out if compress is None else (out, channel_mix(out, compress))

    monkeypatch.setattr(DeltaUpdate, "forward", wrong)


def test_check_fails_loudly_on_a_broken_rewrite(runs, tmp_path, monkeypatch, capsys):
    _break_rewrites(monkeypatch, "offset")
    out = tmp_path / "audit"
    with pytest.raises(ContractionCheckError, match="FAILED on real activations"):
        audit_run(runs / "ddl-cc", batch_size=2, max_batches=1, out_dir=out)
    assert "FAILED — a bug in the rewrite" in (out / "report.md").read_text()  # still written
    assert main(_audit_args(runs / "ddl-cc", "--out", str(out))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rewrite check FAILED" in err[0] and "tolerance" in err[0]


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc"])
def test_an_update_off_by_a_thousandth_fails_the_check(monkeypatch, variant):
    _break_rewrites(monkeypatch, "overshoot")
    check = audit_model(tiny_model(variant), BATCHES)["contraction_check"]
    assert not check["passed"] and check["max_error_over_tolerance"] > 10


def test_a_missing_erase_term_fails_the_delta_check():
    model = tiny_model("ddl")
    for block in model.layers:  # the model computes write-only, the config says delta
        block.attn_update.rule = block.mlp_update.rule = "write_only"
    result = audit_model(model, BATCHES)
    assert not result["contraction_check"]["passed"]
    assert result["contraction_check"]["max_error_over_tolerance"] > 1e3


# -------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc", "write-only-cc"])
def test_numbers_match_the_gates(variant):
    model = tiny_model(variant)
    result = audit_model(model, BATCHES)
    check = result["contraction_check"]
    assert check["passed"], check
    assert check["identity"] == (
        "kᵀX' = kᵀX + βv" if "write" in variant else "e_post = (1 − β) e_pre"
    )
    gates = [model(x, output_gates=True).gates for x in BATCHES]
    beta = torch.cat([g.beta.flatten(2) for g in gates], -1)  # (L, 2, tokens)
    disc = torch.cat([g.discrepancy.flatten(2, 3) for g in gates], -2).double()  # (L, 2, N, dv)
    old = collect_gate_stats(model, BATCHES)
    for r, o in zip(result["layers"], old, strict=True):
        i, j = r["layer"], ("attn", "mlp").index(r["sublayer"])
        b, d = beta[i, j], disc[i, j]
        for key in ("beta_mean", "beta_std", "frac_beta_gt_1", "abs_discrepancy_mean", "tokens"):
            assert r[key] == pytest.approx(o[key], rel=1e-12), key
        shares = [((b < 0.1).sum(), ((b >= 0.1) & (b < 0.9)).sum())]
        shares += [((b >= 0.9) & (b <= 1.1)).sum(), ((b > 1.1) & (b <= 1.9)).sum(), (b > 1.9).sum()]
        expected = [int(x) / b.numel() for x in (*shares[0], *shares[1:])]
        assert list(r["regimes"].values()) == expected
        for q, v in r["beta_quantiles"].items():  # one bin (0.001) of the exact quantile
            exact = np.quantile(b.double().numpy(), float(q), method="inverted_cdf")
            assert abs(v - exact) <= 0.001 + 1e-9, (q, v, exact)
        # e_pre = kᵀX − v is minus the recorded discrepancy (float64 vs float32 readout)
        rms = d.pow(2).mean().sqrt().item()
        assert r["e_pre_rms"] == pytest.approx(rms, rel=1e-5)
        if "write" not in variant:  # delta: e_post = (1 − β) e_pre
            post = ((1 - b.double())[:, None] * d).pow(2).mean().sqrt().item()
            assert r["e_post_rms"] == pytest.approx(post, rel=1e-4)
            # ‖X' − X‖ = β ‖e_pre‖ for a unit k: the update size from the gates alone
            upd = (b.double() * d.norm(dim=-1)).mean().item()
            assert r["update_norm_mean"] == pytest.approx(upd, rel=1e-4)


def test_baseline_model_has_branch_norms_and_the_embedding_as_first_state():
    model = tiny_model("baseline")
    result = audit_model(model, BATCHES)
    assert result["contraction_check"] is None and result["note"] == BASELINE_NOTE
    first = result["layers"][0]
    norms = torch.cat([model.embed(x).flatten(0, 1).double().norm(dim=-1) for x in BATCHES])
    assert first["state_norm_mean"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert collect_gate_stats(model, [random_ids(1, 4)]) == []


def test_gate_stats_match_the_gates_over_several_batches():
    model = tiny_model("ddl-cc")
    rows = collect_gate_stats(model, BATCHES)
    gates = [model(x, output_gates=True).gates for x in BATCHES]
    beta = torch.cat([g.beta.flatten(2) for g in gates], -1).double()  # (L, 2, tokens)
    disc = torch.cat([g.discrepancy.abs().mean(-1).flatten(2) for g in gates], -1).double()
    assert [(r["layer"], r["sublayer"]) for r in rows] == [
        (0, "attn"),
        (0, "mlp"),
        (1, "attn"),
        (1, "mlp"),
    ]
    for r in rows:
        b = beta[r["layer"], ("attn", "mlp").index(r["sublayer"])]
        d = disc[r["layer"], ("attn", "mlp").index(r["sublayer"])]
        assert r["tokens"] == 2 * 7 + 3 * 5
        torch.testing.assert_close(r["beta_mean"], b.mean().item())
        torch.testing.assert_close(r["beta_std"], b.std(unbiased=False).item())
        torch.testing.assert_close(r["frac_beta_gt_1"], (b > 1).double().mean().item())
        torch.testing.assert_close(r["abs_discrepancy_mean"], d.mean().item())


# -------------------------------------------------------------------- regimes and histograms


def test_regime_boundaries():
    beta = torch.tensor([0.0, 0.0999, 0.1, 0.8999, 0.9, 1.0, 1.1, 1.1001, 1.9, 1.9001, 2.0])
    assert regime_counts(beta).tolist() == [2, 2, 3, 2, 2]


def test_histogram_quantiles():
    x = torch.linspace(0.0005, 1.9995, 2000)  # one value in the middle of each β bin
    counts = torch.bincount((x * 1000).long(), minlength=2000)
    qs = histogram_quantiles(counts, BETA_EDGES, (0.0, 0.25, 0.5, 1.0))
    assert qs == pytest.approx([0.0, 0.5, 1.0, 2.0], abs=1e-12)
    ratios = torch.tensor([0.0, 1e-9, 0.01, 0.02, 0.04, 1e4])
    hist = log_histogram(ratios)
    assert hist[0] == 2 and hist[-1] == 1 and hist.sum() == 6
    median = histogram_quantiles(hist, LOG_EDGES, (0.5,), log=True)[0]
    assert median == pytest.approx(0.01, rel=0.012)  # the 3rd of 6 values, to one log bin
