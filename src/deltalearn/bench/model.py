"""`deltalearn bench model`: what a user of each DeltaLM variant feels, against the first variant
(the additive baseline by default), all measured in one run:

    train     tokens/s of one training step as `deltalearn train` takes it: forward with the loss,
              backward, grad-norm clip 1.0, AdamW (the trainer's groups and betas)
    infer     tokens/s of a full-sequence forward, eval mode, under `torch.no_grad`
    generate  tokens/s of cached greedy decoding: prefill the prompt (not timed), then one call
              per new token with the cache and the last token (argmax, no `generate` overhead)
    memory    peak bytes allocated during one training step above the resident parameters and
              AdamW state (CUDA: `max_memory_allocated`; CPU: PyTorch's CPU allocator as reported
              by `torch.profiler` memory events — both deterministic, neither counts caching)

Variants are timed interleaved (A B C A B C ...) and summarised by the median; `--dtype bfloat16`
runs every measurement under bf16 autocast (weights and AdamW state stay fp32, as in training).

Model FLOPs: `train` and `infer` also report the achieved GFLOP/s, tokens/s × the analytic model
FLOPs per token of `deltalearn.models.flops` (forward + backward, or forward only; matmuls,
attention over the whole window, no activation-checkpointing recompute), and the model FLOPs
utilisation MFU = achieved / peak. The peak is `--peak-tflops`, else NVIDIA's dense datasheet
figure for a known GPU (A100, H100, H200) at the run's dtype (fp32, TF32 when matmuls may use it,
or bf16); on a CPU, or an unknown GPU, MFU is left out unless `--peak-tflops` is given.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from deltalearn.bench.timing import (
    format_table,
    interleaved_samples,
    paired_ratio_quartiles,
    quartiles_as_text,
    run_header,
    size_text,
    sync,
    timed,
)
from deltalearn.errors import ConfigError
from deltalearn.ops import backend, compiled_kernels, epilogue, state_chain, state_tape
from deltalearn.train import host_allocator
from deltalearn.train.cuda_graph import StepGraph
from deltalearn.train.optim import stepped_parameters

MEASURES = ("train", "infer", "generate", "memory")
DEFAULT_VARIANTS = ("baseline", "ddl", "ddl-cc", "ddl-tc", "write-only-cc")
IMPLS = ("default", "reference")
DTYPES = ("float32", "bfloat16")
GRAD_CLIP = 1.0  # the trainer's default

NOTES = {
    "train": "tokens/s of forward + loss + backward + grad clip + AdamW step (train mode)",
    "infer": "tokens/s of a full-sequence forward (eval mode, no_grad)",
    "generate": "tokens/s of cached greedy decoding, one token per call; prefill not timed",
    "memory": "peak MB allocated during one training step above the resident parameters + AdamW "
    "state (CUDA: max_memory_allocated; CPU: CPU-allocator events from torch.profiler)",
    "first_call": "with --compile: seconds of each variant's first train / infer call, which "
    "traces and compiles it (not in the medians)",
    "flops": "GFLOP/s = tokens/s × model FLOPs per token (deltalearn.models.flops: matmuls and "
    "attention, forward + backward for train, no checkpointing recompute); MFU = GFLOP/s / peak",
}

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets: (name part, {precision: peak}),
# first match wins. NVL and MIG parts are left out (their peaks differ), as is every other GPU.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"float32": 51.0, "tf32": 378.0, "bfloat16": 756.0}),
    ("H100", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),  # SXM
    ("H200", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),  # SXM
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
)


def device_peak_tflops(device_name: str, dtype: str, tf32: bool = False) -> float | None:
    """The table's dense peak TFLOP/s of `device_name` for `dtype` ("float32", with `tf32` when
    fp32 matmuls may use TF32, or "bfloat16"); None for a device it does not list."""
    if "NVL" in device_name or "MIG" in device_name:
        return None
    precision = "tf32" if dtype == "float32" and tf32 else dtype
    for part, peaks in PEAK_TFLOPS:
        if part in device_name:
            return peaks.get(precision)
    return None


def resolve_peak(bench: ModelBench) -> tuple[float | None, str]:
    """The peak TFLOP/s that MFU divides by, and where it comes from."""
    if bench.peak_tflops is not None:
        return float(bench.peak_tflops), "--peak-tflops"
    device = torch.device(bench.device)
    if device.type != "cuda":
        return None, "none for a CPU: pass --peak-tflops for MFU"
    name = torch.cuda.get_device_name(device)
    tf32 = torch.get_float32_matmul_precision() != "highest"
    peak = device_peak_tflops(name, bench.dtype, tf32)
    if peak is None:
        return None, f"none known for {name}: pass --peak-tflops for MFU"
    precision = "tf32" if bench.dtype == "float32" and tf32 else bench.dtype
    return peak, f"{name}, {precision} dense (NVIDIA datasheet)"


@dataclass
class ModelBench:
    """The settings of one `bench model` run (every field is a command-line option)."""

    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    size: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # --set: DeltaLMConfig fields
    batch: int = 8
    seq: int = 256
    dtype: str = "float32"
    impl: str = "default"  # "reference": every DeltaUpdate uses the plain (unfused) operator
    compile: bool = False
    checkpointing: bool = False  # activation checkpointing per block (training measurements)
    cuda_graphs: bool = False  # train, infer: the step recorded as a CUDA graph and replayed
    measures: list[str] = field(default_factory=lambda: list(MEASURES))
    gen_prompt: int = 64
    gen_tokens: int = 64
    gen_batch: int = 1
    # Copies of each model that decoding takes turns on, repeat by repeat: on a CPU where the
    # weights lie in memory moves one-token decoding by a few per cent (three copies of one model,
    # median of 11 each: 2064-2172 µs a token at `tiny`), so the median spans several placements.
    gen_instances: int = 3
    repeats: int = 5
    device: str = "cpu"
    peak_tflops: float | None = None  # MFU's denominator; None: the table of known GPUs

    def check(self) -> None:
        """Raise `ConfigError` (one line) for the first bad setting, configs included."""
        for name in (
            "batch",
            "seq",
            "gen_prompt",
            "gen_tokens",
            "gen_batch",
            "gen_instances",
            "repeats",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be an integer >= 1, got {value}"
                )
        peak = self.peak_tflops
        if peak is not None and (
            isinstance(peak, bool) or not isinstance(peak, int | float) or not 0 < peak < 1e6
        ):
            raise ConfigError(f"--peak-tflops must be a number > 0 (TFLOP/s), got {peak}")
        _check_choices("--measure", self.measures, MEASURES)
        _check_choices("--dtype", [self.dtype], DTYPES)
        _check_choices("--impl", [self.impl], IMPLS)
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"--variants must name distinct presets, got {self.variants}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: CUDA is not available on this machine")
        if self.cuda_graphs and (device.type != "cuda" or self.compile or self.checkpointing):
            raise ConfigError(
                "--cuda-graphs records the eager step on a CUDA device: not with --device "
                f"{self.device}, --compile or --activation-checkpointing"
            )
        for variant in self.variants:
            build_config(self, variant)


def _check_choices(option: str, values: list[str], allowed: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"{option} takes {', '.join(allowed)}; got {bad or values}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as config overrides (values YAML-parsed: `256` is an int)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (a DeltaLMConfig field), got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def build_config(bench: ModelBench, variant: str):
    """The `DeltaLMConfig` of `variant` at `bench.size` with the `--set` overrides (validated)."""
    from deltalearn import DeltaLMConfig

    try:
        return DeltaLMConfig.preset(variant, bench.size, **bench.overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"variant {variant!r}, size {bench.size!r}, --set: {e}") from None


@dataclass
class VariantRun:
    """One variant's model, optimizer and inputs, and the three things a user does with them."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ids: torch.Tensor  # (batch, seq) training / inference tokens
    prompt: torch.Tensor  # (gen_batch, gen_prompt)
    gen_tokens: int
    dtype: torch.dtype
    gen_instances: int = 1
    graphs: bool = False  # train_step and infer replay recorded CUDA graphs (`--cuda-graphs`)
    _graph: StepGraph | None = None
    _infer_graph: StepGraph | None = None
    _clipped: list[torch.Tensor] = field(default_factory=list)  # as the trainer lists them, once
    _decoders: list[torch.nn.Module] = field(default_factory=list)
    _decoded: int = 0

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        device = self.ids.device.type
        enabled = self.dtype != torch.float32
        return torch.autocast(device, dtype=self.dtype, enabled=enabled, cache_enabled=cache)

    def train_step(self) -> None:
        """One training step; with `graphs`, replayed (the first call also runs the warm-up
        steps and records the graph, `train.cuda_graph`)."""
        if not self.graphs:
            self.eager_train_step()
            return
        if self._graph is None:
            for group in self.optimizer.param_groups:  # its lr stays a float: the same each step
                group["capturable"] = True
            # a recorded step casts inside the graph, not from autocast's cache
            step = functools.partial(self._step, cast_cache=False)
            self._graph = StepGraph(step, self.ids.device)
        self._graph.replay()

    def eager_train_step(self) -> None:
        """The step as `deltalearn train` takes it without `--cuda-graphs` (and the one `memory`
        measures: a recorded step's pool holds the same tensors)."""
        self._step()
        self.optimizer.zero_grad(set_to_none=True)

    def _step(self, cast_cache: bool = True) -> tuple[torch.Tensor]:
        """Forward with the loss, backward, the clip and AdamW, as the trainer takes them; the
        gradients are left for the caller (or the next recorded step) to drop."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast(cache=cast_cache):
            loss = self.model(self.ids, labels=self.ids).loss
        loss.backward()
        if not self._clipped:
            self._clipped = stepped_parameters(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self._clipped, GRAD_CLIP)
        self.optimizer.step()
        return (loss.detach(),)

    @torch.no_grad()
    def infer(self) -> None:
        """One full-sequence forward; with `graphs`, replayed (the first call also runs the
        warm-up forwards and records the graph)."""
        self.model.eval()
        if not self.graphs:
            self._forward()
            return
        if self._infer_graph is None:
            forward = functools.partial(self._forward, cast_cache=False)
            self._infer_graph = StepGraph(forward, self.ids.device)
        self._infer_graph.replay()

    def _forward(self, cast_cache: bool = True) -> tuple[torch.Tensor]:
        with self.autocast(cache=cast_cache):
            return (self.model(self.ids).logits,)

    def decode_seconds(self) -> float:
        """One timed decode, on the next of `gen_instances` copies of the model (made at the
        first call, from the weights as they are then)."""
        if not self._decoders:
            self._decoders = [self.model]
            self._decoders += [copy.deepcopy(self.model) for _ in range(self.gen_instances - 1)]
        model = self._decoders[self._decoded % len(self._decoders)]
        self._decoded += 1
        model.eval()
        with self.autocast():
            return greedy_decode(model, self.prompt, self.gen_tokens)[1]


def build_variant(bench: ModelBench, variant: str) -> VariantRun:
    """Model (seed 0, `--impl` applied, compiled in place if asked), the trainer's AdamW, inputs."""
    from deltalearn import DeltaLM
    from deltalearn.nn import DeltaUpdate
    from deltalearn.train.config import OptimConfig
    from deltalearn.train.optim import build_optimizer

    device = torch.device(bench.device)
    cfg = build_config(bench, variant)
    torch.manual_seed(0)
    model = DeltaLM(cfg).to(device)
    if bench.impl == "reference":
        for module in model.modules():
            if isinstance(module, DeltaUpdate):
                module.fused = False
    if bench.checkpointing:
        model.activation_checkpointing_enable()  # as the trainer's --activation-checkpointing
    if bench.compile:
        model.compile()  # in place, as the trainer does
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (bench.batch, bench.seq), generator=gen)
    prompt = torch.randint(0, cfg.vocab_size, (bench.gen_batch, bench.gen_prompt), generator=gen)
    return VariantRun(
        model=model,
        optimizer=build_optimizer(model, OptimConfig()),
        ids=ids.to(device),
        prompt=prompt.to(device),
        gen_tokens=bench.gen_tokens,
        dtype=getattr(torch, bench.dtype),
        gen_instances=1 if bench.compile else bench.gen_instances,  # a copy would compile anew
        graphs=bench.cuda_graphs,
    )


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, float]:
    """Prefill `prompt` `(B, P)`, take its argmax, then decode `new_tokens` more one call each
    (cache + last token). Returns the ids `(B, P + 1 + new_tokens)` and the decode loop's seconds.
    """
    from deltalearn.models.outputs import CACHE_FIELD

    out = model(prompt, use_cache=True, logits_to_keep=1)
    tokens = [prompt, out.logits[:, -1].argmax(-1, keepdim=True)]
    cache = out[CACHE_FIELD]
    run = timed(lambda: _decode_loop(model, tokens, cache, new_tokens), prompt.device)
    seconds = run()
    return torch.cat(tokens, dim=1), seconds


