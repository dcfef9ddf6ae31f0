"""Process-group setup, model wrapping and collectives for data-parallel training (DDP or FSDP2).

Launch with ``torchrun --standalone --nproc_per_node=N -m deltalearn.cli train ...``. Every rank
draws the same global batch from the sampler and trains on its own contiguous slice of rows, so
N processes see exactly the tokens one process would.

Every collective of the trainer goes through the helpers here (:func:`all_reduce_sum`,
:func:`all_reduce_mean`, :func:`all_reduce_max`, :func:`barrier`). They take the
:class:`DistEnv` and refuse a tensor that is not on ``env.device``: NCCL serves CUDA tensors only,
so a flag built on the CPU works with gloo and crashes on GPUs.
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
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "init_distributed",
    "shutdown",
    "wrap_model",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank of this process
    world_size: int  # number of processes
    local_rank: int  # rank within this machine (selects the CUDA device)
    device: torch.device  # where this rank computes; every collective's tensors live here
    process_group: bool = False  # launched by torchrun: a process group exists, even for 1 rank

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Collectives run (DDP/FSDP wrapping, all-reduces): under torchrun, any world size."""
        return self.process_group or self.world_size > 1


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from deltalearn.errors import ConfigError

        raise ConfigError("run.device is cuda but no CUDA device is available")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (RANK/WORLD_SIZE), or run as a single process.

    Under torchrun the group is created even for one process (``--nproc_per_node=1``), so a
    one-GPU launch runs the same DDP/FSDP2 and NCCL code as a multi-GPU one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = resolve_device(device)
    if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # a plain single process
        return DistEnv(0, 1, 0, base)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        base = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        if base.type == "cuda":  # bind the group to this rank's GPU (barriers use it too)
            dist.init_process_group(backend="nccl", device_id=base)
        else:
            dist.init_process_group(backend="gloo")
    return DistEnv(rank, world, local_rank, base, process_group=True)


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


def _on_device(value: torch.Tensor, env: DistEnv) -> None:
    """A collective's tensor must live on ``env.device`` (a bare "cuda" matches any index)."""
    want, got = env.device, value.device
    if got.type != want.type or (want.index is not None and got.index != want.index):
        raise RuntimeError(
            f"collective on a tensor on {got}, but this rank's collectives run on {want} "
            "(NCCL serves CUDA tensors only): create it with device=env.device"
        )


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of ``value`` over all ranks (a new tensor; ``value`` itself is left as it is)."""
    _on_device(value, env)
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of ``value`` over all ranks (a new tensor)."""
    _on_device(value, env)
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def all_reduce_max(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Maximum of ``value`` over all ranks (a new tensor)."""
    _on_device(value, env)
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def barrier(env: DistEnv) -> None:
    """Wait for every rank (on this rank's GPU under NCCL); a no-op for a single process."""
    if not env.distributed:
        return
    if env.device.type == "cuda" and env.device.index is not None:
        dist.barrier(device_ids=[env.device.index])
    else:
        dist.barrier()
