"""Host time of Triton's launch path in Python for the kernels a variant's step launches, on any
CPU: each distinct launch of one block's training step (or forward, or decoded token) is replayed
through `JITFunction.run` with a stand-in driver and a stand-in compiled kernel, so everything
Triton does in Python before its generated launcher — binding and specialising the arguments, the
cache key, the hooks — is timed, and neither the launcher's C code nor the driver call is.

    python benchmarks/triton_launch_host.py [--variant ddl-cc] [--phase train|infer|decode]

Why: on the H200 a Triton launch cost the host 107-134 µs (`host_overhead.py --device cuda`,
`benchmarks/README.md`); this shows how much of that is Triton's Python, which a launch that
skipped it (a cached compiled kernel called directly) could save at most.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import triton
import triton.compiler
from host_overhead import make_run
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from deltalearn.ops import _shapes as shapes
from deltalearn.ops import triton_aot


class _StandInDriver:
    """What `JITFunction.run` asks the active driver for: device 0, stream 0, an sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


class _StandInKernel:
    """A compiled kernel whose launch does nothing (no launch hook set: no metadata either)."""

    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args) -> None:
        return None

    def run(self, *args) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="ddl-cc")
    parser.add_argument("--phase", default="train", choices=["train", "infer", "decode"])
    parser.add_argument("--calls", type=int, default=2000, help="launches a timed repeat")
    args = parser.parse_args()
    shapes.SMALL_STATE = 0  # the reads of a real-sized state take their kernel
    with triton_aot.recording() as launches:  # the arguments of every launch, kept
        make_run(args.variant, 1, args.phase, autocast=True)[0]()
    distinct = {}
    for launch in launches:
        distinct.setdefault((launch.kernel.__name__, str(sorted(launch.kwargs.items()))), launch)
    # For the rest of this process (it ends after the table): no GPU driver, no compiling.
    driver.set_active(_StandInDriver())  # (asking for the active one would look for a GPU)
    triton.compiler.compile = lambda *a, **k: _StandInKernel()  # `create_binder` imports it
    print(f"triton {triton.__version__}, torch {torch.__version__}; {args.variant}, "
          f"{args.phase}, bf16 autocast; median of 7 repeats of {args.calls} launches")  # fmt: skip
    print("| kernel | arguments | constexpr and launch options | µs a launch in Python |")
    print("|---|---|---|---|")
    for (name, _), launch in distinct.items():
        launcher = launch.kernel[(1,)]

        def call(launch=launch, launcher=launcher) -> None:
            launcher(*launch.args, **launch.kwargs)

        for _ in range(200):
            call()
        times = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            times.append((time.perf_counter() - start) / args.calls)
        print(f"| {name} | {len(launch.args)} | {len(launch.kwargs)} "
              f"| {statistics.median(times) * 1e6:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
