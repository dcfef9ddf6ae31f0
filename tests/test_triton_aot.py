"""The Triton kernels compiled for an H200 (sm_90) on this CPU-only machine (`ops.triton_aot`,
`deltalearn bench kernels`): every kernel the paper's variants launch, in training, inference and
decoding, fp32 and under bf16 autocast, compiles with Triton's real specialisation and spills no
registers; odd widths, every value-channel count and the chunked wide-row forward compile too.

The interpreter tests (`test_ops_epilogue.py`, `test_ops_triton_mixing.py`) check the kernels'
numbers; these check what the interpreter cannot: that the GPU compiler takes them.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

pytest.importorskip("triton")

from triton import knobs  # noqa: E402
from triton_interpreter import IN_INTERPRETER  # noqa: E402

from deltalearn import DeltaLM, DeltaLMConfig  # noqa: E402
from deltalearn.bench.kernels import KernelBench, kernels_benchmark, model_launches  # noqa: E402
from deltalearn.cli import main as cli_main  # noqa: E402
from deltalearn.ops import _shapes, backend, triton_aot, triton_epilogue  # noqa: E402
from deltalearn.ops.epilogue import rewrite_epilogue  # noqa: E402

pytestmark = [
    pytest.mark.skipif(IN_INTERPRETER, reason="interpreted kernels do not compile for a GPU"),
    pytest.mark.skipif(
        not knobs.nvidia.cuobjdump.path, reason="this triton build ships no cuobjdump"
    ),
]
KERNEL_NAMES = {
    "_fwd_kernel",
    "_bwd_kernel",
    "_rebuild_kernel",
    "_read_fwd_kernel",
    "_read_bwd_kernel",
}


def test_every_kernel_of_the_paper_variants_compiles_for_sm90_without_spills():
    rows = kernels_benchmark(KernelBench(size="small"))
    assert {r["kernel"] for r in rows} == KERNEL_NAMES
    launched_by = ", ".join(r["used_by"] for r in rows)
    for variant in ("ddl", "ddl-cc", "ddl-tc", "write-only-cc", "write-only"):
        for mode in ("train", "infer", "decode"):
            assert f"{variant}/{mode}" in launched_by
    # The state tape's forward (training) and the plain one (inference) are different binaries.
    tiles = [r["constexprs"] for r in rows if r["kernel"] == "_fwd_kernel"]
    assert any("SAVE_ROWS=1" in t for t in tiles) and any("SAVE_ROWS=0" in t for t in tiles)
    # ddl-tc's training both ways: its update backward taking the token read's gradient too.
    backward = [r["constexprs"] for r in rows if r["kernel"] == "_bwd_kernel"]
    assert any("TOKEN_K=4" in t for t in backward) and any("TOKEN_K=0" in t for t in backward)
    assert any("bf16" in r["operands"] for r in rows)  # autocast's bf16 projections reach them
    spilling = [r for r in rows if r["spilled_bytes"]]
    assert not spilling, spilling
    assert all(0 < r["registers"] <= 255 for r in rows)
    # A dense (d, dv) state: each thread loads a channel vector 128 bits at a time, not one
    # 32-bit value per channel (the in-row strides are compile-time constants).
    # (Not the backward that takes a token read's gradient: 16 warps on a 1 x 256 x 4 tile, two
    # values a thread, 64-bit loads, for the registers that let four programs share an SM.)
    token = [r for r in rows if "TOKEN_K=4" in r["constexprs"]]
    assert token and all(r["warps"] == 16 and r["registers"] <= 64 for r in token), token
    narrow = [
        r
        for r in rows
        if "DV=4" in r["constexprs"] and r["wide_load_share"] < 0.5 and r not in token
    ]
    assert not narrow, narrow


@pytest.mark.parametrize(
    "width, channels, variants, expect",
    [
        (200, 2, ["ddl-cc", "ddl-tc"], "DV=2"),
        (96, 8, ["ddl-cc", "write-only-cc"], "DV=8"),
        (2048, 4, ["ddl-cc"], "NUM_CHUNKS=2"),  # a row wider than one tile: the chunked forward
    ],
)
def test_odd_widths_and_value_channels_compile(width, channels, variants, expect):
    shape = dict(hidden_size=width, value_channels=channels, num_heads=2, head_dim=width // 2)
    bench = KernelBench(variants=variants, overrides=shape, dtypes=["bfloat16"])
    rows = kernels_benchmark(bench)
    assert any(expect in r["constexprs"] for r in rows if r["kernel"] == "_fwd_kernel")
    assert not [r for r in rows if r["spilled_bytes"]]


def test_recording_launches_nothing_and_puts_everything_back():
    kernel, chosen = triton_epilogue._fwd_kernel, backend.BACKEND
    X, h = torch.randn(3, 40, 4, requires_grad=True), torch.randn(3, 40, requires_grad=True)
    z, p, C = torch.randn(3), torch.randn(3, 4), torch.randn(40, 4)
    with pytest.raises(ZeroDivisionError), triton_aot.recording() as launches:
        Y, x_next = rewrite_epilogue(
            X, h, z, p, rule="delta", value_head="official", value_scale=4.0, k_eps=1e-5,
            compress=C,
        )  # fmt: skip
        (Y.sum() + x_next.sum()).backward()
        1 / 0  # noqa: B018 -- an error inside still restores the kernels
    assert triton_epilogue._fwd_kernel is kernel
    assert chosen == backend.BACKEND
    assert [launch.name for launch in launches] == ["_fwd_kernel", "_bwd_kernel"]
    assert launches[0].kwargs["COMPRESS"] and launches[0].kwargs["DV"] == 4


def test_a_decoded_token_launches_one_kernel_a_sublayer_its_reads_plain_ops():
    """On the GPU path a token of one sequence takes each sublayer's update as one kernel and its
    token reads (a few hundred elements) as a few plain ops, as the channel read does: a launch
    costs a GPU machine's host more than 100 µs, four small ops about 30."""
    config = DeltaLMConfig.preset("ddl-tc", "tiny", num_layers=2, vocab_size=256)
    model = DeltaLM(config).eval()
    row = config.hidden_size * config.value_channels
    ids = torch.randint(0, 256, (1, _shapes.SMALL_STATE // row + 1))  # a prefill past "small"
    with torch.no_grad(), triton_aot.recording() as launches:
        out = model(ids, use_cache=True)
        prefill = [launch.name for launch in launches]
        launches.clear()
        model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert "_read_fwd_kernel" in prefill
    assert [launch.name for launch in launches] == ["_fwd_kernel"] * 4


def test_a_kernel_that_does_not_compile_is_named():
    from deltalearn.bench.kernels import _compile_row

    config = KernelBench(variants=["ddl"]).config("ddl")
    launch = model_launches(config, 1, 4, torch.float32, "infer")[0]
    launch.kwargs["BLOCK_D"] = 100  # tl.arange needs a power of two
    with pytest.raises(RuntimeError, match=r"_fwd_kernel \(float32\) does not compile for sm_90"):
        _compile_row(launch, 90, "float32")


def test_bench_kernels_command(tmp_path):
    path = tmp_path / "kernels.json"
    argv = ["bench", "kernels", "--variants", "ddl", "--modes", "infer", "--dtypes", "float32"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main([*argv, "--json", str(path)]) == 0
    text = out.getvalue()
    assert "compiled for sm_90" in text and "0 spilling registers" in text
    report = json.loads(path.read_text())
    assert report["benchmark"] == "kernels" and report["settings"]["arch"] == 90
    assert [r["kernel"] for r in report["rows"]] == ["_fwd_kernel"]
    assert report["rows"][0]["used_by"] == "ddl/infer"


def test_bench_kernels_bad_settings_are_one_line_errors(capsys):
    assert cli_main(["bench", "kernels", "--modes", "train,fly"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltalearn: error: ") and "fly" in err and "\n" not in err


def test_bench_kernels_refuses_the_interpreter(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli_main(["bench", "kernels", "--variants", "ddl"]) == 2
    err = capsys.readouterr().err.strip()
    assert "TRITON_INTERPRET" in err and "\n" not in err
