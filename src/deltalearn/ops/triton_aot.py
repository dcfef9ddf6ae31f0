"""Compiling deltalearn's Triton kernels for a CUDA GPU on a machine without one.

Triton lowers a kernel to PTX and assembles it with the `ptxas` its wheel ships; neither step needs a
GPU or a driver, only running the kernel does. So the kernels a GPU run would compile can be
compiled anywhere, and a kernel that fails to compile, or spills registers, shows up before a GPU is
ever at hand (the interpreter the kernel tests use runs the same code as NumPy and checks neither).

`recording()` finds the launches: inside it the ops' Triton path runs on whatever tensors it gets
(CPU ones are fine) with every kernel swapped for a recorder, so nothing is launched and the
recorded arguments are exactly those of a real call — dtypes, sizes, strides, the constexprs the
wrappers choose. `compile_launch` compiles one for a target (default sm_90, the H200) with Triton's
own argument specialisation, and reads the kernel's resources back from the binary
(`cuobjdump -res-usage`): registers a thread, bytes of local memory (spilled registers), shared
memory. `tests/test_triton_aot.py` compiles every kernel the paper's variants reach;
`deltalearn bench kernels` prints the table.

The recorded kernels' outputs stay as allocated (uninitialised): record for the launches, never for
the numbers.
"""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from deltalearn.ops import backend, triton_epilogue, triton_mixing

# Every kernel deltalearn launches: (module, attribute).
KERNELS = (
    (triton_epilogue, "_fwd_kernel"),
    (triton_epilogue, "_bwd_kernel"),
    (triton_epilogue, "_rebuild_kernel"),
    (triton_mixing, "_read_fwd_kernel"),
    (triton_mixing, "_read_bwd_kernel"),
)


@dataclass
class Launch:
    """One recorded kernel call: the jitted function and the arguments it was called with."""

    kernel: JITFunction
    args: tuple
    kwargs: dict[str, Any]
    grid: Any = None  # as the wrapper gave it (None where the arguments are not kept)

    @property
    def name(self) -> str:
        return self.kernel.__name__


@dataclass
class CompiledLaunch:
    """What compiling one launch for a target gave: its constexprs and the kernel's resources."""

    name: str
    arch: int
    constexprs: dict[str, Any]
    pointers: dict[str, str]  # each pointer argument's element type, e.g. {"X": "fp32"}
    registers: int  # a thread
    local_bytes: int  # a thread: registers spilled to (slow) local memory; 0 = no spills
    shared_bytes: int
    num_warps: int
    # Of the bits the kernel's global-load instructions fetch, counted over the instructions in
    # its code (not executed), the share fetched 128 bits at a time (`ld.global.v4.b32`).
    wide_load_share: float


class _Recorder:
    """Stands in for a jitted kernel: `kernel[grid](...)` records the call, launches nothing."""

    def __init__(self, kernel: JITFunction, sink: list[Launch], keep_arguments: bool) -> None:
        self.kernel, self.sink, self.keep_arguments = kernel, sink, keep_arguments

    def __getitem__(self, grid):
        def record(*args, **kwargs) -> None:
            if not self.keep_arguments:
                self.sink.append(Launch(self.kernel, (), {}))
            else:
                self.sink.append(Launch(self.kernel, args, kwargs, grid))

        return record


