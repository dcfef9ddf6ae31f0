"""`deltalearn bench decode`: dynamic vs static cache, eager vs compiled decode step."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from deltalearn.bench.decode import DecodeBench, DecodeRun
from deltalearn.cli import main as cli_main

TINY = ["--set", "num_layers=2", "--set", "hidden_size=32", "--set", "num_heads=2"]
TINY += ["--set", "head_dim=16", "--set", "vocab_size=61"]


def test_every_variant_and_mode_gets_a_row_and_a_ratio(tmp_path):
    out = tmp_path / "decode.json"
    argv = ["bench", "decode", "--variants", "baseline,ddl-tc", "--modes", "dynamic,static"]
    argv += [*TINY, "--prompt", "4", "--tokens", "3", "--repeats", "2", "--json", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "decode" and report["machine"] and report["torch"]
    rows = {(r["variant"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(v, m) for v in ("baseline", "ddl-tc") for m in ("dynamic", "static")}
    for (variant, mode), row in rows.items():
        assert row["decode_tokens_per_s"] > 0 and len(row["decode_seconds_by_round"]) == 2
        q1, median, q3 = row["x_dynamic_quartiles"]  # the speed-up over dynamic, round by round
        assert 0 < q1 <= median <= q3
        if mode == "dynamic":
            assert row["x_dynamic"] == 1.0 and (q1, median, q3) == (1.0, 1.0, 1.0)
        else:
            dynamic = rows[(variant, "dynamic")]["decode_seconds_by_round"]
            ratios = [d / s for d, s in zip(dynamic, row["decode_seconds_by_round"], strict=True)]
            assert median == pytest.approx(sum(ratios) / 2)  # two rounds: their mean
        # and against the baseline (the first variant) in the same mode
        baseline = rows[("baseline", mode)]
        assert row["x_baseline"] == pytest.approx(
            row["decode_tokens_per_s"] / baseline["decode_tokens_per_s"]
        )
        q1, median, q3 = row["x_baseline_quartiles"]
        if variant == "baseline":
            assert row["x_baseline"] == 1.0 and (q1, median, q3) == (1.0, 1.0, 1.0)
        else:
            ratios = [
                b / s
                for b, s in zip(
                    baseline["decode_seconds_by_round"], row["decode_seconds_by_round"], strict=True
                )
            ]
            assert median == pytest.approx(sum(ratios) / 2)
    assert "| ddl-tc | static |" in printed.getvalue() and "× baseline" in printed.getvalue()


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_the_timed_loop_decodes_greedily(mode):
    """The benchmark decodes the tokens `generate` would (so it times real decoding)."""
    bench = DecodeBench(
        variants=["ddl-tc"],
        overrides=dict(num_layers=2, hidden_size=32, num_heads=2, head_dim=16, vocab_size=61),
        prompt=5,
        tokens=4,
    )
    run = DecodeRun(bench, "ddl-tc", mode)
    tokens = []
    step = run.step
    run.step = lambda token, cache: tokens.append(step(token, cache)[0]) or (tokens[-1], cache)
    assert run.decode() > 0
    with torch.no_grad():
        expected = run.model.generate(run.prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(torch.cat(tokens, 1), expected[:, -4:])


def test_graphed_decoding_feeds_each_token_back_through_its_buffer():
    """static-graphed (here `StepGraph`'s CPU stand-in, which reruns the step at each call): two
    repeats — the first with the warm-up calls and the recording, the second replays only —
    decode the tokens `generate` would, each repeat from a fresh prefill."""
    from deltalearn.train.cuda_graph import WARMUP_CALLS

    bench = DecodeBench(
        variants=["ddl-tc"],
        overrides=dict(num_layers=2, hidden_size=32, num_heads=2, head_dim=16, vocab_size=61),
        prompt=5,
        tokens=WARMUP_CALLS + 3,
    )
    run = DecodeRun(bench, "ddl-tc", "static-graphed")
    decoded = []
    step = run._eager_step

    def recording_step(token, cache):
        out = step(token, cache)
        decoded.append(out[0])
        return out

    run._eager_step = recording_step
    with torch.no_grad():
        expected = run.model.generate(run.prompt, max_new_tokens=bench.tokens + 1, do_sample=False)
    for _ in range(2):
        decoded.clear()
        assert run.decode() > 0
        # the prefill's token, then one a call: the stand-in runs the step's Python every call
        assert torch.equal(torch.cat(decoded, 1), expected[:, bench.prompt :])
    assert run._graph.recorded and run._graph.calls == 2 * bench.tokens


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--modes", "static,warp"], "warp"),
        (["--tokens", "0"], "--tokens"),
        (["--modes", "static-graphed", "--device", "cpu"], "needs --device cuda"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys, extra, names):
    assert cli_main(["bench", "decode", *TINY, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and names in err
