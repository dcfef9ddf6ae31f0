"""Process-group setup and model wrapping for data-parallel training (DDP or FSDP2).

Launch with ``torchrun --standalone --nproc_per_node=N -m deltalearn.cli train ...``. Every rank
draws the same global batch from the sampler and trains on its own contiguous slice of rows, so
N processes see exactly the tokens one process would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "all_reduce_mean",
    "all_reduce_max",
    "init_distributed",
    "shutdown",
    "wrap_model",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank of this process
    world_size: int  # number of processes
    local_rank: int  # rank within this machine (selects the CUDA device)
    device: torch.device  # where this rank computes

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from deltalearn.errors import ConfigError

        raise ConfigError("run.device is cuda but no CUDA device is available")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (RANK/WORLD_SIZE), or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = resolve_device(device)
    if world == 1:
        return DistEnv(0, 1, 0, base)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        base = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if base.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, base)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _block_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's largest ModuleList (its Transformer blocks), the natural FSDP unit."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best)):
            best = m
    return best


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 ``fully_shard`` per block + root. Single process: unchanged.

    FSDP2 runs on CPU with gloo in the test suite only lightly; it is meant for models that do
    not fit one GPU.
    """
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        blocks = _block_list(model)
        for block in blocks or []:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final micro-batches of gradient accumulation."""
    if not skip:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        set_sync: Any = model.set_requires_gradient_sync
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
    else:
        yield


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def all_reduce_max(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value
