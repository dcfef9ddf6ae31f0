"""The tile sweep of the update kernels (`deltalearn.bench.kernel_tiles`,
`benchmarks/kernel_tiles.py`): its candidate settings launch the recorded training calls again
with a consistent grid, compile for sm_90 on this CPU, and, run by Triton's interpreter, write what
the default setting writes; a relaunch that drops rows is caught by that check.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from triton import knobs  # noqa: E402
from triton_interpreter import (  # noqa: E402
    IN_INTERPRETER,
    require_interpreter,
    run_kernel_tests_in_child,
    skip_in_child_unless_interpreted,
)

from deltalearn.bench import kernel_tiles as kt  # noqa: E402
from deltalearn.bench.kernels import model_launches  # noqa: E402
from deltalearn.errors import ConfigError  # noqa: E402
from deltalearn.ops import _shapes as shapes  # noqa: E402
from deltalearn.ops import triton_aot  # noqa: E402
from deltalearn.ops import triton_epilogue as te  # noqa: E402
from deltalearn.ops import triton_mixing as tm  # noqa: E402


@pytest.fixture(autouse=True)
def _child_runs_kernel_tests_only(request):
    skip_in_child_unless_interpreted(request)


@pytest.fixture
def interpreted():
    require_interpreter()


def test_kernels_under_the_interpreter():
    run_kernel_tests_in_child(__file__, min_passed=3)


@pytest.fixture(autouse=True)
def _token_reads_apart(monkeypatch):
    """The sweep on the launches of ddl-tc's token reads apart: the machinery is the same, and the
    fused token read's backward adds a dozen candidates to compile and run here (it compiles in
    tests/test_triton_aot.py and runs in tests/test_ops_epilogue.py)."""
    monkeypatch.setenv("DELTALEARN_FUSED_TOKEN_READ", "off")


def _bench(**changes) -> kt.TileSweep:
    # 144 tokens: a tiny TC state over 2**16 elements, which the reads take to their kernels
    fields = dict(variants=["ddl-cc"], size="tiny", batch=2, seq=72, layers=1, device="cpu")
    return kt.TileSweep(**{**fields, **changes})


def _launches(variant: str, interpreted: bool = False, **changes) -> list:
    bench = _bench(variants=[variant], **changes)
    return model_launches(
        bench.config(variant), bench.batch, bench.seq, torch.bfloat16, "train",
        interpreted=interpreted,
    )  # fmt: skip


def _one_warp_count(monkeypatch) -> None:
    """The sweep's candidates with 8 warps only: its tiles (fewer kernels to compile or run)."""
    tilings = {name: dataclasses.replace(t, warp_options=(8,)) for name, t in kt.TILINGS.items()}
    monkeypatch.setattr(kt, "TILINGS", tilings)


def _small_states_take_the_kernels(monkeypatch) -> None:
    """Reads of any state launch their kernels (a small one takes plain ops): the interpreter then
    runs the sweep on a few tokens instead of the 144 that reach the threshold."""
    monkeypatch.setattr(shapes, "SMALL_STATE", 0)


def _first(launches, name: str):
    return next(launch for launch in launches if launch.name == name)


def _recorded(variant: str, kernel: str):
    """A variant's recorded launches, the first of `kernel`, its arguments and its candidates."""
    launches = _launches(variant)
    launch = _first(launches, kernel)
    return launches, launch, kt.arguments(launch), kt.candidate_settings(launch)


