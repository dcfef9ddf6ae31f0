"""`deltalearn compare`: trains variants in fresh processes, writes the report, skips finished runs."""

import json

import pytest

from deltalearn.cli import main

pytestmark = pytest.mark.slow


def compare_args(out, cache, *extra):
    return [
        "compare", "--out", str(out), "--steps", "3", "--batch-size", "4", "--seq-len", "32",
        "--vocab-size", "300", "--max-chars", "100000", "--cache-dir", str(cache), "--no-progress",
        *extra,
    ]  # fmt: skip


def test_compare_report_and_rerun(tmp_path, capsys):
    out, cache = tmp_path / "cmp", tmp_path / "cache"
    assert main(compare_args(out, cache, "--variants", "baseline,ddl", "--seeds", "1")) == 0
    for name in ("report.md", "results.json", "results.csv", "val_loss.png"):
        assert (out / name).is_file(), name
    assert (out / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "| ddl |" in report
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["variants"]}
    assert set(rows) == {"baseline", "ddl"}
    assert rows["ddl"]["params"] > rows["baseline"]["params"]
    assert all(r["val_loss"] > 0 and r["train_tokens_per_s"] > 0 for r in rows.values())
    capsys.readouterr()

    # Same out folder, one more seed: seed 1 is reused, only seed 2 trains; mean ± std appear.
    assert main(compare_args(out, cache, "--variants", "baseline", "--seeds", "1,2")) == 0
    printed = capsys.readouterr().out
    assert "baseline seed 1 already finished" in printed
    assert "±" in (out / "report.md").read_text()


def test_compare_unknown_variant_is_a_user_error(tmp_path, capsys):
    code = main(compare_args(tmp_path / "cmp", tmp_path / "cache", "--variants", "baseline,nope"))
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_compare_gives_the_same_losses_with_the_fast_paths_off(tmp_path, monkeypatch):
    """`DELTALEARN_EPILOGUE=reference` (every fast path off) reproduces the default runs' losses to
    round-off: the fast paths change how, not what, is computed."""
    cache = tmp_path / "cache"
    losses = {}
    for backend in ("auto", "reference"):
        monkeypatch.setenv("DELTALEARN_EPILOGUE", backend)  # inherited by the spawned runs
        out = tmp_path / backend
        assert main(compare_args(out, cache, "--variants", "ddl,ddl-cc", "--seeds", "1")) == 0
        rows = json.loads((out / "results.json").read_text())["variants"]
        losses[backend] = {r["variant"]: r["val_loss"] for r in rows}
    for variant, loss in losses["auto"].items():
        assert loss == pytest.approx(losses["reference"][variant], rel=1e-5, abs=1e-5), variant
