"""The training loop: one :class:`Trainer` per run, driven by :func:`train`.

Step ``s`` (0-based) always trains on ``sampler.batch(s, ...)`` with lr ``lr_at(s)``, and a
checkpoint after ``n`` steps holds everything the next step reads (weights, AdamW moments, RNG).
Stopping after step 10 and resuming therefore gives bitwise the same weights as running
straight through (on CPU; CUDA kernels may be non-deterministic).
"""

from __future__ import annotations

import json
import math
import resource
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deltalearn.errors import ConfigError, NonFiniteLossError
from deltalearn.models.loss import next_token_loss
from deltalearn.train import checkpoint as ckpt
from deltalearn.train.build import build_model, model_config, prepare_data
from deltalearn.train.config import TrainConfig, config_diff, load_config, save_config
from deltalearn.train.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_mean,
    init_distributed,
    no_grad_sync,
    shutdown,
    unwrap,
    wrap_model,
)
from deltalearn.train.logging import RunLogger
from deltalearn.train.optim import build_optimizer, lr_at
from deltalearn.train.runs import quiet_hf
from deltalearn.train.validation import autocast_context, evaluate_loss, mean_beta_per_layer

__all__ = ["TrainResult", "Trainer", "train"]


@dataclass
class TrainResult:
    run_dir: str  # the run folder
    status: str  # "finished", "stopped" (stop_after) or "interrupted" (SIGINT/SIGTERM)
    step: int  # optimizer steps completed
    val_loss: float | None  # last validation loss
    params: int  # trainable parameters (tied ones counted once)
    train_tokens_per_s: float  # training throughput of this process' run (all ranks together)
    peak_memory_mb: float  # see memory_kind
    memory_kind: str  # "cuda_max_allocated" or "cpu_peak_rss" (whole process, incl. Python)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.run.dtype == "bf16" or (cfg.run.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    # ru_maxrss is KiB on Linux: the peak resident set of this whole process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


