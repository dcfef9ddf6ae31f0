"""The training loop: one :class:`Trainer` per run, driven by :func:`train`.

Step ``s`` (0-based) always trains on ``sampler.batch(s, ...)`` with lr ``lr_at(s)``, and a
checkpoint after ``n`` steps holds everything the next step reads (weights, AdamW moments, RNG).
Stopping after step 10 and resuming therefore gives bitwise the same weights as running
straight through (on CPU; CUDA kernels may be non-deterministic).

A step never waits for the device: its loss, gradient norm and "finite" flag stay device tensors
until the next *sync point* (every ``run.log_interval`` steps, an evaluation or checkpoint step,
the last step, and the first step of a process, whose warm-up is timed apart). There a single
read-back brings every pending step to the host, together with the stop flag (a signal on any
rank, all-reduced on ``env.device``); the log lines are written and tokens/s is measured over
the interval.

A non-finite loss or gradient norm is caught on the device. With a fused optimizer
(``found_inf``, the protocol of ``torch.amp.GradScaler``) the update of such a step is skipped by
the kernel itself: weights, moments and step count stay bitwise as they were, with no sync. Other
optimizers get zeroed gradients for that step, so the weights stay finite; with
``run.skip_nonfinite`` they instead check each step on the host (one sync per step) to skip it
exactly. Without ``skip_nonfinite`` the run stops at the next sync point with
:class:`NonFiniteLossError` naming the first bad step, before any evaluation or checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import resource
import signal
import threading
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deltalearn.atomic import atomic_write_text, remove_stale_temps
from deltalearn.errors import ConfigError, NonFiniteLossError
from deltalearn.models.flops import flops_per_token
from deltalearn.models.loss import next_token_loss
from deltalearn.train import checkpoint as ckpt
from deltalearn.train.build import build_model, model_config, prepare_data
from deltalearn.train.config import TrainConfig, config_diff, load_config, save_config
from deltalearn.train.cuda_graph import StepGraph, check_graphable
from deltalearn.train.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    init_distributed,
    no_grad_sync,
    shutdown,
    unwrap,
    wrap_model,
)
from deltalearn.train.host_allocator import keep_freed_memory
from deltalearn.train.logging import RunLogger
from deltalearn.train.optim import build_optimizer, lr_at, stepped_parameters
from deltalearn.train.runs import check_run_paths, quiet_hf
from deltalearn.train.validation import (
    autocast_context,
    loss_sums,
    mean_beta_per_layer,
    mean_from_sums,
)

__all__ = ["StepStats", "TrainResult", "Trainer", "read_summary", "train"]

SUMMARY_FILE = "summary.json"


@dataclass
class TrainResult:
    run_dir: str  # the run folder
    status: str  # "finished", "stopped" (stop_after) or "interrupted" (SIGINT/SIGTERM)
    step: int  # optimizer steps completed
    val_loss: float | None  # last validation loss
    params: int  # trainable parameters (tied ones counted once)
    # training throughput of the run (all ranks together; over every process that trained it,
    # each one's first, warm-up step left out)
    train_tokens_per_s: float
    peak_memory_mb: float  # see memory_kind; the highest of the processes that trained the run
    memory_kind: str  # "cuda_max_allocated" or "cpu_peak_rss" (whole process, incl. Python)
    # Model FLOPs (`deltalearn.models.flops`: forward + backward matmuls, no recompute) per
    # training token and of all `step` steps. Optional: summaries written before they existed
    # lack them and still count as finished.
    flops_per_token: float | None = None
    train_flops: float | None = None


@dataclass
class StepStats:
    """One optimizer step whose numbers are still on the device (read at the next sync point)."""

    step: int  # 1-based: steps completed after this one
    lr: float
    loss: torch.Tensor  # mean over all ranks and micro-batches (0-dim)
    grad_norm: torch.Tensor  # global gradient norm before clipping (0-dim)
    finite: torch.Tensor  # bool (0-dim): loss and grad norm finite, i.e. the update was applied


def _required_fields() -> list[str]:
    """The TrainResult fields every summary has (those added later have defaults)."""
    return [f.name for f in fields(TrainResult) if f.default is MISSING]


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN_DIR/summary.json`` if it is complete (every required TrainResult field, status
    finished); None when it is missing, torn or from an unfinished run. Its presence marks a
    finished run."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "finished":
        return None
    if any(name not in summary for name in _required_fields()):
        return None
    return summary


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
        keep_freed_memory(self.device)  # CPU: no page faults for each step's activations
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
        # Model FLOPs of one training token (forward + backward), and the UTF-8 bytes behind the
        # validation targets (None when unknown): cumulative FLOPs and val_bpb in the log.
        self.flops_per_token = flops_per_token(model.config, cfg.run.seq_len).train
        self._val_bytes = self._scored_val_bytes()
        if cfg.run.activation_checkpointing:
            # Per block (DeltaLMBlock is a GradientCheckpointingLayer); before compile and DDP/FSDP
            # wrapping, so the recompute sits inside the wrapped forward.
            model.activation_checkpointing_enable()
        if cfg.run.compile:
            model.compile()  # in place: state-dict keys stay unprefixed
        self.model = wrap_model(model, env, fsdp=cfg.run.fsdp)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self._clipped = stepped_parameters(self.optimizer)
        # Fused Adam/AdamW/SGD skip a step on the device when handed found_inf = 1.
        self._device_skip = bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))
        # --cuda-graphs: the step recorded once and replayed (`train.cuda_graph`); the lr then a
        # device tensor the recorded AdamW reads, and the batch copied into the same tensors.
        self._graph: StepGraph | None = None
        self._lr: torch.Tensor | None = None
        if cfg.run.cuda_graphs:
            check_graphable(
                self.device,
                world_size=world,
                distributed=env.distributed,
                fused_optimizer=self._device_skip,
            )
            # The lr as fused AdamW reads a float one: float32 on CUDA, double on a CPU.
            lr_dtype = torch.float32 if self.device.type == "cuda" else torch.float64
            self._lr = torch.full((), cfg.optim.lr, dtype=lr_dtype, device=self.device)
            micro = (self.rows // accum, cfg.run.seq_len)
            self._inputs = torch.zeros((2, accum, *micro), dtype=torch.long, device=self.device)
            # The step reads the tensors made here (bound now, as the graph's kernels are).
            step = functools.partial(self._recorded_step, self._inputs)
            self._graph = StepGraph(step, self.device)
        self.sampler = BatchSampler(
            data.tokens("train"), cfg.run.seq_len, cfg.run.batch_size, cfg.run.seed
        )
        self.step = 0
        self.val_loss: float | None = None
        self.logger = RunLogger(self.run_dir, env.is_main, cfg.run.tensorboard)
        self._stop_signal: int | None = None
        self._resumed_step: int | None = None  # the step of the checkpoint resumed from
        self.steps_run = 0  # optimizer steps taken by this process
        self._skipped: list[int] = []  # skipped steps not yet named in a log line
        self._last_seen = (math.nan, 0.0)  # loss and tokens/s at the last sync point
        # Throughput and memory of the whole run (carried over from the checkpoint on resume).
        self._train_time = 0.0
        self._train_tokens = 0
        self._peak_before: tuple[float, str] | None = None

    # ---- one step -------------------------------------------------------------------------

    def forward_backward_step(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor:
        """Loss of one micro-batch; gradients (scaled for accumulation) added to ``.grad``."""
        with no_grad_sync(self.model, skip=not sync):
            # A recorded step casts the weights inside the graph, not from autocast's cache.
            with autocast_context(self.device, self.dtype, cache=self._graph is None):
                logits = self.model(x).logits
            loss = next_token_loss(logits, y)
            (loss / self.cfg.run.grad_accum).backward()
        return loss.detach()

    def _optimizer_step(self, finite: torch.Tensor) -> None:
        """``optimizer.step()``, unless ``finite`` (a device bool) is false; see the module doc."""
        opt: Any = self.optimizer
        if self._device_skip:
            opt.found_inf = (~finite).float()  # read by fused Adam(W).step, as GradScaler does
            try:
                opt.step()
            finally:
                del opt.found_inf
            return
        if self.cfg.run.skip_nonfinite:
            if bool(finite):  # a host sync: the price of an exact skip without a fused kernel
                opt.step()
            return
        bad = ~finite
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.masked_fill_(bad, 0.0)
        opt.step()

    def _update(
        self, micro_x: list[torch.Tensor], micro_y: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of the micro-batches, the clip and the optimizer step: (loss, grad norm,
        finite), device tensors."""
        self.optimizer.zero_grad(set_to_none=True)
        accum = len(micro_x)
        losses = [
            self.forward_backward_step(x, y, sync=i == accum - 1)
            for i, (x, y) in enumerate(zip(micro_x, micro_y, strict=True))
        ]
        # The same on every rank (like the gradient norm), so every rank skips the same steps.
        loss = all_reduce_mean(torch.stack(losses).mean(), self.env)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self._clipped, clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self._optimizer_step(finite)
        return loss, grad_norm, finite

    def _recorded_step(self, inputs: torch.Tensor) -> tuple[torch.Tensor]:
        """The step `StepGraph` records: `_update` on the micro-batches in `inputs` (x and y,
        `(2, accum, rows, seq)`), its three numbers packed in one tensor (one copy to take before
        the next replay overwrites it)."""
        xs, ys = inputs
        loss, grad_norm, finite = self._update(list(xs), list(ys))
        return (torch.stack([loss.float(), grad_norm.float(), finite.float()]),)

    def _set_lr(self, lr: float) -> None:
        groups = self.optimizer.param_groups
        if self._lr is None:
            for group in groups:
                group["lr"] = lr
            return
        self._lr.fill_(lr)
        for group in groups:
            if group["lr"] is not self._lr:  # the first step, or a checkpoint loaded over it
                group["lr"], group["capturable"] = self._lr, True

    def train_step(self, step: int) -> StepStats:
        """Optimizer step ``step`` (0-based) on this rank's slice of the global batch.

        Returns the step's numbers as device tensors; nothing here waits for the device.
        """
        cfg, env = self.cfg, self.env
        lr = lr_at(step, cfg.optim.lr, cfg.run.steps, cfg.schedule)
        self._set_lr(lr)
        start = env.rank * self.rows
        x, y = self.sampler.batch(step, start, start + self.rows)
        x, y = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(y, dtype=torch.long)
        accum = cfg.run.grad_accum
        if self._graph is not None:
            batch = torch.stack([x, y]).view(self._inputs.shape)
            self._inputs.copy_(batch, non_blocking=True)
            (packed,) = self._graph()
            loss, grad_norm, finite = packed.clone()  # before the next replay overwrites it
            return StepStats(step + 1, lr, loss, grad_norm, finite > 0)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        loss, grad_norm, finite = self._update(list(x.chunk(accum)), list(y.chunk(accum)))
        return StepStats(step + 1, lr, loss, grad_norm, finite)

    # ---- sync points ------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop_signal = signum  # acted on at the next sync point

    def _stop_requested(self) -> torch.Tensor:
        """1.0 when any rank got a stop signal (a device tensor, all-reduced on env.device)."""
        flag = torch.full((1,), float(self._stop_signal is not None), device=self.device)
        return all_reduce_max(flag, self.env)  # every rank stops at the same step

    def _read_back(self, pending: list[StepStats]) -> tuple[list[tuple[float, float, float]], bool]:
        """The one host sync of a sync point: (loss, grad norm, finite) per pending step, stop."""
        stop = self._stop_requested()
        packed = torch.cat(
            [
                torch.stack([s.loss.float() for s in pending]),
                torch.stack([s.grad_norm.float() for s in pending]),
                torch.stack([s.finite.float() for s in pending]),
                stop.float(),
            ]
        ).tolist()
        n = len(pending)
        rows = list(zip(packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n], strict=True))
        return rows, bool(packed[-1] > 0)

    def _log(self, records: list[dict[str, Any]]) -> None:
        every = max(self.cfg.run.log_interval, 1)
        for record in records:
            if record["step"] % every == 0 or "val_loss" in record:
                if self._skipped:
                    record["skipped_steps"] = self._skipped
                    self._skipped = []
                self.logger.log(record)

    def _sync_point(
        self, pending: list[StepStats], since: float, timed: bool, evaluate: bool
    ) -> bool:
        """Read back ``pending`` (steps begun at ``perf_counter() == since``), raise on the first
        non-finite step (without skip_nonfinite), evaluate, log; True when asked to stop.
        ``timed``: count the interval in the run's throughput (not the warm-up step)."""
        cfg = self.cfg
        tokens_per_step = cfg.run.batch_size * cfg.run.seq_len
        rows, stop = self._read_back(pending)
        seconds = max(time.perf_counter() - since, 1e-9)  # the read-back waited for the device
        if timed:
            self._train_time += seconds
            self._train_tokens += len(pending) * tokens_per_step
        tokens_per_s = len(pending) * tokens_per_step / seconds
        records: list[dict[str, Any]] = []
        for stats, (loss, norm, finite) in zip(pending, rows, strict=True):
            if not finite and not cfg.run.skip_nonfinite:
                self._log(records)
                what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
                raise NonFiniteLossError(
                    f"non-finite {what} ({value}) at step {stats.step}; "
                    "lower --lr, or pass --skip-nonfinite to skip such batches"
                )
            record: dict[str, Any] = {
                "step": stats.step,
                "loss": loss,
                "lr": stats.lr,
                "grad_norm": norm,
                "tokens_per_s": tokens_per_s,
                "tokens": stats.step * tokens_per_step,
                "flops": stats.step * tokens_per_step * self.flops_per_token,
            }
            if not finite:
                record["skipped"] = True
                self._skipped.append(stats.step)
            records.append(record)
        if evaluate:
            records[-1].update(self.evaluate())
            self.val_loss = records[-1]["val_loss"]
        self._log(records)
        self._last_seen = (records[-1]["loss"], tokens_per_s)
        return stop

    # ---- evaluation, checkpoints ------------------------------------------------------------

    def _eval_model(self) -> torch.nn.Module:
        # DDP: the bare module (its forward needs no collectives). FSDP: the sharded model
        # itself, since its forward gathers parameters across ranks.
        return self.model if self.cfg.run.fsdp else unwrap(self.model)

    def _val_loss_sums(self) -> torch.Tensor:
        """``[Σ loss·tokens, Σ tokens]`` over the validation batches, each rank evaluating its
        share, summed over ranks on ``env.device`` (no host sync)."""
        cfg, env = self.cfg, self.env
        # The same eval_batches × batch_size windows (in micro-batch chunks) whatever the world
        # size or grad_accum; batch i is evaluated by rank i % world_size.
        rows, max_batches = self._eval_windows()
        sums = loss_sums(
            self._eval_model(),
            self.data.tokens("val"),
            cfg.run.seq_len,
            rows,
            max_batches,
            self.device,
            self.dtype,
            rank=env.rank,
            world_size=env.world_size,
            lockstep=cfg.run.fsdp and env.distributed,
        )
        return all_reduce_sum(sums, env)

    def _eval_windows(self) -> tuple[int, int | None]:
        """Rows per validation batch and the batch limit of ``_val_loss_sums``."""
        accum = self.cfg.run.grad_accum
        return self.cfg.run.batch_size // accum, self.cfg.run.eval_batches * accum

    def _scored_val_bytes(self) -> int | None:
        """UTF-8 bytes of the validation targets every evaluation scores (the same windows each
        time, `deltalearn.data.textbytes`); None when the tokenizer's bytes per token are unknown
        (not byte-level) or nothing would be scored."""
        from deltalearn.data.textbytes import eval_window_count, scored_bytes, token_byte_lengths
        from deltalearn.errors import DataError

        load = getattr(self.data, "load_tokenizer", None)
        if load is None:
            return None
        val, seq_len = self.data.tokens("val"), self.cfg.run.seq_len
        rows, max_batches = self._eval_windows()
        try:
            lengths = token_byte_lengths(load())
        except DataError:
            return None
        windows = eval_window_count(len(val), seq_len, rows, max_batches)
        return scored_bytes(val, lengths, seq_len, windows) or None

    def evaluate(self) -> dict[str, Any]:
        """Validation loss and bits per byte (same batches every time) and mean β per layer on
        the first batch."""
        from deltalearn.data import eval_batches

        cfg = self.cfg
        total, count = self._val_loss_sums().tolist()
        out: dict[str, Any] = {"val_loss": mean_from_sums(total, count, cfg.run.seq_len)}
        if self._val_bytes:  # Σ NLL in nats / ln 2 / bytes of exactly the scored targets
            out["val_bpb"] = total / math.log(2) / self._val_bytes
        # β is logged by rank 0 only; under FSDP every rank must run the forward with it.
        if cfg.model.variant != "baseline" and (self.env.is_main or cfg.run.fsdp):
            val, rows = self.data.tokens("val"), min(cfg.run.batch_size // cfg.run.grad_accum, 4)
            first = next(iter(eval_batches(val, cfg.run.seq_len, rows, 1)), None)
            if first is not None:
                x = torch.as_tensor(first[0], dtype=torch.long, device=self.device)
                betas = mean_beta_per_layer(self._eval_model(), x)
                if betas is not None:
                    out["beta_mean"] = betas
        return out

    def _run_stats(self) -> dict[str, Any]:
        """Throughput and peak memory of the run so far (saved in each checkpoint)."""
        peak, kind = _peak_memory(self.device)
        if self._peak_before is not None and (self.steps_run == 0 or kind == self._peak_before[1]):
            # a process that trained nothing keeps the figures of those that did
            peak = self._peak_before[0] if self.steps_run == 0 else max(peak, self._peak_before[0])
            kind = self._peak_before[1]
        return {
            "time_s": self._train_time,
            "tokens": self._train_tokens,
            "peak_memory_mb": peak,
            "memory_kind": kind,
        }

    def save(self) -> None:
        extra = {
            "config": asdict(self.cfg),
            "val_loss": self.val_loss,
            "train_stats": self._run_stats(),
        }
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
        self.step = self._resumed_step = int(state["step"])
        self.val_loss = state.get("val_loss")
        stats = state.get("train_stats") or {}
        self._train_time = float(stats.get("time_s", 0.0))
        self._train_tokens = int(stats.get("tokens", 0))
        if "peak_memory_mb" in stats:
            self._peak_before = (float(stats["peak_memory_mb"]), str(stats["memory_kind"]))
        self.logger.truncate_after(self.step)
        return True

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self) -> str:
        """Train until ``run.steps`` (or stop_after, or a signal); returns the status."""
        cfg, env = self.cfg, self.env
        total = cfg.run.steps
        stop_at = min(total, cfg.run.stop_after or total)
        log_every = max(cfg.run.log_interval, 1)
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
        status = "finished"
        pending: list[StepStats] = []
        try:
            self.model.train()
            since = time.perf_counter()
            while self.step < stop_at:
                pending.append(self.train_step(self.step))
                self.step += 1
                self.steps_run += 1
                bar.update(1)
                evaluate = self.step % cfg.run.eval_interval == 0 or self.step == total
                checkpoint = self.step % cfg.run.checkpoint_interval == 0 and self.step < stop_at
                warmup = self.steps_run == 1  # timed apart: compilation, allocator, caches
                sync = evaluate or checkpoint or warmup or self.step == stop_at
                if not sync and self.step % log_every:
                    continue  # no sync point: on to the next step without waiting
                timed = not warmup or self.step == stop_at
                stop = self._sync_point(pending, since, timed, evaluate)
                pending = []
                if not bar.disable:
                    loss, tokens_per_s = self._last_seen
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
                if stop:
                    status = "interrupted"
                    break
                if checkpoint:
                    self.save()
                since = time.perf_counter()
            if status == "finished" and self.step < total:
                status = "stopped"
            if self.steps_run or self._resumed_step != self.step:  # else that checkpoint exists
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
        stats = self._run_stats()
        tokens = self.step * self.cfg.run.batch_size * self.cfg.run.seq_len
        return TrainResult(
            run_dir=str(self.run_dir),
            status=status,
            step=self.step,
            val_loss=self.val_loss,
            params=self.params,
            train_tokens_per_s=stats["tokens"] / stats["time_s"] if stats["time_s"] else 0.0,
            peak_memory_mb=stats["peak_memory_mb"],
            memory_kind=stats["memory_kind"],
            flops_per_token=self.flops_per_token,
            train_flops=tokens * self.flops_per_token,
        )


def _write_summary(run_dir: Path, result: TrainResult, steps_run: int) -> TrainResult:
    """Write ``summary.json`` atomically (it marks the run finished); a process that trained
    no step (resuming a finished run) keeps a complete one as it is, figures and all."""
    if steps_run == 0 and (kept := read_summary(run_dir)) is not None:
        return TrainResult(**{f.name: kept[f.name] for f in fields(TrainResult) if f.name in kept})
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(asdict(result), indent=1))
    return result


def check_run_dir(cfg: TrainConfig, resume: bool) -> None:
    """Refuse a run folder with a path of the wrong kind in it, to overwrite a run without
    ``--resume``, or to resume with a different config — before any data preparation."""
    run_dir = Path(cfg.run.out)
    check_run_paths(run_dir)
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
            barrier(env)
            if not env.is_main:
                data = prepare_data(cfg, progress=False)
        trainer = Trainer(cfg, env, data)
        if env.is_main:  # leftovers of a crash mid-save
            ckpt.clean_temp(run_dir)
            remove_stale_temps(run_dir)
        barrier(env)  # the other ranks look for checkpoints once rank 0 has tidied up
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
                result = _write_summary(run_dir, result, trainer.steps_run)
        return result
    finally:
        shutdown()
