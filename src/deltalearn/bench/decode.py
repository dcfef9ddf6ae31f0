"""`deltalearn bench decode`: cached generation with the dynamic cache against the fixed-shape
(static) cache, eager and under `torch.compile`, for each variant, in one run:

    dynamic          `DeltaLMCache` (grows by concatenation), eager forward per token
    static           `DeltaLMStaticCache` (pre-allocated, written in place), eager forward
    static-compiled  `DeltaLMStaticCache`, the decode step compiled once (`fullgraph=True`)
    static-graphed   `DeltaLMStaticCache`, the eager decode step recorded as a CUDA graph and
                     replayed (`train.cuda_graph.StepGraph`; CUDA only, not a default mode): a
                     token at the GPU's pace, with no host work between its kernels

Each repeat prefills the prompt (not timed) and then decodes `--tokens` tokens one call each
(greedy, the last token and the cache, no `generate` overhead). Modes and variants are timed
interleaved and summarised by the median; every ratio is against the same variant's `dynamic`
row. The compiled step is traced and compiled before timing; its compile time is reported.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from deltalearn.bench.model import ModelBench, build_config
from deltalearn.bench.timing import (
    format_table,
    interleaved_samples,
    paired_ratio_quartiles,
    quartiles_as_text,
    settings_report,
    size_text,
    timed,
)
from deltalearn.errors import ConfigError
from deltalearn.train.cuda_graph import StepGraph

MODES = ("dynamic", "static", "static-compiled", "static-graphed")
DEFAULT_MODES = MODES[:3]


@dataclass
class DecodeBench:
    """The settings of one `bench decode` run (every field is a command-line option)."""

    variants: list[str] = field(default_factory=lambda: ["baseline", "ddl", "ddl-cc", "ddl-tc"])
    size: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    batch: int = 1
    prompt: int = 64
    tokens: int = 64
    dtype: str = "float32"
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" = CUDA graphs on a GPU
    repeats: int = 5
    device: str = "cpu"

    def check(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"--modes takes {', '.join(MODES)}; got {bad or self.modes}")
        for name in ("batch", "prompt", "tokens", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be an integer >= 1, got {value!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if "static-graphed" in self.modes and torch.device(self.device).type != "cuda":
            raise ConfigError(
                f"--modes static-graphed records a CUDA graph: it needs --device cuda, not "
                f"{self.device!r}"
            )


class DecodeRun:
    """One variant in one mode: its model, cache and compiled step, ready to time."""

    def __init__(self, bench: DecodeBench, variant: str, mode: str) -> None:
        from deltalearn import DeltaLM
        from deltalearn.models import DeltaLMStaticCache

        cfg = build_config(ModelBench(size=bench.size, overrides=bench.overrides), variant)
        self.device = torch.device(bench.device)
        torch.manual_seed(0)
        self.model = DeltaLM(cfg).to(self.device).eval()
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, cfg.vocab_size, (bench.batch, bench.prompt), generator=gen)
        self.prompt, self.tokens = prompt.to(self.device), bench.tokens
        self.dtype = getattr(torch, bench.dtype)
        self.cache = None
        if mode != "dynamic":
            length = bench.prompt + bench.tokens + 1
            self.cache = DeltaLMStaticCache(config=cfg, max_cache_len=length)
        self.step = self._eager_step
        self.compile_seconds = None
        # static-graphed: the token fed back through one buffer the recorded step reads and writes
        self.graphed = mode == "static-graphed"
        self._token: torch.Tensor | None = None
        self._graph: StepGraph | None = None
        self.compiled = mode == "static-compiled"
        if self.compiled:
            self.step = torch.compile(self._eager_step, fullgraph=True, mode=bench.compile_mode)
            t0 = time.perf_counter()
            self.decode()  # traces and compiles the decode step
            self.compile_seconds = time.perf_counter() - t0

    def autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.dtype != torch.float32
        # No cache of cast weights for a recorded step: a cast made before the recording would be
        # read from memory freed when the context ends.
        cache = not self.graphed
        return torch.autocast(self.device.type, self.dtype, enabled=enabled, cache_enabled=cache)

    def _eager_step(self, token: torch.Tensor, cache) -> tuple[torch.Tensor, Any]:
        from deltalearn.models.outputs import CACHE_FIELD

        out = self.model(token, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out[CACHE_FIELD]

    def _graphed_step(self) -> tuple[torch.Tensor]:
        """One decoded token from and into `_token`, the step `StepGraph` records."""
        assert self._token is not None
        token, _ = self._eager_step(self._token, self.cache)
        self._token.copy_(token)
        return (self._token,)

    @torch.no_grad()
    def decode(self) -> float:
        """Prefill (not timed), then the decode loop; returns the loop's seconds. static-graphed:
        the first call's first tokens are the warm-up and the recording (`StepGraph`)."""
        with self.autocast():
            if self.cache is not None:
                self.cache.reset()  # in place: the compiled step keeps its buffers
            token, cache = self._eager_step(self.prompt, self.cache)
            if self.graphed:
                if self._graph is None:
                    self._token = token.clone()
                    self._graph = StepGraph(self._graphed_step, self.device)  # CPU: stand-in
                else:
                    assert self._token is not None
                    self._token.copy_(token)
                graph = self._graph
                return timed(lambda: [graph() for _ in range(self.tokens)], self.device)()

            def loop() -> None:
                nonlocal token, cache
                for _ in range(self.tokens):
                    token, cache = self.step(token, cache)
                    if self.compiled:  # a CUDA graph's output is overwritten by its next replay
                        token = token.clone()

            return timed(loop, self.device)()


