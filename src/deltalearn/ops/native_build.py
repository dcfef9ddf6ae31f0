"""Compiling and loading the CPU kernels of `native_kernels.c` (used by `ops/native.py`).

The C file is built on first use with the machine's C compiler (`$CC`, else Python's, else `cc`),
once for float and once for double, into one shared library cached under
`cache_root()/native/<key>/` — the key hashes the source, the compiler, the flags and the CPU (the
build targets this CPU: `-march=native`). The library is written beside its final name and moved
into place, so a concurrent or interrupted build never leaves a half-written file. It is called
through `ctypes`, which releases the GIL for the call; OpenMP is the libgomp torch has loaded.

No compiler, or a failed build, is not an error: `library()` returns None, says why once (a
warning), and the PyTorch Functions run instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

from deltalearn.files import cache_root

SOURCE = Path(__file__).with_name("native_kernels.c")
LIBRARY_NAME = "libdeltalearn_native.so"
# Tried in order: the fastest build this compiler accepts. Without OpenMP the kernels run on one
# thread (its pragmas are ignored); without -march=native they are portable.
# Reassociation lets the row reductions vectorise (a different, still fixed, summation order); NaN
# and infinity semantics stay (no -ffinite-math-only).
_REASSOCIATE = ("-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fno-math-errno")
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp", *_REASSOCIATE),
    ("-O3", "-fopenmp", *_REASSOCIATE),
    ("-O3",),
)
# (C name, ctypes argument types) of each entry point, without the _f32/_f64 suffix.
_P, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
SIGNATURES = {
    "epilogue_forward": [_I64] * 3 + [_P] * 5 + [_INT, _INT, _DBL, _DBL] + [_P] * 6 + [_INT],
    "epilogue_backward": [_I64] * 3 + [_P] * 10 + [_INT, _INT, _DBL] + [_P] * 5 + [_INT],
    "state_rebuild": [_I64] * 3 + [_P] * 6 + [_INT],
    "update_forward": [_I64] * 3 + [_P] * 9 + [_INT, _INT, _DBL, _DBL] + [_P] * 2 + [_INT],
    "update_forward_saved": [_I64] * 3 + [_P] * 9 + [_INT, _INT, _DBL, _DBL] + [_P] * 6 + [_INT],
    "update_backward": [_I64] * 3 + [_P] * 14 + [_INT, _INT, _DBL] + [_P] * 10 + [_INT, _INT],
    "read_forward": [_I64] * 6 + [_P] * 3 + [_INT],
    "read_backward": [_I64] * 6 + [_P] * 5 + [_INT],
    "expand_forward": [_I64] * 6 + [_P] * 3 + [_INT],
    "expand_backward": [_I64] * 6 + [_P] * 5 + [_INT],
    "update_forward_packed": [_P] * 8 + [_INT],
    "read_forward_packed": [_P] * 3 + [_INT],
    "expand_forward_packed": [_P] * 3 + [_INT],
}
SUFFIXES = {"float32": "f32", "float64": "f64"}
# The double build (float64: tests and gradcheck, not speed) skips the per-dv copies of each loop.
GENERIC = ["-DGENERIC_DV"]


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled or loaded (the message says which step and why)."""


def compiler() -> str | None:
    """The C compiler to build with: `$CC`, else the one Python was built with, else `cc`."""
    return find_tool(os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc")


def find_tool(*candidates: str | None) -> str | None:
    """The path of the first candidate command (its first word; None and "" skipped) on PATH."""
    for candidate in candidates:
        if candidate:
            path = shutil.which(candidate.split()[0])
            if path:
                return path
    return None


def _cpu_key() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags (Linux), else the
    platform string."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.platform() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))


def cache_key(cc: str) -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), repr(FLAG_SETS).encode(), _cpu_key().encode()):
        h.update(part)
    return h.hexdigest()[:16]


def run_command(cmd: list[str]) -> None:
    """Run a build step; NativeBuildError with the end of its stderr where it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NativeBuildError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")


def build(cc: str, out: Path) -> tuple[str, ...]:
    """Compile the library to `out` (atomically) with the first flag set that works; return it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            objects = []
            try:
                for real, suffix, extra in (("float", "f32", []), ("double", "f64", GENERIC)):
                    obj = Path(tmp) / f"kernels_{suffix}.o"
                    defines = [f"-DREAL={real}", f"-DSUFFIX={suffix}", *extra]
                    run_command([cc, *flags, "-fPIC", *defines, "-c", str(SOURCE), "-o", str(obj)])
                    objects.append(str(obj))
                staged = Path(tmp) / LIBRARY_NAME
                run_command([cc, *flags, "-shared", *objects, "-o", str(staged), "-lm"])
            except NativeBuildError as e:
                errors.append(str(e))
                continue
            os.replace(staged, out)
            return flags
    raise NativeBuildError("\n".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        for suffix in SUFFIXES.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
    return lib


def load_library() -> ctypes.CDLL:
    """The compiled library (built now if this machine has none cached); NativeBuildError if that
    fails."""
    if not sys.platform.startswith("linux"):
        raise NativeBuildError(f"the CPU kernels are built on Linux only, not on {sys.platform}")
    cc = compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found ($CC, Python's CC or cc)")
    path = cache_root() / "native" / cache_key(cc) / LIBRARY_NAME
    if not path.is_file():
        build(cc, path)
    try:
        return _load(path)
    except (OSError, AttributeError) as e:
        raise NativeBuildError(f"loading {path} failed: {e}") from None


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    try:
        return load_library(), ""
    except NativeBuildError as e:
        return None, str(e)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning saying why) where they cannot be built."""
    lib, why = _loaded()
    if lib is None:
        warnings.warn(
            f"deltalearn's CPU kernels are unavailable, using the PyTorch ops instead: {why}",
            RuntimeWarning,
            stacklevel=2,
        )
    return lib


def require_library() -> ctypes.CDLL:
    """The loaded kernels; NativeBuildError (saying why) where they cannot be built."""
    lib, why = _loaded()
    if lib is None:
        raise NativeBuildError(why)
    return lib