class Trainer:
    """Owns the model, optimizer, sampler and logs of one run."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, data: Any):
        from deltalearn.data import BatchSampler

        self.cfg, self.env, self.data = cfg, env, data
        self.run_dir = Path(cfg.run.out)
        self.device = env.device
        self.dtype = _autocast_dtype(cfg, self.device)
        world, accum = env.world_size, cfg.run.grad_accum
        if cfg.run.batch_size % (world * accum):
            raise ConfigError(
                f"run.batch_size ({cfg.run.batch_size}) must be divisible by "
                f"world size × run.grad_accum ({world} × {accum})"
            )
        self.rows = cfg.run.batch_size // world  # this rank's rows of each global batch
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg, data.vocab_size).to(self.device)
        self.params = sum(p.numel() for p in dict(model.named_parameters()).values())
        if cfg.run.compile:
            model.compile()  # in place: state-dict keys stay unprefixed
        self.model = wrap_model(model, env, fsdp=cfg.run.fsdp)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.sampler = BatchSampler(
            data.tokens("train"), cfg.run.seq_len, cfg.run.batch_size, cfg.run.seed
        )
        self.step = 0
        self.val_loss: float | None = None
        self.logger = RunLogger(self.run_dir, env.is_main, cfg.run.tensorboard)
        self._stop_signal: int | None = None
        self._train_time = 0.0
        self._train_tokens = 0

    # ---- one step -------------------------------------------------------------------------

    def forward_backward_step(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor:
        """Loss of one micro-batch; gradients (scaled for accumulation) added to ``.grad``."""
        with no_grad_sync(self.model, skip=not sync):
            with autocast_context(self.device, self.dtype):
                logits = self.model(x).logits
            loss = next_token_loss(logits, y)
            (loss / self.cfg.run.grad_accum).backward()
        return loss.detach()

    def train_step(self, step: int) -> dict[str, Any]:
        """Optimizer step ``step`` (0-based) on this rank's slice of the global batch."""
        cfg, env = self.cfg, self.env
        lr = lr_at(step, cfg.optim.lr, cfg.run.steps, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        start = env.rank * self.rows
        x, y = self.sampler.batch(step, start, start + self.rows)
        x = torch.as_tensor(x, dtype=torch.long).to(self.device, non_blocking=True)
        y = torch.as_tensor(y, dtype=torch.long).to(self.device, non_blocking=True)
        accum = cfg.run.grad_accum
        micro = self.rows // accum
        losses = [
            self.forward_backward_step(
                x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro], sync=i == accum - 1
            )
            for i in range(accum)
        ]
        loss = all_reduce_mean(torch.stack(losses).mean(), env)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        loss_v, norm_v = loss.item(), grad_norm.item()
        record = {"step": step + 1, "loss": loss_v, "lr": lr, "grad_norm": norm_v}
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            # Checked before optimizer.step(), so NaN never reaches the weights.
            if not cfg.run.skip_nonfinite:
                what = "loss" if not math.isfinite(loss_v) else "gradient norm"
                raise NonFiniteLossError(
                    f"non-finite {what} ({loss_v if what == 'loss' else norm_v}) at step {step + 1}; "
                    "lower --lr, or pass --skip-nonfinite to skip such batches"
                )
            self.optimizer.zero_grad(set_to_none=True)
            record["skipped"] = True
            return record
        self.optimizer.step()
        return record

    # ---- evaluation, checkpoints ------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Validation loss (same batches every time) and mean β per layer on the first batch."""
        from deltalearn.data import eval_batches

        cfg = self.cfg
        # DDP: evaluate the bare module on every rank (no collectives needed). FSDP: the sharded
        # model itself, since its forward gathers parameters across ranks.
        model = self.model if cfg.run.fsdp else unwrap(self.model)
        val = self.data.tokens("val")
        # Every rank evaluates the same eval_batches × batch_size windows (in micro-batch chunks),
        # so the number depends neither on the world size nor on grad_accum.
        accum = cfg.run.grad_accum
        eval_rows = cfg.run.batch_size // accum
        loss = evaluate_loss(
            model,
            val,
            cfg.run.seq_len,
            eval_rows,
            cfg.run.eval_batches * accum,
            self.device,
            self.dtype,
        )
        out: dict[str, Any] = {"val_loss": loss}
        if cfg.model.variant != "baseline":
            first = next(iter(eval_batches(val, cfg.run.seq_len, min(eval_rows, 4), 1)), None)
            if first is not None:
                x = torch.as_tensor(first[0], dtype=torch.long, device=self.device)
                betas = mean_beta_per_layer(model, x)
                if betas is not None:
                    out["beta_mean"] = betas
        return out

    def save(self) -> None:
        extra = {"config": asdict(self.cfg), "val_loss": self.val_loss}
        ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            self.env,
            extra=extra,
            keep=self.cfg.run.keep_checkpoints,
        )

    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; True when resumed."""
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return False
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step = int(state["step"])
        self.val_loss = state.get("val_loss")
        self.logger.truncate_after(self.step)
        return True

    # ---- the loop -------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop_signal = signum  # acted on after the current step

    def _stop_requested(self) -> bool:
        flag = torch.tensor(1.0 if self._stop_signal is not None else 0.0)
        return bool(all_reduce_max(flag, self.env).item())  # every rank stops at the same step

    def fit(self) -> str:
        """Train until ``run.steps`` (or stop_after, or a signal); returns the status."""
        cfg, env = self.cfg, self.env
        total = cfg.run.steps
        stop_at = min(total, cfg.run.stop_after or total)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        bar = tqdm(
            total=total,
            initial=self.step,
            disable=not (cfg.run.progress and env.is_main),
            desc=f"train {cfg.model.variant}",
            dynamic_ncols=True,
        )
        tokens_per_step = cfg.run.batch_size * cfg.run.seq_len
        status = "finished"
        first = True
        try:
            self.model.train()
            while self.step < stop_at:
                t0 = time.perf_counter()
                record = self.train_step(self.step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.step += 1
                if not first or self.step == stop_at:  # the first step of a process warms up
                    self._train_time += dt
                    self._train_tokens += tokens_per_step
                first = False
                record["tokens_per_s"] = tokens_per_step / dt
                record["tokens"] = self.step * tokens_per_step
                if self.step % cfg.run.eval_interval == 0 or self.step == total:
                    record.update(self.evaluate())
                    self.val_loss = record["val_loss"]
                if self.step % cfg.run.log_interval == 0 or "val_loss" in record:
                    self.logger.log(record)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False,
                )
                if self._stop_requested():
                    status = "interrupted"
                    break
                if self.step % cfg.run.checkpoint_interval == 0 and self.step < stop_at:
                    self.save()
            if status == "finished" and self.step < total:
                status = "stopped"
            self.save()
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return status

    def save_final_model(self) -> None:
        """``RUN_DIR/model``: the HF-format model plus tokenizer (rank 0 writes)."""
        model = unwrap(self.model)
        if self.cfg.run.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.model, options=opts)
            if not self.env.is_main:
                return
            model = build_model(self.cfg, self.data.vocab_size)
            model.load_state_dict(full)
        if not self.env.is_main:
            return
        out = self.run_dir / "model"
        save: Any = model.save_pretrained  # a transformers PreTrainedModel
        with quiet_hf():
            save(out)
        self.data.load_tokenizer().save_pretrained(out)

    def result(self, status: str) -> TrainResult:
        peak, kind = _peak_memory(self.device)
        return TrainResult(
            run_dir=str(self.run_dir),
            status=status,
            step=self.step,
            val_loss=self.val_loss,
            params=self.params,
            train_tokens_per_s=self._train_tokens / self._train_time if self._train_time else 0.0,
            peak_memory_mb=peak,
            memory_kind=kind,
        )


def check_run_dir(cfg: TrainConfig, resume: bool) -> None:
    """Refuse to overwrite a run without ``--resume``, or to resume with a different config."""
    run_dir = Path(cfg.run.out)
    saved = run_dir / "config.yaml"
    has_ckpt = ckpt.latest_checkpoint(run_dir) is not None
    if not resume and has_ckpt:
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, or another --out"
        )
    if resume and saved.is_file():
        diff = config_diff(load_config(saved), cfg)
        if diff:
            raise ConfigError(
                f"cannot resume {run_dir} with a different config: " + ", ".join(diff)
            )


def train(cfg: TrainConfig, resume: bool = False, data: Any = None) -> TrainResult:
    """Run (or resume) one training run described by ``cfg``; the library entry of ``train``.

    Works as a single process or under ``torchrun`` (one call per rank). ``data`` may be a
    ``PreparedData`` already at hand; by default it is prepared from ``cfg.data``.
    """
    cfg.validate()
    env = init_distributed(cfg.run.device)
    try:
        run_dir = Path(cfg.run.out)
        check_run_dir(cfg, resume)
        model_config(cfg, cfg.data.vocab_size)  # a typo in the model config fails before data prep
        if data is None:
            # Rank 0 prepares (and caches) first, so the other ranks only read the cache.
            if env.is_main:
                data = prepare_data(cfg, progress=cfg.run.progress)
            if env.distributed:
                torch.distributed.barrier()
            if not env.is_main:
                data = prepare_data(cfg, progress=False)
        trainer = Trainer(cfg, env, data)
        if env.is_main:
            ckpt.clean_temp(run_dir)  # leftovers of a crash mid-save
        # Load the checkpoint before writing anything, so a bad one leaves the folder untouched.
        if not (resume and trainer.resume()):
            trainer.logger.truncate_after(0)  # a fresh start: drop lines of an earlier attempt
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            data.load_tokenizer().save_pretrained(run_dir / "tokenizer")
        status = trainer.fit()
        if status == "finished":
            trainer.save_final_model()
        result = trainer.result(status)
        if env.is_main:
            trainer.logger.close()
            if status == "finished":
                (run_dir / "summary.json").write_text(json.dumps(asdict(result), indent=1))
        return result
    finally:
        shutdown()
