"""Building and loading `inference_ext.cpp`: DDL's per-token work without autograd — a DeltaUpdate,
a compressor read, the EC expansion — in one call from Python each, with the checks in C++ (the host
time of about one ATen op). `DeltaUpdate.forward`, the compressors and the embedding expansion
take it first where it applies.

Built on first use with the machine's C++ compiler (`$CXX`, else Python's, else `c++`) against the
headers and libraries of the torch it runs with, cached under `cache_root()/extension/<key>/` —
the key hashes the source, the compiler, the flags, the torch and Python versions — and moved into
place atomically, like the C kernels (`native_build`), whose entry points it calls.

No C++ compiler or a failed build is not an error: `loaded()` returns None, says why once (a
warning), and the callers take the prepared ctypes calls of `ops/prepared.py` instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

from deltalearn.files import cache_root
from deltalearn.ops import native_build

SOURCE = Path(__file__).with_name("inference_ext.cpp")
MODULE_NAME = "deltalearn_inference_ext"  # PyInit_<name> in the source
KERNELS = ("update_forward", "read_forward", "expand_forward")  # the C kernels it calls
# torch's headers use a few C++20 features (compilers accept them in C++17 with a warning).
FLAG_SETS = (("-O3", "-std=c++20"), ("-O3", "-std=c++17"))


def cxx_compiler() -> str | None:
    """The C++ compiler to build with: `$CXX`, else the one Python was built with, else `c++`."""
    cxx = (os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++", "g++")
    return native_build.find_tool(*cxx)


def _torch_dirs() -> tuple[list[str], str]:
    root = Path(torch.__file__).parent
    return [str(root / "include"), str(root / "include/torch/csrc/api/include")], str(root / "lib")


def _library_file() -> str:
    return MODULE_NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def cache_key(cxx: str) -> str:
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(repr((cxx, FLAG_SETS, torch.__version__, torch.__file__, sys.version)).encode())
    return h.hexdigest()[:16]


def build(cxx: str, out: Path) -> tuple[str, ...]:
    """Compile the module to `out` (atomically) with the first flag set that works; return it."""
    includes, lib_dir = _torch_dirs()
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    common = [
        "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{sysconfig.get_paths()['include']}", *(f"-I{d}" for d in includes),
    ]  # fmt: skip
    libraries = [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-lc10", "-ltorch_cpu", "-ltorch_python"]
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            staged = Path(tmp) / out.name
            try:
                native_build.run_command(
                    [cxx, *flags, *common, str(SOURCE), "-o", str(staged), *libraries]
                )
            except native_build.NativeBuildError as e:
                errors.append(str(e))
                continue
            os.replace(staged, out)
            return flags
    raise native_build.NativeBuildError("\n".join(errors))


def _import(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load_module():
    """The built module with the C kernels' entry points set (built now if none is cached);
    NativeBuildError, saying which step failed and why, where it cannot be."""
    lib = native_build.require_library()
    if not sys.platform.startswith("linux"):
        raise native_build.NativeBuildError(f"built on Linux only, not on {sys.platform}")
    cxx = cxx_compiler()
    if cxx is None:
        raise native_build.NativeBuildError("no C++ compiler found ($CXX, Python's CXX or c++)")
    path = cache_root() / "extension" / cache_key(cxx) / _library_file()
    if not path.is_file():
        build(cxx, path)
    try:
        module = _import(path)
    except (ImportError, OSError) as e:
        raise native_build.NativeBuildError(f"loading {path} failed: {e}") from None
    for name in KERNELS:
        f32, f64 = (
            ctypes.cast(getattr(lib, f"{name}_{suffix}"), ctypes.c_void_p).value
            for suffix in ("f32", "f64")
        )
        module.set_kernel(name, f32, f64)
    return module


@functools.cache
def loaded():
    """The built module (`update`, `channel_read`, `token_read`, `expand`; see
    `inference_ext.cpp`), or None (with one warning saying why) where it cannot be built."""
    if native_build.library() is None:  # no C kernels to call (that warns itself)
        return None
    try:
        return load_module()
    except native_build.NativeBuildError as e:
        warnings.warn(
            f"deltalearn's inference extension is unavailable, decoding takes the slower ctypes "
            f"calls instead: {e}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
