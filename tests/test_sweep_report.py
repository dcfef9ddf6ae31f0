"""`deltalearn report`: t statistics against closed forms and numerical integration, and the report
of hand-made sweep folders against the same numbers computed directly from their logs."""

import csv
import json
import math
import statistics
from dataclasses import fields

import pytest

from deltalearn.cli import main
from deltalearn.errors import UserError
from deltalearn.experiments.grid import Cell, load_grid, with_overrides
from deltalearn.experiments.results import best_learning_rates
from deltalearn.experiments.stats import (
    paired_difference,
    summarize,
    t_central_probability,
    t_quantile,
    t_two_sided_p,
)
from deltalearn.experiments.sweep import choose_learning_rates
from deltalearn.experiments.sweep_report import write_sweep_report
from deltalearn.train.config import TrainConfig, load_config, save_config
from deltalearn.train.trainer import TrainResult

# ---- Student's t ---------------------------------------------------------------------------------


def t975_df1() -> float:
    return math.tan(math.pi * 0.475)  # the Cauchy quantile


def t975_df2() -> float:
    a = 2 * 0.975 - 1  # df = 2: P(|T| <= t) = t / sqrt(2 + t²)  =>  t = a·sqrt(2 / (1 - a²))
    return a * math.sqrt(2 / (1 - a * a))


def t_density(x: float, df: int) -> float:
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def simpson(f, a: float, b: float, n: int = 4000) -> float:
    h = (b - a) / n
    total = f(a) + f(b)
    total += 4 * sum(f(a + i * h) for i in range(1, n, 2))
    total += 2 * sum(f(a + i * h) for i in range(2, n, 2))
    return total * h / 3


def test_t_quantiles_equal_the_closed_forms_and_the_tables():
    assert t_quantile(0.975, 1) == pytest.approx(t975_df1(), rel=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(t975_df2(), rel=1e-12)
    assert t_quantile(0.025, 2) == pytest.approx(-t975_df2(), rel=1e-12)
    table = {3: 3.182446305, 4: 2.776445105, 9: 2.262157163, 29: 2.045229642, 120: 1.979930405}
    for df, q in table.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-8), df
    assert t_quantile(0.5, 7) == 0.0


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 11])
def test_t_probability_equals_numerical_integration(df):
    for t in (0.3, 1.5, 4.0):
        reference = 2 * simpson(lambda x: t_density(x, df), 0.0, t)
        assert t_central_probability(t, df) == pytest.approx(reference, abs=1e-10), (df, t)
        assert t_two_sided_p(-t, df) == pytest.approx(1 - reference, abs=1e-10)
    assert t_central_probability(math.inf, df) == 1.0


def test_t_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 6, 17, 60):
        assert t_quantile(0.975, df) == pytest.approx(st.t.ppf(0.975, df), rel=1e-10)
        assert t_quantile(0.1, df) == pytest.approx(st.t.ppf(0.1, df), rel=1e-10)
        assert t_two_sided_p(2.3, df) == pytest.approx(2 * st.t.sf(2.3, df), rel=1e-9)


def test_t_rejects_bad_arguments():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_quantile(0.9, bad)
    with pytest.raises(ValueError, match="probability"):
        t_quantile(1.0, 3)


def test_summarize_and_paired_difference_by_hand():
    values = [1.0, 2.0, 4.0]
    s = summarize(values)
    mean, sd = 7 / 3, statistics.stdev(values)
    half = t975_df2() * sd / math.sqrt(3)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(mean), pytest.approx(sd))
    assert (s.ci_low, s.ci_high) == (pytest.approx(mean - half), pytest.approx(mean + half))

    d = paired_difference([1.0, 2.0, 4.0], [0.5, 1.5, 3.0])  # differences 0.5, 0.5, 1.0
    dsd = statistics.stdev([0.5, 0.5, 1.0])
    t = (2 / 3) / (dsd / math.sqrt(3))
    assert d.mean == pytest.approx(2 / 3) and d.t == pytest.approx(t)
    assert d.p == pytest.approx(1 - t / math.sqrt(2 + t * t))  # df = 2 closed form
    assert d.ci_low == pytest.approx(2 / 3 - t975_df2() * dsd / math.sqrt(3))

    one = summarize([3.0])
    assert (one.std, one.ci_low, one.ci_high) == (None, None, None)
    same = paired_difference([2.0, 3.0], [1.0, 2.0])  # every difference 1: t infinite, p 0
    assert same.t == math.inf and same.p == 0.0 and same.ci_low == same.ci_high == 1.0
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