def _decode_loop(model: torch.nn.Module, tokens: list[torch.Tensor], cache, n: int) -> None:
    from deltalearn.models.outputs import CACHE_FIELD

    for _ in range(n):
        out = model(tokens[-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out[CACHE_FIELD]
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))


def resident_bytes(run: VariantRun) -> int:
    """Bytes of the parameters, buffers and optimizer state (distinct storages)."""
    tensors = [*run.model.parameters(), *run.model.buffers()]
    tensors += [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()
    )


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated while `step` runs, above what was allocated before it (see `NOTES`).

    Run one step first, so that lazily created state (AdamW moments, compiled graphs) is resident.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints a line when it starts and stops
        prof.start()
    try:
        step()
    finally:
        with _quiet_stderr():
            prof.stop()
    # Each allocation (+bytes) and free (-bytes) of the CPU allocator, in order: a running sum.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def model_benchmark(bench: ModelBench) -> list[dict[str, object]]:
    """One row per variant (in order) with each measured figure and its ratio to the first."""
    bench.check()
    if not bench.compile:
        return _measure(bench)
    # Every variant compiles the same `DeltaLM.forward` in several modes (train, eval, prefill,
    # cached decode), more than dynamo's default 8 entries per function: past the limit it would
    # silently run the rest eagerly.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8 * len(bench.variants)):
        return _measure(bench)