@pytest.mark.skipif(IN_INTERPRETER, reason="records compilable kernels")
def test_candidates_start_with_the_models_setting_and_cover_every_row():
    launches, backward, args, settings = _recorded("ddl-cc", "_bwd_kernel")
    default = settings[0]
    assert default == kt.Setting(
        args["BLOCK_M"], args["BLOCK_D"], args["num_warps"], te.PROGRAMS_PER_SM
    )
    assert len(set(settings)) == len(settings) > 10
    for setting in settings:
        tile = setting.block_m * setting.block_d * args["BLOCK_V"]
        tiling = kt.TILINGS["_bwd_kernel"]
        assert tile <= tiling.max_tile and setting.num_warps in tiling.warp_options
        for multiprocessors in (1, 3, 132):
            (programs,), relaunched = kt.relaunch_arguments(backward, setting, multiprocessors)
            rows_walked = programs * relaunched["iters"] * setting.block_m
            assert rows_walked >= args["n_rows"] > (programs - 1) * setting.block_m
            assert relaunched["PART"].shape == (programs, args["part_stride"])
            assert relaunched["NUM_CHUNKS"] * setting.block_d >= args["d"]
    forward = _first(launches, "_fwd_kernel")
    (blocks,), relaunched = kt.relaunch_arguments(forward, kt.candidate_settings(forward)[-1], 1)
    assert blocks * relaunched["BLOCK_M"] >= args["n_rows"]
    with pytest.raises(ValueError, match="_read_bwd_kernel; got _rebuild_kernel"):
        kt.candidate_settings(triton_aot.Launch(te._rebuild_kernel, (), {}))


@pytest.mark.skipif(IN_INTERPRETER, reason="records compilable kernels")
def test_a_token_reads_candidates_cover_every_token_and_feature():
    launches, backward, args, settings = _recorded("ddl-tc", "_read_bwd_kernel")
    assert settings[0].programs_per_sm == tm.PROGRAMS_PER_SM and len(settings) > 5
    batch, d = args["XS"].shape[0], args["d"]
    for setting in settings:
        for multiprocessors in (1, 3, 132):
            (programs, columns), relaunched = kt.relaunch_arguments(
                backward, setting, multiprocessors
            )
            blocks = relaunched["n_blocks"]
            assert blocks == batch * -(-args["S"] // setting.block_m)
            assert programs * relaunched["iters"] >= blocks > programs - 1
            assert columns * setting.block_d >= d > (columns - 1) * setting.block_d
            assert relaunched["GW"].shape == (programs, d, args["DV"], args["K"])
    forward = _first(launches, "_read_fwd_kernel")
    for setting in kt.candidate_settings(forward):
        (blocks, columns), relaunched = kt.relaunch_arguments(forward, setting, 1)
        assert blocks == batch * relaunched["n_tblocks"]
        assert relaunched["n_tblocks"] * setting.block_m >= args["T"]


def test_programs_resident_follow_the_multiprocessors_limits():
    assert kt.programs_resident(123, 8, 1024) == 2  # 128 registers a thread: 32k a program
    assert kt.programs_resident(32, 8, 1024) == 8  # 64 warps an SM
    assert kt.programs_resident(32, 1, 0) == 32  # 32 programs an SM
    assert kt.programs_resident(16, 4, 100 * 1024) == 2  # shared memory


def test_touched_bytes_count_each_tensor_once_and_a_broadcast_by_its_storage():
    state = torch.zeros(4, 8, 2)
    args = {"X": state, "XO": state, "G": torch.zeros(()).expand(4, 8, 2), "n_rows": 4,
            "PART": torch.zeros(100), "H": torch.zeros(4, 8, dtype=torch.bfloat16)}  # fmt: skip
    assert kt.touched_bytes(args) == 4 * 8 * 2 * 4 + 4 + 4 * 8 * 2


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="--kernels takes"):
        _bench(kernels=["_rebuild_kernel"]).check()
    with pytest.raises(ConfigError, match="--rep-ms must be an integer >= 1, got 0"):
        _bench(rep_ms=0).check()


@pytest.mark.skipif(IN_INTERPRETER, reason="interpreted kernels do not compile for a GPU")
@pytest.mark.skipif(not knobs.nvidia.cuobjdump.path, reason="this triton build ships no cuobjdump")
def test_candidates_compile_for_sm90_without_spilling(monkeypatch):
    _one_warp_count(monkeypatch)
    rows = kt.sweep(_bench(variants=["ddl-cc", "ddl-tc"]))
    kinds = {(r["kernel"], r["flags"]) for r in rows}
    assert {k for k, _ in kinds} == set(kt.SWEPT)
    assert all(r["registers"] > 0 and r["spilled_bytes"] == 0 for r in rows)
    assert all(1 <= r["resident"] <= kt.SM_PROGRAMS for r in rows)
    assert all("check" not in r and "us" not in r for r in rows)  # compiled, not run
    assert sum(r["default"] for r in rows) == len(kinds)


