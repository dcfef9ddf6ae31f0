"""Tile settings of the Triton kernels on DDL's state, tried on the very calls a training step makes.

One training step of each variant runs with the kernels recorded (`ops.triton_aot`); each distinct
launch of the update (`_fwd_kernel`, `_bwd_kernel`) and of the compressor reads (`_read_fwd_kernel`,
`_read_bwd_kernel`) is then launched again under candidate settings: the rows (or tokens) and
columns of a tile, the warps, whether a backward carries its partial sums in registers, and, for a
backward that sums weight gradients a program, its programs a multiprocessor.

- Anywhere (no GPU needed): each candidate is compiled for `sm_<arch>`, and its registers, spilled
  bytes and the programs one multiprocessor holds at once are reported.
- Where the recorded kernels can run (CUDA, or Triton's interpreter on CPU tensors): each candidate
  runs on random inputs and every tensor it writes is checked against the default setting's
  (within round-off; the partial sums by their total). On CUDA each is also timed alone, its
  launches replayed as a CUDA graph (`triton.testing.do_bench_cudagraph`: no host in the time),
  against the bytes of the distinct tensors it touches (each read or written once: the floor).

The default setting is what the model launches today; `benchmarks/kernel_tiles.py` prints the table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from deltalearn.bench.model import ModelBench, build_config
from deltalearn.errors import ConfigError
from deltalearn.ops._shapes import cdiv, next_pow2

# sm_90 (H100/H200): registers, resident warps and programs, shared memory of one multiprocessor.
SM_REGISTERS = 65536
SM_WARPS = 64
SM_PROGRAMS = 32
SM_SHARED_BYTES = 228 * 1024
H200_MULTIPROCESSORS = 132
PROGRAMS_PER_SM = (1, 2, 3, 4, 6, 8, 16)


@dataclass(frozen=True)
class Tiling:
    """What a kernel's tile settings are and which are tried."""

    rows: str  # the constexpr of the tile's rows (tokens for a read)
    row_options: tuple[int, ...]
    warp_options: tuple[int, ...]
    max_tile: int  # elements, BLOCK_V included
    partial: str | None = None  # the per-program partial-sum buffer of a reducing launch
    columns_of_row: bool = True  # columns tried: the row's and halves (else 32-256)


TILINGS = {
    "_fwd_kernel": Tiling("BLOCK_M", (1, 2, 4), (4, 8, 16), 8192),
    "_bwd_kernel": Tiling("BLOCK_M", (1, 2, 4), (4, 8, 16), 4096, partial="PART"),
    "_read_fwd_kernel": Tiling("BLOCK_T", (2, 4, 8, 16), (4, 8), 4096, columns_of_row=False),
    "_read_bwd_kernel": Tiling(
        "BLOCK_T", (2, 4, 8, 16), (4, 8), 4096, partial="GW", columns_of_row=False
    ),
}
SWEPT = tuple(TILINGS)
PARTIALS = {t.partial for t in TILINGS.values() if t.partial}


@dataclass(frozen=True)
class Setting:
    """How one launch is tiled: rows × columns a tile, warps, and a reducing backward's grid."""

    block_m: int  # rows (BLOCK_M) or tokens (BLOCK_T) a tile
    block_d: int
    num_warps: int
    programs_per_sm: int | None = None  # None: one program a row block
    carry: bool = False  # an update backward's partial sums held in registers (CARRY_SUMS)

    def text(self) -> str:
        grid = f", {self.programs_per_sm}/SM" if self.programs_per_sm else ""
        carry = ", sums carried" if self.carry else ""
        return f"{self.block_m}×{self.block_d}, {self.num_warps} warps{grid}{carry}"


def arguments(launch) -> dict[str, Any]:
    """A recorded launch's arguments by parameter name (`num_warps` among them)."""
    return {**dict(zip(launch.kernel.arg_names, launch.args, strict=False)), **launch.kwargs}


def _tiling(launch) -> Tiling:
    try:
        return TILINGS[launch.name]
    except KeyError:
        raise ValueError(
            f"tile settings are swept for {', '.join(SWEPT)}; got {launch.name}"
        ) from None