def _measure(bench: ModelBench) -> list[dict[str, object]]:
    device = torch.device(bench.device)
    host_allocator.keep_freed_memory(device)  # as `deltalearn train` runs on a CPU
    runs = {v: build_variant(bench, v) for v in bench.variants}
    rows: dict[str, dict[str, object]] = {
        v: {"variant": v, "params_M": sum(p.numel() for p in r.model.parameters()) / 1e6}
        for v, r in runs.items()
    }
    train_tokens = bench.batch * bench.seq
    timings: dict[str, tuple[Callable[[VariantRun], Callable[[], float]], int, int]] = {
        "train": (lambda r: timed(r.train_step, device), train_tokens, 2),
        "infer": (lambda r: timed(r.infer, device), train_tokens, 2),
        "generate": (lambda r: r.decode_seconds, bench.gen_batch * bench.gen_tokens, 1),
    }
    for measure, (make, tokens, warmup) in timings.items():
        if measure not in bench.measures:
            continue
        fns = {v: make(r) for v, r in runs.items() if "error" not in rows[v]}
        first_calls = _first_calls(fns, rows, measure, bench.variants[0])
        if bench.compile:  # the first call of each compiled function traces and compiles it
            for v, seconds in first_calls.items():
                rows[v][f"{measure}_first_call_s"] = seconds
        fns = {v: fn for v, fn in fns.items() if v in first_calls}
        samples = interleaved_samples(fns, bench.repeats, max(warmup - 1, 0))  # after the first
        for v in fns:
            rows[v][f"{measure}_seconds_by_round"] = samples[v]
            rows[v][f"{measure}_tokens_per_s"] = tokens / statistics.median(samples[v])
        _add_ratios(rows, f"{measure}_tokens_per_s", f"{measure}_ratio")
        reference = samples[bench.variants[0]]
        for v in fns:
            rows[v][f"{measure}_ratio_quartiles"] = paired_ratio_quartiles(reference, samples[v])
        if measure in ("train", "infer"):
            _add_flops(rows, {v: runs[v] for v in fns}, bench, measure)
    if "memory" in bench.measures:
        for v, run in runs.items():
            if "error" in rows[v]:
                continue
            run.eager_train_step()  # lazily created state (AdamW moments, compiled code) resident
            rows[v]["step_peak_MB"] = step_peak_bytes(run.eager_train_step, device) / 2**20
            rows[v]["resident_MB"] = resident_bytes(run) / 2**20
        _add_ratios(rows, "step_peak_MB", "memory_ratio")
    return list(rows.values())


