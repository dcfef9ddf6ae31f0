"""Which implementation the fused ops take: the Triton kernels, the CPU kernels, the PyTorch
Functions, or the plain reference compositions.

On CUDA tensors with triton installed the Triton kernels run (`ops/triton_epilogue.py` for the
rewrite, `ops/triton_mixing.py` for the compressor reads); on fp32/float64 CPU tensors the C kernels
(`ops/native.py`, built on first use where a C compiler exists); elsewhere the hand-written autograd
Functions in PyTorch ops. `BACKEND` below, else the environment variable DELTALEARN_EPILOGUE, picks
one of "auto" (default), "triton" (force the Triton kernels, e.g. on CPU tensors under
TRITON_INTERPRET=1, as the tests do), "native" (the C kernels wherever their dtypes allow, an error
where they cannot be built), "torch" (the PyTorch Functions) or "reference" (every fast path off: the
plain compositions, autograd through every step — `DELTALEARN_EPILOGUE=reference deltalearn
compare`).
"""

from __future__ import annotations

import functools

import torch

from deltalearn.ops.switches import environment_value

BACKENDS = ("auto", "triton", "native", "torch", "reference")
# Module-level override of DELTALEARN_EPILOGUE (None: read the environment on each call).
BACKEND: str | None = None
# Input dtypes the Triton kernels accumulate in fp32 without loss; float64 stays off them.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The C kernels' dtypes (every operand in one of them); half precision stays on the PyTorch path.
NATIVE_DTYPES = (torch.float32, torch.float64)


@functools.cache
def triton_available() -> bool:
    """Whether `import triton` works (cached; triton is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def backend() -> str:
    """The chosen backend: `BACKEND`, else DELTALEARN_EPILOGUE, else "auto"."""
    choice = BACKEND if BACKEND is not None else environment_value(ENV_VARIABLE, "auto")
    if choice not in BACKENDS:
        raise ValueError(
            f"fast-path backend (deltalearn.ops.backend.BACKEND or DELTALEARN_EPILOGUE) must be "
            f"one of {list(BACKENDS)}, got {choice!r}"
        )
    return choice


ENV_VARIABLE = "DELTALEARN_EPILOGUE"


def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of CUDA `device` (how many programs a reducing kernel
    launches), asked of the driver once a device: `torch.cuda.get_device_properties` costs a few
    µs of host time, and the backward kernels ask at every call."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def use_triton(tensors: list[torch.Tensor], choice: str | None = None) -> bool:
    """Whether an op on `tensors` runs its Triton kernel: forced, or CUDA tensors in a kernel dtype
    on one device, outside `torch.compile` (Inductor fuses the PyTorch composition itself).
    `choice`: `backend()` when the caller has it already (reading the environment costs ~1.5 µs,
    which counts in one-token decoding)."""
    choice = backend() if choice is None else choice
    if choice in ("torch", "reference"):
        return False
    if choice == "triton":
        return True
    first = tensors[0]
    return (
        first.is_cuda
        and all(t.device == first.device for t in tensors)
        and all(t.dtype in KERNEL_DTYPES for t in tensors)
        and not torch.compiler.is_compiling()
        and triton_available()
    )


def use_native(tensors: list[torch.Tensor], choice: str | None = None) -> bool:
    """Whether an op on `tensors` runs its C kernel: plain CPU tensors of one dtype in
    `NATIVE_DTYPES`, outside `torch.compile` and functorch transforms, with the backend "auto" (and
    the kernels built) or "native" (NativeBuildError where they cannot be built). `choice` as in
    `use_triton`."""
    if not native_allowed(choice):  # first: it checks torch.compile before anything untraceable
        return False
    dtype = tensors[0].dtype
    if dtype not in NATIVE_DTYPES or not all(_plain_cpu(t, dtype) for t in tensors):
        return False
    from deltalearn.ops import native_build

    if (choice or backend()) == "native":
        native_build.require_library()  # raises, naming why, where the kernels cannot be built
        return True
    return native_build.library() is not None


def native_allowed(choice: str | None = None) -> bool:
    """Whether the C kernels may run now, whatever the operands: outside `torch.compile` and
    functorch transforms, with the backend (`choice`, else `backend()`) "auto" or "native"."""
    if torch.compiler.is_compiling():  # first: nothing below is traceable
        return False
    # Inside vmap/grad transforms tensors are wrappers with no data a C kernel could read.
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return (backend() if choice is None else choice) in ("auto", "native")


def _plain_cpu(t: torch.Tensor, dtype: torch.dtype) -> bool:
    # A subclass (FakeTensor, a tensor parallel wrapper) has no data a C kernel could read;
    # nn.Parameter is a plain tensor.
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_cpu and t.dtype == dtype