def _reduces(launch, args: dict[str, Any]) -> bool:
    """Whether a launch sums per-program partials (∂C, the projections' weights, ∂W of a read)."""
    if launch.name == "_bwd_kernel":
        return bool(args["COMPRESS"] or args["PROJECT"])
    return launch.name == "_read_bwd_kernel" and bool(args["REDUCE_W"])


def default_setting(launch) -> Setting:
    """The setting the model's wrappers chose for `launch` (Triton's 4 warps where none given)."""
    from deltalearn.ops import triton_epilogue, triton_mixing

    args = arguments(launch)
    per_sm = None
    if _reduces(launch, args):
        owner = triton_epilogue if launch.name == "_bwd_kernel" else triton_mixing
        per_sm = owner.PROGRAMS_PER_SM
    rows = args[_tiling(launch).rows]
    carry = bool(args.get("CARRY_SUMS", False))
    return Setting(rows, args["BLOCK_D"], args.get("num_warps", 4), per_sm, carry)


def _columns(tiling: Tiling, d: int) -> list[int]:
    full = next_pow2(d)
    if tiling.columns_of_row:
        return [full >> i for i in range(3) if full >> i >= 16]
    return sorted({min(full, c) for c in (32, 64, 128, 256)}, reverse=True)


def candidate_settings(launch) -> list[Setting]:
    """The default first, then every tile of 256 elements up to the kernel's largest with each
    candidate warp count: an update's columns a power of two down to a quarter of the row's
    (at least 16), a read's 32-256; an update backward's tiles that hold a whole row that sums
    partials also with their sums carried."""
    tiling = _tiling(launch)
    args = arguments(launch)
    default = default_setting(launch)
    found = [default]
    for block_d in _columns(tiling, args["d"]):
        for rows in tiling.row_options:
            if not 256 <= rows * block_d * args["BLOCK_V"] <= tiling.max_tile:
                continue
            carries = [False]
            if launch.name == "_bwd_kernel" and default.programs_per_sm and block_d >= args["d"]:
                carries.append(True)
            for num_warps in tiling.warp_options:
                for carry in carries:
                    setting = Setting(rows, block_d, num_warps, default.programs_per_sm, carry)
                    if setting not in found:
                        found.append(setting)
    return found


def with_programs(setting: Setting, per_sm: Iterable[int] = PROGRAMS_PER_SM) -> list[Setting]:
    """`setting` with each count of programs a multiprocessor (a reducing backward's grid)."""
    return [dataclasses.replace(setting, programs_per_sm=n) for n in per_sm]