def _first_calls(
    fns: dict[str, Callable[[], float]],
    rows: dict[str, dict[str, object]],
    measure: str,
    reference: str,
) -> dict[str, float]:
    """Each variant's first call of `measure` (compiled: its trace and compile), in seconds, as
    each one ends — printed on stderr, since compiling takes minutes a variant at `small`. A
    variant whose call raises gets `error` in its row and is measured no further (the run's other
    figures still come out; the command exits 1); the reference (first) variant's error is raised:
    nothing could be compared with it."""
    seconds = {}
    for v, fn in fns.items():
        try:
            seconds[v] = fn()
        except Exception as error:
            if v == reference:
                raise
            rows[v]["error"] = f"{measure}: {type(error).__name__}: {error}"
            print(f"{measure}: {v} FAILED: {rows[v]['error']}", file=sys.stderr, flush=True)
            continue
        print(f"{measure}: {v} first call {seconds[v]:.1f} s", file=sys.stderr, flush=True)
    return seconds


def _add_flops(
    rows: dict[str, dict[str, object]], runs: dict[str, VariantRun], bench: ModelBench, measure: str
) -> None:
    """Model FLOPs per token, achieved GFLOP/s and (with a peak) MFU of `measure`."""
    from deltalearn.models.flops import flops_per_token

    peak, _ = resolve_peak(bench)
    for v, run in runs.items():
        count = flops_per_token(run.model.config, bench.seq)
        per_token = count.train if measure == "train" else count.forward
        achieved = float(rows[v][f"{measure}_tokens_per_s"]) * per_token  # type: ignore[arg-type]
        rows[v][f"{measure}_flops_per_token"] = per_token
        rows[v][f"{measure}_gflops_per_s"] = achieved / 1e9
        if peak is not None:
            rows[v][f"{measure}_mfu"] = achieved / (peak * 1e12)