@contextlib.contextmanager
def recording(keep_arguments: bool = True, interpreted: bool = False) -> Iterator[list[Launch]]:
    """Within: the fused ops take their Triton path (`backend.BACKEND = "triton"`) and every kernel
    call is recorded into the yielded list instead of launched. `keep_arguments=False` records
    the kernels only, without the arguments (tensors a record would keep alive: what a memory
    measurement must not see). `interpreted=True` also records kernels Triton's interpreter runs
    (launchable again on CPU tensors, not compilable)."""
    if isinstance(triton_epilogue._fwd_kernel, _Recorder) or not (
        interpreted or isinstance(triton_epilogue._fwd_kernel, JITFunction)
    ):
        raise RuntimeError(
            "the Triton kernels are not compilable here (TRITON_INTERPRET=1 was set before "
            "triton's import, or they are being recorded already)"
        )
    launches: list[Launch] = []
    originals = [(module, name, getattr(module, name)) for module, name in KERNELS]
    previous_backend = backend.BACKEND
    try:
        for module, name, kernel in originals:
            setattr(module, name, _Recorder(kernel, launches, keep_arguments))
        backend.BACKEND = "triton"
        yield launches
    finally:
        backend.BACKEND = previous_backend
        for module, name, kernel in originals:
            setattr(module, name, kernel)


def _specialize(launch: Launch, target_backend) -> tuple[tuple, Any, dict, dict, dict]:
    """What `JITFunction.run` derives from the arguments before compiling: the options, the
    signature, the constexprs and the attributes (alignment, divisibility by 16)."""
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    # The compilation settings `run` adds in this triton version (they differ between versions).
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, target_backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        target_backend, kwargs, bound, specialization, options
    )
    key = (fn.__name__, str(specialization), str(sorted(options.__dict__.items())))
    return key, options, signature, constexprs, attrs


def launch_key(launch: Launch, arch: int = 90) -> tuple:
    """Equal for two launches exactly when Triton compiles them to the same binary for `arch`."""
    return _specialize(launch, _backend(arch))[0]


def _target(arch: int) -> GPUTarget:
    return GPUTarget("cuda", arch, 32)


@functools.cache
def _backend(arch: int):
    return make_backend(_target(arch))


def compile_launch(launch: Launch, arch: int = 90) -> CompiledLaunch:
    """Compile `launch`'s kernel, specialised as its arguments make it, for `sm_<arch>`; raises
    what Triton raises where the kernel does not compile."""
    _, options, signature, constexprs, attrs = _specialize(launch, _backend(arch))
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=_target(arch), options=options.__dict__)
    usage = resource_usage(compiled.asm["cubin"])
    names = [p.name for p in launch.kernel.params]
    return CompiledLaunch(
        name=launch.name,
        arch=arch,
        constexprs={names[path[0]]: value for path, value in constexprs.items()},
        pointers={k: t[1:] for k, t in signature.items() if t.startswith("*")},
        registers=usage["REG"],
        local_bytes=usage["LOCAL"],
        shared_bytes=usage["SHARED"],
        num_warps=options.num_warps,
        wide_load_share=wide_load_share(compiled.asm["ptx"]),
    )


def wide_load_share(ptx: str) -> float:
    """The share of the bits `ptx`'s global loads fetch that 128-bit instructions fetch (each
    instruction counted once, as written). A tile of contiguous channel vectors loaded one 32-bit
    value at a time gives ~0; one vector load per thread and row gives ~1."""
    total = wide = 0
    for qualifiers in re.findall(r"\bld\.global((?:\.[\w:]+)+)", ptx):
        lanes, bits = 1, 0
        for q in qualifiers.split(".")[1:]:
            if re.fullmatch(r"v\d+", q):
                lanes = int(q[1:])
            elif re.fullmatch(r"[bfsu]\d+", q):
                bits = int(q[1:])
        total += lanes * bits
        wide += lanes * bits if lanes * bits >= 128 else 0
    return wide / total if total else 0.0


def resource_usage(cubin: bytes) -> dict[str, Any]:
    """`REG`, `STACK`, `SHARED`, `LOCAL` (ints) and the whole `line` of the one kernel in `cubin`,
    as `cuobjdump -res-usage` reports them."""
    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [tool, "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    lines = [line.strip() for line in out.splitlines() if "REG:" in line]
    if len(lines) != 1:
        raise RuntimeError(f"expected one kernel's resource line from {tool}, got:\n{out}")
    fields = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", lines[0])}
    return {**fields, "line": lines[0]}
