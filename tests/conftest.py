"""Shared test settings: deterministic seeds, one intra-op thread and quick Inductor builds.

Two intra-op threads on a shared 2-core machine spin against other processes (pytest itself, the
2-process distributed tests): the tiny training loops ran 10-100x slower than on one thread.

The compiled-model tests spend their time in Inductor building C++ for CPU graphs. Unless
DELTALEARN_TESTS_INDUCTOR=full, its kernels are built scalar (no vector ISA) and at -O0 into a
cache of the tests' own, which halves a compile (measured on 2 cores) and leaves what the tests
check alone: graph capture, the custom ops, what autograd keeps, values and gradients. The
variables are set before torch is imported so that the subprocesses the tests start inherit them.
"""

import os
import tempfile

INDUCTOR_MODE = os.environ.get("DELTALEARN_TESTS_INDUCTOR", "quick")
if INDUCTOR_MODE not in ("quick", "full"):
    raise ValueError(f"DELTALEARN_TESTS_INDUCTOR must be 'quick' or 'full', got {INDUCTOR_MODE!r}")
if INDUCTOR_MODE == "quick":
    os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
    os.environ.setdefault("TORCHINDUCTOR_DEBUG_COMPILE", "1")
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deltalearn_tests_inductor")
    )

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

if os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") == "0":
    torch._inductor.config.cpp.vec_isa_ok = False  # torch may be imported already

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