def relaunch_arguments(
    launch, setting: Setting, multiprocessors: int
) -> tuple[tuple[int, ...], dict[str, Any]]:
    """`(grid, arguments)` that launch `launch`'s kernel on its own tensors under `setting`, as
    its wrapper would: the chunks follow the columns; a reducing launch gets a fresh partial-sum
    buffer with a row a program and the row blocks each program walks."""
    tiling = _tiling(launch)
    args = arguments(launch)
    reduces = _reduces(launch, args)
    if setting.programs_per_sm is not None and not reduces:
        raise ValueError(f"{setting.text()}: programs a multiprocessor apply to a reducing launch")
    d = args["d"]
    args.update({tiling.rows: setting.block_m, "BLOCK_D": setting.block_d})
    args["num_warps"] = setting.num_warps
    if launch.name == "_fwd_kernel":
        args["NUM_CHUNKS"] = cdiv(d, setting.block_d)
        return (cdiv(args["n_rows"], setting.block_m),), args
    if launch.name == "_read_fwd_kernel":
        args["n_tblocks"] = cdiv(args["T"], setting.block_m)
        return (args["XS"].shape[0] * args["n_tblocks"], cdiv(d, setting.block_d)), args
    columns = 1
    if launch.name == "_bwd_kernel":
        args["NUM_CHUNKS"] = cdiv(d, setting.block_d)
        if setting.carry and (args["NUM_CHUNKS"] != 1 or not reduces):
            raise ValueError(
                f"{setting.text()}: sums are carried by a reducing backward in one chunk"
            )
        args["CARRY_SUMS"] = setting.carry
        num_blocks = cdiv(args["n_rows"], setting.block_m)
        shape: tuple[int, ...] = (args["part_stride"],)
    else:  # _read_bwd_kernel
        args["n_sblocks"] = cdiv(args["S"], setting.block_m)
        num_blocks = args["n_blocks"] = args["XS"].shape[0] * args["n_sblocks"]
        columns = cdiv(d, setting.block_d)
        shape = (d, args["DV"], args["K"])
    programs = num_blocks
    if setting.programs_per_sm is not None:
        programs = max(1, min(num_blocks, setting.programs_per_sm * multiprocessors // columns))
        part = args[tiling.partial]  # zeros: the padding a kernel leaves unwritten stays 0
        args[tiling.partial] = part.new_zeros((programs, *shape), dtype=torch.float32)
    args["iters"] = cdiv(num_blocks, programs)
    return (programs, columns) if launch.name == "_read_bwd_kernel" else (programs,), args


def programs_resident(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Programs of this size one sm_90 multiprocessor holds at once: registers (allocated per warp
    in units of 256, a thread's rounded up to 8), warps, programs and shared memory (1 KB of it
    reserved a program)."""
    per_thread = 8 * math.ceil(max(registers, 1) / 8)
    per_warp = 256 * math.ceil(per_thread * 32 / 256)
    return min(
        SM_REGISTERS // (per_warp * num_warps),
        SM_WARPS // num_warps,
        SM_PROGRAMS,
        SM_SHARED_BYTES // (shared_bytes + 1024),
    )


def touched_tensors(args: dict[str, Any]) -> list[torch.Tensor]:
    """The distinct tensors a launch reads or writes (placeholders alias a real one), without the
    partial-sum buffer, whose size is the grid's, not the data's."""
    seen: dict[int, torch.Tensor] = {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor) and name not in PARTIALS:
            seen.setdefault(value.data_ptr(), value)
    return list(seen.values())


def touched_bytes(args: dict[str, Any]) -> int:
    """Bytes of the distinct tensors a launch touches, each once (a broadcast read counts its
    storage): what it must move at least."""
    return sum(
        min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
        for t in touched_tensors(args)
    )


def compile_setting(launch, setting: Setting, arch: int, multiprocessors: int) -> dict[str, int]:
    """Registers a thread, spilled bytes, shared bytes and programs resident an SM, compiled for
    `sm_<arch>` as Triton would on the GPU."""
    from deltalearn.ops import triton_aot

    grid, args = relaunch_arguments(launch, setting, multiprocessors)
    compiled = triton_aot.compile_launch(triton_aot.Launch(launch.kernel, (), args, grid), arch)
    return {
        "registers": compiled.registers,
        "spilled_bytes": compiled.local_bytes,
        "shared_bytes": compiled.shared_bytes,
        "resident": programs_resident(
            compiled.registers, compiled.num_warps, compiled.shared_bytes
        ),
    }


class Runner:
    """Runs one recorded launch under settings on random inputs it restores before each run, and
    compares what a setting wrote with the default setting's."""

    def __init__(self, launch, multiprocessors: int, seed: int = 0) -> None:
        self.launch, self.multiprocessors = launch, multiprocessors
        # The model's weights among them (detached); a broadcast (stride 0) input is read only.
        touched = touched_tensors(arguments(launch))
        self.tensors = [t.detach() for t in touched if _own_elements(t)]
        gen = torch.Generator(device=self.tensors[0].device).manual_seed(seed)
        for t in self.tensors:
            t.copy_(torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype))
        self.initial = [t.clone() for t in self.tensors]
        self.reference: tuple[list[torch.Tensor], torch.Tensor | None] | None = None
        self.compiled: Any = None

    def launcher(self, setting: Setting) -> tuple[Callable[[], None], torch.Tensor | None]:
        """A call that launches the kernel under `setting`, and its partial-sum buffer (None
        where the launch sums none)."""
        grid, args = relaunch_arguments(self.launch, setting, self.multiprocessors)
        kernel = self.launch.kernel

        def launch() -> Any:
            return kernel[grid](**args)

        partial = _tiling(self.launch).partial
        return launch, (args[partial] if setting.programs_per_sm else None)

    def run(self, setting: Setting) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Every touched tensor after one launch under `setting`, and the partial sums' total;
        `compiled` is the binary the launch ran (None under the interpreter)."""
        for t, start in zip(self.tensors, self.initial, strict=True):
            t.copy_(start)
        launch, part = self.launcher(setting)
        self.compiled = launch()
        return [t.clone() for t in self.tensors], (part.sum(0) if part is not None else None)

    def resources(self) -> dict[str, int]:
        """What the last launch's binary takes, as `compile_setting` reports it."""
        compiled = self.compiled
        shared = compiled.metadata.shared
        warps = compiled.metadata.num_warps
        return {
            "registers": compiled.n_regs,
            "spilled_bytes": 4 * compiled.n_spills,  # triton counts local memory in 4-byte words
            "shared_bytes": shared,
            "resident": programs_resident(compiled.n_regs, warps, shared),
        }

    def check(self, setting: Setting) -> str:
        """ "ok", or what differs from the default setting's results beyond round-off."""
        if self.reference is None:
            self.reference = self.run(default_setting(self.launch))
        outputs, part = self.run(setting)
        expected, expected_part = self.reference
        pairs = list(zip(outputs, expected, strict=True))
        if part is not None and expected_part is not None:
            pairs.append((part, expected_part))
        for i, (actual, wanted) in enumerate(pairs):
            if not torch.allclose(actual.float(), wanted.float(), *_tolerances(wanted)):
                gap = (actual.float() - wanted.float()).abs().max().item()
                return f"tensor {i} {tuple(wanted.shape)} differs by {gap:.3g}"
        return "ok"


def _own_elements(t: torch.Tensor) -> bool:
    """Whether every element of `t` has memory of its own (no broadcast axis)."""
    return all(stride != 0 or size <= 1 for size, stride in zip(t.shape, t.stride(), strict=True))


def _tolerances(t: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol): another summation order in fp32, or a last-bit flip in a 16-bit output."""
    scale = max(t.float().abs().max().item(), 1.0)
    rel = 1e-4 if t.dtype == torch.float32 else 2.0**-7
    return rel, rel * scale


def time_setting(runner: Runner, setting: Setting, rep_ms: int) -> float:
    """Median microseconds of one launch under `setting`, replayed as a CUDA graph."""
    import triton.testing

    launch, _ = runner.launcher(setting)
    return 1000.0 * triton.testing.do_bench_cudagraph(launch, rep=rep_ms, return_mode="median")


def launch_key(launch) -> tuple:
    """Equal for two launches of the same kernel with the same settings and tensor dtypes."""
    args = arguments(launch)
    fixed = tuple(sorted((k, v) for k, v in args.items() if k.isupper() and not _is_tensor(v)))
    dtypes = tuple((k, str(v.dtype)) for k, v in args.items() if _is_tensor(v) and k.isupper())
    return launch.name, fixed, dtypes


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def distinct_launches(launches: Iterable, kernels: Iterable[str] = SWEPT) -> list[tuple[Any, int]]:
    """`(launch, count)`: the first launch of each distinct kind among `kernels`, and how many of
    its kind the step made."""
    wanted = set(kernels)
    found: dict[tuple, list] = {}
    for launch in launches:
        if launch.name in wanted:
            found.setdefault(launch_key(launch), [launch, 0])[1] += 1
    return [(launch, count) for launch, count in found.values()]


# The switches that mostly tell one launch kind of a training step from another.
SHOWN_FLAGS = (
    "COMPRESS", "SAVE_ROWS", "REBUILD", "X_DENSE", "G_DENSE", "XS_DENSE", "WRITE_GX", "REDUCE_W"
)  # fmt: skip


def flags_text(launch) -> str:
    """A launch kind in a few words, e.g. "d=768 DV=4 COMPRESS REBUILD G_DENSE"; an update
    backward that takes a token read's gradient "TOKEN_K=4"."""
    args = arguments(launch)
    on = [k for k in SHOWN_FLAGS if args.get(k) is True]
    taps = [f"K={args['K']}"] if "K" in args else []
    token = [f"TOKEN_K={args['TOKEN_K']}"] if args.get("TOKEN_K") else []
    return " ".join([f"d={args['d']} DV={args['DV']}", *taps, *on, *token])


@dataclass
class TileSweep:
    """The settings of one sweep (every field is an option of `benchmarks/kernel_tiles.py`)."""

    variants: list[str] = field(default_factory=lambda: ["ddl", "ddl-cc", "ddl-tc"])
    size: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "bfloat16"
    batch: int = 8
    seq: int = 1024
    layers: int = 2  # the first and last blocks' launches differ from a middle one's
    kernels: list[str] = field(default_factory=lambda: list(SWEPT))
    arch: int = 90
    rep_ms: int = 20
    device: str = "cuda"
    multiprocessors: int = H200_MULTIPROCESSORS  # on CUDA: the device's

    def check(self) -> None:
        bad = [k for k in self.kernels if k not in SWEPT]
        if bad or not self.kernels:
            raise ConfigError(f"--kernels takes {', '.join(SWEPT)}; got {bad or self.kernels}")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ConfigError(f"--dtype takes bfloat16, float32, float16; got {self.dtype!r}")
        for name in ("batch", "seq", "layers", "arch", "rep_ms", "multiprocessors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}"
                )

    def config(self, variant: str):
        shape = {"num_layers": self.layers, "vocab_size": 512, **self.overrides}
        return build_config(ModelBench(size=self.size, overrides=shape), variant)


def sweep(bench: TileSweep, emit: Callable[[dict[str, Any]], None] = lambda row: None) -> list:
    """One row per (launch kind, setting), the kinds that move the most bytes a step first;
    `emit` sees each row as it is made (a sweep cut short keeps what it measured). A setting
    whose results differ from the default's fails the sweep, naming it."""
    from deltalearn.bench.kernels import model_launches

    bench.check()
    kinds: dict[tuple, list] = {}
    for variant in bench.variants:
        launches = model_launches(
            bench.config(variant), bench.batch, bench.seq, getattr(torch, bench.dtype), "train",
            device=bench.device, interpreted=True,
        )  # fmt: skip
        for launch, count in distinct_launches(launches, bench.kernels):
            kind = kinds.setdefault(launch_key(launch), [launch, 0, []])
            kind[1] += count
            kind[2].append(variant)
    order = sorted(kinds.values(), key=lambda k: -k[1] * touched_bytes(arguments(k[0])))
    rows = []
    for launch, count, variants in order:
        rows += _sweep_launch(bench, launch, count, variants, emit)
    return rows


def _sweep_launch(bench: TileSweep, launch, count: int, variants: list[str], emit) -> list:
    compilable = _compilable(launch)
    timed = _timed(bench)
    runnable = timed or not compilable  # on a CPU: under the interpreter
    runner = Runner(launch, bench.multiprocessors) if runnable else None
    floor = touched_bytes(arguments(launch))
    default = default_setting(launch)
    rows: list[dict[str, Any]] = []

    def measure(setting: Setting) -> None:
        row: dict[str, Any] = {
            "kernel": launch.name,
            "flags": flags_text(launch),
            "launched_by": ", ".join(variants),
            "launches": count,
            "floor_mb": floor / 1e6,
            "setting": setting.text(),
            "default": setting == default,
            **dataclasses.asdict(setting),
        }
        if compilable and not timed:  # on the GPU, the binary the check ran tells
            row.update(compile_setting(launch, setting, bench.arch, bench.multiprocessors))
        if runner is not None:
            row["check"] = runner.check(setting)
            if row["check"] != "ok":
                raise RuntimeError(f"{launch.name} under {setting.text()}: {row['check']}")
        if timed:
            row.update(runner.resources())
            row["us"] = time_setting(runner, setting, bench.rep_ms)
            row["gb_per_s"] = floor / row["us"] / 1e3
        rows.append(row)
        emit(row)

    for setting in candidate_settings(launch):
        measure(setting)
    if timed and default.programs_per_sm is not None:
        best = sorted(rows, key=lambda r: r["us"])[:3]
        tried = {r["setting"] for r in rows}
        for row in best:
            tile = Setting(row["block_m"], row["block_d"], row["num_warps"], None, row["carry"])
            for setting in with_programs(tile):
                if setting.text() not in tried:
                    tried.add(setting.text())
                    measure(setting)
    if timed:
        base = next(r["us"] for r in rows if r["default"])
        fastest = min(r["us"] for r in rows)
        for row in rows:
            row["x_default"] = base / row["us"]
            row["fastest"] = row["us"] == fastest
    return rows


def _timed(bench: TileSweep) -> bool:
    """Whether the sweep times its launches: on CUDA only (replayed CUDA graphs)."""
    return bench.device == "cuda"


def _compilable(launch) -> bool:
    from triton import knobs
    from triton.runtime.jit import JITFunction

    return isinstance(launch.kernel, JITFunction) and bool(knobs.nvidia.cuobjdump.path)