def _add_ratios(rows: dict[str, dict[str, object]], key: str, ratio: str) -> None:
    reference = next(iter(rows.values()))[key]
    for row in rows.values():
        if key in row:  # not where the variant failed
            row[ratio] = row[key] / reference


def fast_path_switches() -> dict[str, str]:
    """The fast-path switches a run went by (`DELTALEARN_EPILOGUE` and the on/off ones): runs that
    differ only in one of them, an A/B of it, say so in their reports."""
    flags = {
        "update_kernel": epilogue.update_kernel_enabled(),
        "fused_read": epilogue.fused_read_enabled(),
        "rebuild_states": state_tape.rebuild_enabled(),
        "compiled_kernels": compiled_kernels.enabled(),
        "compiled_rebuild": state_chain.enabled(),
    }
    return {"backend": backend.backend(), **{k: "on" if v else "off" for k, v in flags.items()}}


def model_report(bench: ModelBench, rows: list[dict[str, object]]) -> dict[str, object]:
    """The JSON report: machine, torch, date, settings, definitions and rows."""
    notes = {m: NOTES[m] for m in MEASURES if m in bench.measures}
    if {"train", "infer"} & set(bench.measures):
        notes["flops"] = NOTES["flops"]
    if bench.compile and {"train", "infer"} & set(bench.measures):
        notes["first_call"] = NOTES["first_call"]
    peak, source = resolve_peak(bench)
    return {
        "benchmark": "model",
        **run_header(torch.device(bench.device)),
        "peak_tflops": peak,
        "peak_source": source,
        # CPU runs: whether glibc keeps freed memory (train.host_allocator), as training does.
        "cpu_allocator": "keep" if host_allocator.applied() else "default",
        "reference": bench.variants[0],
        "settings": dataclasses.asdict(bench),
        "fast_paths": fast_path_switches(),
        "notes": notes,
        "rows": rows,
    }