def decode_benchmark(bench: DecodeBench) -> list[dict[str, object]]:
    """One row per (variant, mode): decode tokens/s, its ratio to the variant's row in the first
    mode, and to the first variant's row (the baseline) in the same mode."""
    bench.check()
    torch._dynamo.reset()
    limit = 8 * len(bench.variants)  # one compiled step per variant, plus dynamo's own margin
    with torch._dynamo.config.patch(recompile_limit=limit):
        runs = {(v, m): DecodeRun(bench, v, m) for v in bench.variants for m in bench.modes}
        fns: dict[tuple[str, str], Callable[[], float]] = {k: r.decode for k, r in runs.items()}
        samples = interleaved_samples(fns, bench.repeats, warmup=1)
    first, base = bench.modes[0], bench.variants[0]
    rows = []
    for (variant, mode), run in runs.items():
        seconds = samples[(variant, mode)]
        rows.append(
            {
                "variant": variant,
                "mode": mode,
                "decode_tokens_per_s": bench.batch * bench.tokens / statistics.median(seconds),
                "compile_s": run.compile_seconds,
                "decode_seconds_by_round": seconds,
                # the speed-up over the first mode, and over the baseline in this mode, round by
                # round: median and quartiles
                f"x_{first}_quartiles": paired_ratio_quartiles(samples[(variant, first)], seconds),
                "x_baseline_quartiles": paired_ratio_quartiles(samples[(base, mode)], seconds),
            }
        )
    speed = {(r["variant"], r["mode"]): r["decode_tokens_per_s"] for r in rows}
    for row in rows:
        row[f"x_{first}"] = row["decode_tokens_per_s"] / speed[(row["variant"], first)]
        row["x_baseline"] = row["decode_tokens_per_s"] / speed[(base, row["mode"])]
    return rows


def decode_report(bench: DecodeBench, rows: list[dict[str, object]]) -> dict[str, object]:
    return settings_report("decode", torch.device(bench.device), bench, rows)


def format_decode_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    reference = s["modes"][0]
    head = [
        f"decode benchmark on {report['machine']}, torch {report['torch']}, {report['date']}",
        f"{size_text(s)}, {s['dtype']}, batch {s['batch']}, "
        f"prompt {s['prompt']}, {s['tokens']} decoded tokens, compile mode {s['compile_mode']}; "
        f"median of {s['repeats']}; ratios against each variant's {reference} row, and against "
        f"{s['variants'][0]} in the same mode (by round: the ratio's median and quartiles over "
        "the rounds)",
    ]
    columns = {
        "variant": "variant",
        "mode": "cache / step",
        "decode_tokens_per_s": "decode tok/s",
        f"x_{reference}": f"× {reference}",
        f"x_{reference}_quartiles": "by round",
        "x_baseline": f"× {s['variants'][0]}",
        "x_baseline_quartiles": "by round",
        "compile_s": "compile s",
    }
    rows = [quartiles_as_text(row) for row in report["rows"]]
    return "\n".join([*head, format_table(rows, columns)])
