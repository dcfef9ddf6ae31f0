"""A step recorded once as a CUDA graph and replayed at every later call: the trainer's training
step (`deltalearn train --cuda-graphs`), and in the benchmarks a forward or a decoded token.

Why: at `small`, 8 × 1024 tokens on an H200 an eager training step is bound by its host — the
Python, autograd and dispatcher work that issues each kernel takes longer than the GPU takes to run
them (the baseline's GPU busy 71% of a step, DDL's about half; `benchmarks/README.md`). Replayed as
a graph, the step's kernels are issued by the driver in one call, with no Python in between, so a
step takes its GPU time. DDL issues more small kernels per step than the baseline, so it gains more.

How (PyTorch's whole-network capture): `StepGraph` runs `step` — a function of no arguments that
reads its inputs from tensors kept across steps and returns device tensors — eagerly for
`WARMUP_CALLS` calls on a side stream (Triton compiles its kernels, AdamW makes its state, cuBLAS
its handles), records the next call into a `torch.cuda.CUDAGraph` on that same stream, and from
then on replays it. What the caller must keep (the trainer does):

- inputs copied into the same tensors before each call (`copy_`), never rebound;
- every value that changes from step to step on the device: the learning rate a tensor the
  optimizer reads (fused, capturable AdamW), not a Python float baked into the graph;
- no host sync and nothing shape-dependent inside `step`;
- the outputs read or copied before the next call, which overwrites them.

On a CPU there is no graph; a `StepGraph` for a CPU device (tests) runs `step` at every call and
copies its outputs into the tensors the first recorded call returned, so a caller that keeps an
output past the next call reads overwritten values as it would on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltalearn.errors import ConfigError

__all__ = ["WARMUP_CALLS", "StepGraph", "check_graphable"]

# Eager calls before the capture (PyTorch's examples take three; the first compiles and allocates).
WARMUP_CALLS = 3


def check_graphable(
    device: torch.device, *, world_size: int, distributed: bool, fused_optimizer: bool
) -> None:
    """Raise ConfigError where `--cuda-graphs` cannot record the step: not a CUDA device, a process
    group (torchrun, one process or more: DDP's gradient all-reduce runs from autograd hooks, and
    recorded collectives are not verified), or an optimizer that cannot skip a non-finite step on
    the device."""
    if device.type != "cuda":
        raise ConfigError(f"run.cuda_graphs needs a CUDA device, got {device.type!r}")
    if distributed:
        raise ConfigError(
            f"run.cuda_graphs records a single process's step, not one under torchrun (world "
            f"size {world_size}); train without it there"
        )
    if not fused_optimizer:
        raise ConfigError("run.cuda_graphs needs the fused AdamW (plain CUDA parameters)")


class StepGraph:
    """`step()` recorded once and replayed; see the module doc. Call it like `step`."""

    def __init__(self, step: Callable[[], tuple[torch.Tensor, ...]], device: torch.device):
        self._step = step
        self._stand_in = device.type != "cuda"  # the module doc's stand-in
        self.calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: tuple[torch.Tensor, ...] | None = None
        self._stream = None if self._stand_in else torch.cuda.Stream()

    @property
    def recorded(self) -> bool:
        return self._outputs is not None

    def replay(self) -> tuple[torch.Tensor, ...]:
        """One replay; the first call runs the warm-up calls and the recording before it."""
        outputs = self()
        while not self.recorded:
            outputs = self()
        return outputs

    def __call__(self) -> tuple[torch.Tensor, ...]:
        self.calls += 1
        if self.calls <= WARMUP_CALLS:
            return self._eager()
        if self._outputs is None:
            return self._record()
        if self._stand_in:
            for kept, new in zip(self._outputs, self._step(), strict=True):
                kept.copy_(new)
        else:
            assert self._graph is not None
            self._graph.replay()
        return self._outputs

    def _eager(self) -> tuple[torch.Tensor, ...]:
        if self._stream is None:
            return self._step()
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            outputs = self._step()
        current.wait_stream(self._stream)
        for t in outputs:  # made on the side stream, read and freed on this one
            t.record_stream(current)
        return outputs

    def _record(self) -> tuple[torch.Tensor, ...]:
        if self._stand_in:
            self._outputs = self._step()
            return self._outputs
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        self._graph = torch.cuda.CUDAGraph()
        # The warm-up's stream: the cuBLAS handles and workspaces made for it are reused, not
        # created mid-capture.
        try:
            with torch.cuda.graph(self._graph, stream=self._stream):
                self._outputs = self._step()
        except Exception as error:  # a bug, ours or torch's: kept with its traceback
            raise RuntimeError(
                "recording the training step as a CUDA graph failed (something in the step is "
                "not capturable); train without --cuda-graphs"
            ) from error
        current.wait_stream(self._stream)
        self._graph.replay()  # capture only records: this call's step runs now
        return self._outputs