# ---- hand-made sweep folders ---------------------------------------------------------------------

BATCH, SEQ = 2, 8


def fake_run(
    root,
    variant,
    seed,
    final,
    *,
    lr=2e-3,
    steps=10,
    bpb=None,
    status="finished",
    rate=1000.0,
    flops=None,
):
    """A run folder as the trainer leaves it: config.yaml, log.jsonl (a line per step, validation
    at step 5 and at the end), summary.json when finished, diverged.json when diverged."""
    cell = Cell(variant, "tiny", lr, steps, seed)
    run = root / "runs" / cell.name
    run.mkdir(parents=True)
    cfg = TrainConfig()
    cfg.model.variant, cfg.optim.lr, cfg.run.out = variant, lr, str(run)
    cfg.run.steps, cfg.run.seed, cfg.run.batch_size, cfg.run.seq_len = steps, seed, BATCH, SEQ
    save_config(cfg, run / "config.yaml")
    lines = []
    last = steps if status == "finished" else steps // 2
    for step in range(1, last + 1):
        line = {"step": step, "loss": 9.0, "tokens": step * BATCH * SEQ, "tokens_per_s": rate}
        if flops is not None:
            line["flops"] = step * BATCH * SEQ * flops
        if step in (5, steps):
            line["val_loss"] = final + (1.0 if step == 5 else 0.0)
            if bpb is not None:
                line["val_bpb"] = bpb + (0.5 if step == 5 else 0.0)
        lines.append(json.dumps(line))
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    if status == "finished":
        known = {
            "run_dir": str(run),
            "status": "finished",
            "step": steps,
            "val_loss": final,
            "params": 100 + len(variant),
            "train_tokens_per_s": rate,
            "peak_memory_mb": 50.0 + seed,
            "memory_kind": "cpu_peak_rss",
            "flops_per_token": flops,
        }
        summary = {f.name: known.get(f.name) for f in fields(TrainResult)}
        (run / "summary.json").write_text(json.dumps(summary))
    elif status == "diverged":
        (run / "diverged.json").write_text(json.dumps({"error": "non-finite loss"}))
    return run


LOSS = {"baseline": [3.10, 3.00, 3.20], "ddl": [3.02, 2.97, 3.08]}
BPB = {"baseline": [1.50, 1.45, 1.55], "ddl": [1.46, 1.44, 1.49]}