def format_model_report(report: dict[str, Any]) -> str:
    """The printed form: machine line, settings, definitions, then the table."""
    s, ref = report["settings"], report["reference"]
    copies = 1 if s["compile"] else s.get("gen_instances", 1)
    gen_copies = f" on {copies} copies of each model in turn" if copies > 1 else ""
    lines = [
        f"model benchmark on {report['machine']}, torch {report['torch']}, {report['date']}",
        f"{size_text(s)}, batch {s['batch']} x seq {s['seq']}, "
        f"{s['dtype']}, impl {s['impl']}{', compiled' if s['compile'] else ''}{', checkpointed' if s.get('checkpointing') else ''}"
        f"{', train and infer replayed as CUDA graphs' if s.get('cuda_graphs') else ''}, "
        f"generate: batch {s['gen_batch']}, prompt {s['gen_prompt']}, {s['gen_tokens']} tokens"
        f"{gen_copies}; "
        f"median of {s['repeats']} (by round: the ratio's median and quartiles over the "
        "rounds, each round running every variant back to back)",
        *(f"  {m}: {note}" for m, note in report["notes"].items()),
    ]
    switches = report.get("fast_paths")
    if switches:
        lines.append("  fast paths: " + ", ".join(f"{k} {v}" for k, v in switches.items()))
    if report.get("cpu_allocator") == "keep":
        lines.append(
            "  cpu allocator: freed memory kept for reuse (deltalearn.train.host_allocator)"
        )
    if "flops" in report["notes"]:
        peak = report.get("peak_tflops")
        lines.append(
            f"  peak: {peak:g} TFLOP/s ({report['peak_source']})"
            if peak is not None
            else f"  peak: {report.get('peak_source', 'none')}"
        )
    x = f"× {ref}"
    rows = [quartiles_as_text(row) for row in report["rows"]]
    columns = {
        "variant": "variant",
        "params_M": "params M",
        "train_tokens_per_s": "train tok/s",
        "train_ratio": x,
        "train_ratio_quartiles": "by round",
        "train_gflops_per_s": "train GFLOP/s",
        "train_mfu": "train MFU",
        "infer_tokens_per_s": "infer tok/s",
        "infer_ratio": x,
        "infer_ratio_quartiles": "by round",
        "infer_mfu": "infer MFU",
        "generate_tokens_per_s": "decode tok/s",
        "generate_ratio": x,
        "generate_ratio_quartiles": "by round",
        "step_peak_MB": "step peak MB",
        "memory_ratio": x,
        "resident_MB": "resident MB",
        "train_first_call_s": "train 1st call s",
        "infer_first_call_s": "infer 1st call s",
        "error": "failed",
    }
    return "\n".join([*lines, format_table(rows, columns)])