def test_every_setting_writes_what_the_default_does(interpreted, monkeypatch):
    # One SM: a reducing backward's programs each walk several row blocks.
    _one_warp_count(monkeypatch)
    _small_states_take_the_kernels(monkeypatch)
    updates = kt.sweep(_bench(seq=16, kernels=["_fwd_kernel", "_bwd_kernel"], multiprocessors=1))
    # 20 tokens: the widest token tile (16) leaves a ragged second block
    reads = kt.sweep(
        _bench(
            variants=["ddl-tc"],
            seq=20,
            kernels=["_read_fwd_kernel", "_read_bwd_kernel"],
            multiprocessors=1,
        )
    )
    rows = updates + reads
    assert {r["kernel"] for r in rows} == set(kt.SWEPT)
    assert len(rows) > 20 and all(r["check"] == "ok" for r in rows)


def test_a_relaunch_that_skips_rows_is_caught(interpreted, monkeypatch):
    launches = _launches("ddl-cc", interpreted=True, seq=16)
    backward = _first(launches, "_bwd_kernel")
    runner = kt.Runner(backward, multiprocessors=1)
    setting = kt.candidate_settings(backward)[1]
    assert runner.check(setting) == "ok"
    relaunch = kt.relaunch_arguments

    def short_by_one_block(launch, setting, multiprocessors):
        grid, args = relaunch(launch, setting, multiprocessors)
        args["n_rows"] -= setting.block_m
        return grid, args

    monkeypatch.setattr(kt, "relaunch_arguments", short_by_one_block)
    assert runner.check(setting).startswith("tensor ")


def test_on_a_gpu_the_fastest_tiles_are_tried_with_other_grids(interpreted, monkeypatch):
    """The GPU's branch of the sweep, its timer and binary stood in for: every candidate is
    timed, the three fastest tiles get each count of programs a multiprocessor, and each row's
    speed is given against the default's."""
    _one_warp_count(monkeypatch)
    monkeypatch.setattr(kt, "_timed", lambda bench: True)

    def fake_time(runner, setting, rep_ms):  # wider tiles, more programs, carried sums: faster
        area = setting.block_m * setting.block_d * (setting.programs_per_sm or 1)
        tiebreak = 1 + setting.num_warps / 1e3 + setting.block_d / 1e6  # no two alike
        return 1000.0 / area * (0.9 if setting.carry else 1.0) / tiebreak

    monkeypatch.setattr(kt, "time_setting", fake_time)
    resources = {"registers": 40, "spilled_bytes": 0, "shared_bytes": 0, "resident": 6}
    monkeypatch.setattr(kt.Runner, "resources", lambda self: resources)
    monkeypatch.setattr(kt.Runner, "check", lambda self, setting: "ok")  # run by the test above
    backwards = ["_bwd_kernel", "_read_bwd_kernel"]
    rows = kt.sweep(_bench(variants=["ddl-cc", "ddl-tc"], kernels=backwards, multiprocessors=1))
    assert {r["kernel"] for r in rows} == set(backwards)

    def kind(r):
        return r["kernel"], r["flags"], r["launched_by"]

    assert any(r["carry"] for r in rows)
    for each in {kind(r) for r in rows}:
        mine = [r for r in rows if kind(r) == each]
        first = [r for r in mine if r["programs_per_sm"] == 4]  # the wrappers' default

        def tile(r):
            return r["block_m"], r["block_d"], r["num_warps"], r["carry"]

        for best in sorted(first, key=lambda r: r["us"])[:3]:
            got = {r["programs_per_sm"] for r in mine if tile(r) == tile(best)}
            assert got == set(kt.PROGRAMS_PER_SM)
        default = next(r for r in mine if r["default"])
        fastest = [r for r in mine if r["fastest"]]
        assert default["x_default"] == 1.0 and len(fastest) == 1
        assert fastest[0]["programs_per_sm"] == max(kt.PROGRAMS_PER_SM)
        assert fastest[0]["carry"] == (fastest[0]["kernel"] == "_bwd_kernel")
        assert all(r["check"] == "ok" and r["gb_per_s"] > 0 for r in mine)