def test_report_equals_direct_computation_from_the_logs(tmp_path):
    for variant, losses in LOSS.items():
        for seed, loss in enumerate(losses, start=1):
            rate = 800.0 if variant == "ddl" else 1000.0
            fake_run(
                tmp_path, variant, seed, loss, bpb=BPB[variant][seed - 1], rate=rate, flops=6e3
            )
    report = write_sweep_report(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    cells = {c["variant"]: c for c in results["cells"]}
    t2 = t975_df2()
    for variant, losses in LOSS.items():
        c = cells[variant]
        mean, sd = statistics.fmean(losses), statistics.stdev(losses)
        assert c["val_loss"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert c["val_loss"]["std"] == pytest.approx(sd, abs=1e-12)
        assert c["val_loss"]["ci_low"] == pytest.approx(mean - t2 * sd / math.sqrt(3), abs=1e-12)
        assert c["val_loss"]["ci_high"] == pytest.approx(mean + t2 * sd / math.sqrt(3), abs=1e-12)
        assert c["val_bpb"]["mean"] == pytest.approx(statistics.fmean(BPB[variant]), abs=1e-12)
        assert c["seeds"] == [1, 2, 3]
        # wall-clock rebuilt from the logged throughput; FLOPs from the logged cumulative count
        tokens = 10 * BATCH * SEQ
        assert c["train_seconds"] == pytest.approx(tokens / (800.0 if variant == "ddl" else 1000.0))
        assert c["train_flops"] == pytest.approx(tokens * 6e3)
    diffs = [a - b for a, b in zip(LOSS["ddl"], LOSS["baseline"], strict=True)]
    d = cells["ddl"]["vs_baseline"]
    dmean, dsd = statistics.fmean(diffs), statistics.stdev(diffs)
    t = dmean / (dsd / math.sqrt(3))
    assert d["n"] == 3 and d["mean"] == pytest.approx(dmean, abs=1e-12)
    assert d["ci_low"] == pytest.approx(dmean - t2 * dsd / math.sqrt(3), abs=1e-12)
    assert d["t"] == pytest.approx(t) and d["p"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))
    bdiff = [a - b for a, b in zip(BPB["ddl"], BPB["baseline"], strict=True)]
    assert cells["ddl"]["vs_baseline_bpb"]["mean"] == pytest.approx(statistics.fmean(bdiff))
    assert cells["baseline"]["vs_baseline"] is None

    with (tmp_path / "cells.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(rows["ddl"]["vs_baseline_mean"]) == pytest.approx(dmean, abs=1e-12)
    assert float(rows["baseline"]["val_loss_ci_high"]) == pytest.approx(
        cells["baseline"]["val_loss"]["ci_high"], abs=1e-12
    )
    with (tmp_path / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    md = report.markdown_path.read_text()
    assert f"| ddl | 3 | 160 | {statistics.fmean(LOSS['ddl']):.4f} ± " in md
    assert f"{dmean:+.4f}" in md and "bits per byte" in md
    assert {p.name for p in report.plots} == {
        "val_loss_tokens.png",
        "val_loss_flops.png",
        "val_loss_time.png",
    }
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in report.plots)
    assert "No `sweep.json`" in md  # a hand-made folder has no provenance


def test_controls_are_paired_differences_computed_from_the_logs(tmp_path):
    losses = {
        "baseline": [3.10, 3.00, 3.20],
        "ddl-cc": [2.90, 2.85, 2.95],
        "additive-cc": [3.05, 3.02, 3.30],
        "write-only-cc": [2.93, 2.90, 2.96],
    }
    for variant, values in losses.items():
        for seed, loss in enumerate(values, start=1):
            fake_run(tmp_path, variant, seed, loss)
    fake_run(tmp_path, "write-only-cc", 4, 2.0)  # no ddl-cc seed 4: not paired
    report = write_sweep_report(tmp_path)
    controls = json.loads((tmp_path / "results.json").read_text())["controls"]
    by_pair = {(c["group"][0], c["control_group"][0]): c for c in controls}
    # ddl and write-only (dv = 1) were not trained: their pair is absent
    assert set(by_pair) == {
        ("ddl-cc", "additive-cc"),
        ("ddl-cc", "write-only-cc"),
        ("additive-cc", "baseline"),
    }
    for (cell, control), c in by_pair.items():
        diffs = [a - b for a, b in zip(losses[cell], losses[control], strict=True)]
        d = c["difference"]
        assert c["paired_seeds"] == [1, 2, 3] and d["n"] == 3
        assert d["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
        half = t975_df2() * statistics.stdev(diffs) / math.sqrt(3)
        assert d["ci_low"] == pytest.approx(statistics.fmean(diffs) - half, abs=1e-12)
    md = report.markdown_path.read_text()
    rewrite = statistics.fmean(
        a - b for a, b in zip(losses["ddl-cc"], losses["additive-cc"], strict=True)
    )
    assert "## Where the gain comes from (paired controls)" in md
    assert (
        f"| ddl-cc | additive-cc | the delta rewrite, on the same expanded state | 3 | "
        f"{rewrite:+.4f} ± " in md
    )


def test_report_without_controls_has_no_controls_section(tmp_path):
    for seed in (1, 2):
        fake_run(tmp_path, "baseline", seed, 3.0 + seed / 10)
        fake_run(tmp_path, "ddl", seed, 2.9 + seed / 10)
    assert "paired controls" not in write_sweep_report(tmp_path).markdown_path.read_text()
    assert json.loads((tmp_path / "results.json").read_text())["controls"] == []


def test_report_names_the_model_overrides_of_its_cells(tmp_path):
    fake_run(tmp_path, "baseline", 1, 3.0)
    fake_run(tmp_path, "ddl", 1, 2.9)
    assert "changed from its preset" not in write_sweep_report(tmp_path).markdown_path.read_text()
    for cell in (tmp_path / "runs").iterdir():
        cfg = load_config(cell / "config.yaml")
        cfg.model.overrides = {"tie_word_embeddings": False, "embedding_init_std": 1.0}
        save_config(cfg, cell / "config.yaml")
    md = write_sweep_report(tmp_path).markdown_path.read_text()
    assert (
        "Model changed from its preset in every cell: `embedding_init_std=1.0`, "
        "`tie_word_embeddings=False`." in md
    )


def test_report_pairs_within_the_same_lr_and_lists_unfinished_runs(tmp_path):
    for lr, shift in ((1e-3, 0.0), (4e-3, 0.5)):
        for seed in (1, 2):
            fake_run(tmp_path, "baseline", seed, 3.0 + shift + seed / 10, lr=lr)
            fake_run(tmp_path, "ddl", seed, 2.9 + shift + seed / 10, lr=lr)
    fake_run(tmp_path, "ddl", 3, 0.0, lr=1e-3, status="diverged")
    fake_run(tmp_path, "ddl", 4, 0.0, lr=1e-3, status="unfinished")
    write_sweep_report(tmp_path)
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    ddl = {c["lr"]: c for c in cells if c["variant"] == "ddl"}
    for lr in (1e-3, 4e-3):
        assert ddl[lr]["baseline_group"] == ["baseline", "tiny", lr, 10]
        assert ddl[lr]["vs_baseline"]["mean"] == pytest.approx(-0.1)
        assert ddl[lr]["paired_seeds"] == [1, 2]
    assert ddl[1e-3]["diverged"] == [3] and ddl[1e-3]["unfinished"] == [4]
    assert ddl[1e-3]["seeds"] == [1, 2]  # the diverged and unfinished runs are left out
    md = (tmp_path / "report.md").read_text()
    assert "## Not finished" in md and "ddl · lr 0.001: seeds diverged [3]" in md


def test_lr_choice_from_an_lr_sweep(tmp_path):
    losses = {  # final loss per (variant, lr)
        "baseline": {1e-3: 3.0, 4e-3: 3.1, 8e-3: 3.4},
        "ddl": {1e-3: 3.2, 4e-3: 2.9, 8e-3: 2.5},
    }
    for variant, by_lr in losses.items():
        for lr, loss in by_lr.items():
            fake_run(tmp_path, variant, 1, loss, lr=lr)
    fake_run(tmp_path, "ddl", 2, 0.0, lr=8e-3, status="diverged")  # rules 8e-3 out for ddl
    per_variant, shared = best_learning_rates(tmp_path, "tiny")
    assert per_variant == {"baseline": 1e-3, "ddl": 4e-3}
    assert shared == 4e-3  # mean 3.0 against 3.1 at 1e-3; 8e-3 did not finish for ddl

    grid = with_overrides(load_grid("paper-grid"), {"variants": ["baseline", "ddl", "ddl-cc"]})
    tuned, note = choose_learning_rates(grid, tmp_path, "per-variant")
    assert tuned.lr == {"baseline": 1e-3, "ddl": 4e-3, "ddl-cc": 4e-3}
    assert "best learning rate per variant" in note and "ddl-cc (not in that sweep)" in note
    one, note = choose_learning_rates(grid, tmp_path, "shared")
    assert one.lr == {"baseline": 4e-3, "ddl": 4e-3, "ddl-cc": 4e-3}
    assert "one shared learning rate 0.004" in note


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no runs/ folder" in capsys.readouterr().err
    run = fake_run(tmp_path / "cut", "baseline", 1, 3.0)
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # the last line lost
    with pytest.raises(UserError, match="no validation loss at the last step"):
        write_sweep_report(tmp_path / "cut")
