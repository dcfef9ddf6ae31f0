"""Atomic, resumable checkpoints: ``RUN_DIR/checkpoints/step_000010/``.

Each checkpoint folder holds

* ``model.safetensors`` — the full (unsharded) model weights; tied tensors stored once,
* ``trainer_state.pt`` — optimizer state, step, RNG states, config (a dict of tensors and plain
  values, loaded with ``weights_only=True``),
* ``meta.json`` — step and file list, for people and tools.

Writes go to a hidden temp folder beside the final one, every file and the folder are fsynced,
then the folder is renamed into place. A crash therefore leaves either the previous complete
checkpoints or an ignorable ``.tmp-*`` folder, never a half checkpoint named ``step_*``.

Re-saving a step that exists (a resumed run that stops where it started) cannot be one rename:
the old folder is first renamed to ``.old-step_*-PID``, then the new one into place, then the old
one removed. A crash between the two renames leaves the step only as ``.old-*``; it still counts
as that step (:func:`list_checkpoints`) and :func:`clean_temp` renames it back.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltalearn.atomic import fsync_dir, fsync_file
from deltalearn.errors import CheckpointError
from deltalearn.train.distributed import DistEnv, barrier, unwrap

__all__ = [
    "CheckpointError",
    "clean_temp",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_DIR = re.compile(r"^\.old-(step_\d+)-\d+$")  # a complete checkpoint moved aside for a re-save


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _moved_aside(root: Path) -> dict[str, Path]:
    """``.old-step_N-PID`` folders whose ``step_N`` is missing (a crash mid re-save): name → path."""
    out: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        m = _OLD_DIR.match(p.name)
        if m and not (root / m.group(1)).exists():
            out.setdefault(m.group(1), p)
    return out


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp-*`` folders are never listed).

    A step whose folder was moved aside for a re-save when the process died is listed under its
    ``.old-*`` path (:func:`clean_temp` renames it back).
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    found += [(int(name[5:]), p) for name, p in _moved_aside(root).items()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def clean_temp(run_dir: str | Path) -> None:
    """Tidy up after a crash during a save (rank 0, before anyone reads a checkpoint).

    A step that exists only as ``.old-*`` (moved aside for a re-save) is renamed back first;
    then the remaining ``.tmp-*`` and ``.old-*`` folders are removed.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for name, old in _moved_aside(root).items():
        os.replace(old, root / name)
    fsync_dir(root)
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)


def _is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def _model_state(model: nn.Module) -> dict[str, Any]:
    if _is_fsdp(model):  # collective: every rank must call
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    return unwrap(model).state_dict()


def _optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=opts)
    state = optimizer.state_dict()
    for group in state["param_groups"]:  # copies of the optimizer's own
        if isinstance(group.get("lr"), torch.Tensor):  # a recorded step's (`train.cuda_graph`)
            # saved as every other run saves it; a recorded run sets both again on resume
            group["lr"], group["capturable"] = group["lr"].item(), False
    return state


def _dedup(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied (shared-storage) tensors once; return the tensors and an alias → name map."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
        )
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistEnv,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Save after ``step`` optimizer steps; all ranks call it, rank 0 writes. Keeps the last ``keep``."""
    model_state = _model_state(model)
    optim_state = _optim_state(model, optimizer)
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:06d}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors, aliases = _dedup(model_state)
        save_file(tensors, tmp / MODEL_FILE, metadata={"aliases": json.dumps(aliases)})
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"step": step, "optimizer": optim_state, "rng": rng, **(extra or {})}
        torch.save(state, tmp / STATE_FILE)
        meta = {"step": step, "time": time.time(), "files": [MODEL_FILE, STATE_FILE]}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        for name in (MODEL_FILE, STATE_FILE, META_FILE):
            fsync_file(tmp / name)
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            old = root / f".old-{final.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)  # a crash from here on: the step survives as `old`
            fsync_dir(root)
            os.replace(tmp, final)
            fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)  # only once the new one is in place
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier(env)
    return final


def _read_model_file(path: Path) -> dict[str, Any]:
    try:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, ValueError) as e:  # ValueError: bad aliases JSON
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"corrupt or truncated checkpoint file {path}: {msg}") from None
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors


# What torch.load(weights_only=True) raises for a damaged file, found by cutting real state files
# (zip and legacy format) at every length and flipping random bytes: RuntimeError ("failed
# finding central directory"), OSError (EINVAL), EOFError (empty), UnpicklingError (random bytes,
# a rewritten pickle), UnicodeDecodeError/ValueError, IndexError, KeyError, struct.error and
# AssertionError ("storage key ... not found") from the readers. Raised by torch.load on this file
# they all mean "the file is damaged"; anything else (TypeError, AttributeError, ...) is a bug
# and keeps its traceback.
_BAD_STATE_FILE = (
    RuntimeError,
    OSError,
    EOFError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    ValueError,
    IndexError,
    KeyError,
    struct.error,
    AssertionError,
)


def _first_line(e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError):  # torch's text is a page about weights_only
        text = str(e)
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler" in text else ""
        detail = " ".join(detail.split()[:8])
        return "not a trainer state (unpickling refused" + (f": {detail})" if detail else ")")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] if not isinstance(e, KeyError) else f"{type(e).__name__} {lines[0]}"


def read_state(path: Path) -> dict[str, Any]:
    """Load ``trainer_state.pt`` (weights_only) or raise a one-line :class:`CheckpointError`."""
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint file missing: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except _BAD_STATE_FILE as e:
        raise CheckpointError(
            f"corrupt or truncated checkpoint file {file}: {_first_line(e)}"
        ) from None
    if not isinstance(state, dict) or not {"step", "optimizer"} <= state.keys():
        raise CheckpointError(
            f"corrupt checkpoint file {file}: expected a trainer state with step and optimizer"
        )
    return state


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from ``path`` (all ranks call it); return the state dict."""
    path = Path(path)
    file = path / MODEL_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint file missing: {file}")
    weights = _read_model_file(file)
    state = read_state(path)
    try:
        if _is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, dict(weights), options=opts)
            if optimizer is not None:
                set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
        else:
            unwrap(model).load_state_dict(weights)
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        msg = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match the model: {msg}") from None
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if (
        "cuda" in rng
        and torch.cuda.is_available()
        and len(rng["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
