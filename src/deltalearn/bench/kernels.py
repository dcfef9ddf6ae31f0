"""`deltalearn bench kernels`: the Triton kernels the DDL variants launch, compiled for a CUDA GPU on
this machine (no GPU needed), with the resources each takes.

Each variant's model (one block: every block launches the same kernels) runs a training step, a
full-sequence forward and one decoded token on CPU tensors with the Triton kernels recorded instead
of launched (`ops.triton_aot`); each distinct launch is compiled for `sm_<arch>` as Triton would
compile it on that GPU, and its registers a thread, spilled bytes (local memory) and shared memory
are reported. A kernel that does not compile fails the command, naming the launch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from deltalearn.bench.model import ModelBench, build_config
from deltalearn.bench.timing import format_table, settings_report, size_text
from deltalearn.errors import ConfigError

MODES = ("train", "infer", "decode")
DEFAULT_VARIANTS = ("ddl", "ddl-cc", "ddl-tc", "write-only-cc", "write-only")


@dataclass
class KernelBench:
    """The settings of one `bench kernels` run (every field is a command-line option)."""

    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    size: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16", "float32"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    batch: int = 2
    seq: int = 16
    arch: int = 90

    def check(self) -> None:
        for name, values, allowed in (
            ("--dtypes", self.dtypes, ("bfloat16", "float32", "float16")),
            ("--modes", self.modes, MODES),
        ):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ConfigError(f"{name} takes {', '.join(allowed)}; got {bad or values}")
        for name in ("batch", "seq", "arch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be an integer >= 1, got {value!r}")
        for variant in self.variants:
            self.config(variant)

    def config(self, variant: str):
        """The variant's config with one block and a small vocabulary: the kernels a model
        launches depend on its width and value channels, not on its depth or vocabulary."""
        shape = {"num_layers": 1, "vocab_size": 512, **self.overrides}
        return build_config(ModelBench(size=self.size, overrides=shape), variant)


def model_launches(
    config, batch: int, seq: int, dtype: torch.dtype, mode: str, device: str = "cpu",
    interpreted: bool = False,
) -> list:  # fmt: skip
    """Every Triton kernel call one `mode` of a DeltaLM of `config` makes on inputs `(batch, seq)`
    under autocast to `dtype` (none for float32), recorded, not launched (`ops.triton_aot`); the
    model and its inputs on `device` (recorded on a GPU, the arguments are tensors a kernel can be
    launched on). `interpreted`: kernels Triton's interpreter runs are recorded too."""
    from deltalearn import DeltaLM
    from deltalearn.ops import triton_aot

    torch.manual_seed(0)
    model = DeltaLM(config).to(device)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator())
    ids = ids.to(device)
    autocast = (
        torch.autocast(torch.device(device).type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    with triton_aot.recording(interpreted=interpreted) as launches, autocast:
        if mode == "train":
            model.train()
            model(ids, labels=ids).loss.backward()
        else:
            model.eval()
            with torch.no_grad():
                out = model(ids, use_cache=mode == "decode")
                if mode == "decode":  # the prefill's launches are those of "infer": only the token
                    del launches[:]
                    model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    return launches


def kernels_benchmark(bench: KernelBench) -> list[dict[str, object]]:
    """One row per distinct compiled kernel: where it is launched and what it takes."""
    from deltalearn.ops import triton_aot

    bench.check()
    found: dict[tuple, dict[str, object]] = {}
    for variant in bench.variants:
        config = bench.config(variant)
        for dtype_name in bench.dtypes:
            for mode in bench.modes:
                launches = []
                for token_reads in _token_read_settings(config, mode):
                    with _fused_token_read(token_reads):
                        launches += model_launches(
                            config, bench.batch, bench.seq, getattr(torch, dtype_name), mode
                        )
                for launch in launches:  # one row per binary: keyed as Triton caches them
                    key = triton_aot.launch_key(launch, bench.arch)
                    row = found.get(key)
                    if row is None:
                        row = found[key] = _compile_row(launch, bench.arch, dtype_name)
                    if f"{variant}/{mode}" not in row["used_by"]:
                        row["used_by"].append(f"{variant}/{mode}")
    rows = list(found.values())
    for row in rows:
        row["used_by"] = ", ".join(row["used_by"])
    return rows


def _token_read_settings(config, mode: str) -> tuple[str | None, ...]:
    """The fused token read's settings a mode is recorded with: a TC model's training step both
    ways (`DELTALEARN_FUSED_TOKEN_READ`: its update kernel then takes the read's gradient), else
    as the environment has it."""
    if mode == "train" and config.expanded and config.compressor == "tc":
        return ("off", "on")
    return (None,)


@contextlib.contextmanager
def _fused_token_read(setting: str | None):
    from deltalearn.ops import epilogue

    before = epilogue.FUSED_TOKEN_READ
    if setting is not None:
        epilogue.FUSED_TOKEN_READ = setting
    try:
        yield
    finally:
        epilogue.FUSED_TOKEN_READ = before


def _operand_types(pointers: dict[str, str]) -> str:
    """`{"X": "fp32", "H": "bf16", "Y": "fp32"}` -> "X,Y fp32; H bf16" (placeholders included)."""
    by_type: dict[str, list[str]] = {}
    for name, element in pointers.items():
        by_type.setdefault(element, []).append(name)
    return "; ".join(f"{','.join(names)} {element}" for element, names in by_type.items())


def _compile_row(launch, arch: int, dtype_name: str) -> dict[str, object]:
    from deltalearn.ops import triton_aot

    try:
        compiled = triton_aot.compile_launch(launch, arch)
    except Exception as e:  # what Triton raises varies (CompilationError, RuntimeError, ...)
        raise RuntimeError(
            f"{launch.name} ({dtype_name}) does not compile for sm_{arch}: {e}"
        ) from e
    shown = (
        "DV", "BLOCK_M", "BLOCK_T", "BLOCK_D", "NUM_CHUNKS", "K", "COMPRESS", "SAVE_ROWS", "TOKEN_K"
    )  # fmt: skip
    return {
        "kernel": compiled.name,
        "autocast": dtype_name,
        "operands": _operand_types(compiled.pointers),
        "constexprs": " ".join(
            f"{k}={int(v) if isinstance(v, bool) else v}"
            for k, v in compiled.constexprs.items()
            if k in shown
        ),
        "registers": compiled.registers,
        "spilled_bytes": compiled.local_bytes,
        "shared_bytes": compiled.shared_bytes,
        "warps": compiled.num_warps,
        "wide_load_share": round(compiled.wide_load_share, 3),
        "used_by": [],
    }


def kernels_report(bench: KernelBench, rows: list[dict[str, object]]) -> dict[str, object]:
    return settings_report("kernels", torch.device("cpu"), bench, rows)


def format_kernels_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    spills = sum(1 for r in report["rows"] if r["spilled_bytes"])
    head = [
        f"Triton kernels compiled for sm_{s['arch']} on {report['machine']} (no GPU needed), "
        f"triton {_triton_version()}, {report['date']}",
        f"{size_text(s)}, one block, batch {s['batch']} × "
        f"{s['seq']} tokens; {len(report['rows'])} distinct kernels, {spills} spilling registers",
    ]
    columns = {
        "kernel": "kernel",
        "autocast": "first seen under",
        "operands": "operands",
        "constexprs": "tile",
        "registers": "regs/thread",
        "spilled_bytes": "spilled B",
        "shared_bytes": "shared B",
        "warps": "warps",
        "wide_load_share": "128-bit loads",
        "used_by": "launched by",
    }
    return "\n".join([*head, format_table(report["rows"], columns)])


def _triton_version() -> str:
    import triton

    return triton.__version__
