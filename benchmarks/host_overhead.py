"""The host's share of an eager training step on the GPU path, measured on any CPU: the model takes
the code path it takes on CUDA (the Triton rewrite and read Functions, `DELTALEARN_EPILOGUE=triton`)
with every kernel launch recorded instead of made (`ops.triton_aot.recording`), at a width where the arithmetic is negligible, so a
step's time is what the host spends issuing it (Python, autograd, the dispatcher, the optimizer).

    python benchmarks/host_overhead.py [--variants baseline,ddl,ddl-cc,ddl-tc] [--repeats 21]
    python benchmarks/host_overhead.py --count [--steps 4] [--jobs 2]   # needs valgrind
    ... [--autocast]   # the forward under bf16 autocast, as `deltalearn train` runs on a GPU
    python benchmarks/host_overhead.py --device cuda [--autocast]   # on a GPU machine

With `--device cuda` the same tiny-width steps run on the GPU, whose arithmetic at this width is
negligible, so a step's wall time is its host time on that machine; each variant's step is timed
twice, interleaved: with the Triton launches recorded instead of made (as on a CPU), and made. The
difference is what Triton's launcher costs the host (its argument binding, specialisation and
cache lookup in Python, then the driver call), which the CPU measurement cannot see.

Why: on the H200, eager training at `small`, 8 × 1024 is bound by the host (the GPU idles 24-47% of
a step, `benchmarks/README.md`). Printed per variant: the autograd nodes and the dispatched ATen ops
of one forward + backward (exact, so a change's effect shows without timing noise), and the host
milliseconds of a whole step, variants interleaved step by step, medians of `--repeats` (this
machine's milliseconds, not the GPU host's: compare ratios; on a shared 2-core VM they drift by
±0.1 between runs).

With `--count`, the host work is counted instead of timed: each variant's steps run in a process of
their own under valgrind's callgrind (one thread, `callgrind_marks.py`), and the instructions of a
step (forward, backward, the clip and AdamW; the untimed gradient reset left out) are printed — the same from
run to run, so a change of 1% shows, where the timings above move by ±0.03 of the ratio. About
four minutes a variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from callgrind_marks import count_between_marks, mark, require_valgrind
from torch.utils._python_dispatch import TorchDispatchMode

from deltalearn import DeltaLM
from deltalearn.bench.model import GRAD_CLIP, ModelBench, build_config
from deltalearn.models.outputs import CACHE_FIELD
from deltalearn.ops import _shapes as shapes
from deltalearn.ops import triton_aot
from deltalearn.train.config import OptimConfig
from deltalearn.train.optim import build_optimizer, stepped_parameters


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def autograd_nodes(loss: torch.Tensor) -> int:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def tiny_model(variant: str, layers: int, device: str = "cpu") -> DeltaLM:
    """The `small` preset's depth and structure at width 64: the arithmetic vanishes, the ops
    stay. A small vocabulary too: AdamW's arithmetic on a (50k × 64) embedding is a real CPU cost
    here (asynchronous GPU work there)."""
    config = build_config(ModelBench(size="small"), variant)
    config.hidden_size, config.num_heads, config.head_dim = 64, 2, 32
    config.num_layers = layers
    config.vocab_size = 256
    torch.manual_seed(0)
    return DeltaLM(config).to(device)


def make_step(variant: str, layers: int, autocast: bool = False, device: str = "cpu"):
    """A training step as `deltalearn train` and `bench model` take it: forward with the loss,
    backward, the gradient-norm clip and the trainer's AdamW (fused, one kernel for every
    parameter). Its per-parameter host work counts: DDL adds four small parameters a sublayer."""
    model = tiny_model(variant, layers, device)
    optimizer = build_optimizer(model, OptimConfig())
    clipped = stepped_parameters(optimizer)  # as the trainer lists them, once
    ids = torch.randint(0, 100, (1, 8)).to(device)
    device_type = torch.device(device).type

    def step(boundary=time.perf_counter) -> float:
        """One training step; returns its host seconds, less the untimed reset of the gradients to
        one ordinary value: the stubbed kernels leave their outputs uninitialised, and the NaNs,
        negative numbers and zeros that would then reach AdamW's state make its square roots 2-8×
        slower on this CPU (7 ms of a ddl step, measured) — arithmetic the GPU does, not host
        work. `boundary` is called around the two timed parts (`mark` when counting)."""
        start = boundary()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        end = boundary()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(1e-3)
        start_optimizer = boundary()
        torch.nn.utils.clip_grad_norm_(clipped, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end_optimizer = boundary()
        return 0.0 if end is None else end - start + end_optimizer - start_optimizer

    def count() -> tuple[int, int]:
        with _CountOps() as counter:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            nodes = autograd_nodes(loss)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return nodes, counter.ops

    return step, count


DECODED_TOKENS = 8  # a decode run's timed tokens, after an untimed 8-token prefill
PHASES = {
    "train": "training step (forward, backward, clip, the trainer's AdamW)",
    "infer": "full-sequence forward (eval, no grad)",
    "decode": "cached decoding, one token a call",
}
UNIT = {"train": "step", "infer": "forward", "decode": "token"}


def make_inference(
    variant: str, layers: int, phase: str, autocast: bool = False, device: str = "cpu"
):
    """`phase` "infer": a full-sequence forward (eval, no grad) of the 1 × 8 tokens; "decode":
    one token at a time with the cache, as `bench model`'s generate measure takes it (the argmax
    stays on the device: no host sync). The run returns its host seconds (decode: a token's)."""
    model = tiny_model(variant, layers, device).eval()
    ids = torch.randint(0, 100, (1, 8)).to(device)
    device_type = torch.device(device).type

    @torch.no_grad()
    def forward(**kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            return model(**kwargs)

    def infer(boundary=time.perf_counter) -> float:
        start = boundary()
        forward(input_ids=ids)
        return boundary() - start

    def prefill():
        return forward(input_ids=ids, use_cache=True, logits_to_keep=1)

    def decode_tokens(out) -> None:
        for _ in range(DECODED_TOKENS):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out[CACHE_FIELD]
            out = forward(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def decode(boundary=time.perf_counter) -> float:
        out = prefill()
        start = boundary()
        decode_tokens(out)
        return (boundary() - start) / DECODED_TOKENS

    def count() -> tuple[int, int]:  # ops of a call, a decoded token's; no autograd graph
        if phase == "infer":
            with _CountOps() as counter:
                infer()
            return 0, counter.ops
        out = prefill()
        with _CountOps() as counter:
            decode_tokens(out)
        return 0, counter.ops // DECODED_TOKENS

    return (infer if phase == "infer" else decode), count


def make_run(variant: str, layers: int, phase: str, autocast: bool = False, device: str = "cpu"):
    """(timed run, op count) of one `phase`: train, infer or decode."""
    if phase == "train":
        return make_step(variant, layers, autocast, device)
    return make_inference(variant, layers, phase, autocast, device)


def counted_child(variant: str, layers: int, steps: int, autocast: bool = False) -> None:
    """The process callgrind watches: warm steps, then `steps` steps with a mark at each boundary
    of their two timed parts (intervals per step: forward + backward, the reset, clip + AdamW)."""
    with triton_aot.recording() as launches:
        step, _ = make_step(variant, layers, autocast)
        for _ in range(3):
            step()
            launches.clear()
        for _ in range(steps):
            step(boundary=mark)
            launches.clear()


def count_instructions(args: argparse.Namespace, variants: list[str]) -> dict[str, int]:
    """Instructions a step takes, per variant (a callgrind run each, `--jobs` at once)."""
    require_valgrind()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def count(variant: str, out: Path) -> int:
        command = [sys.executable, __file__, "--child", variant, "--layers", str(args.layers),
                   "--steps", str(args.steps), *(["--autocast"] if args.autocast else [])]  # fmt: skip
        intervals = count_between_marks(command, env, out / f"cg.{variant}.out")
        # Four marks a step: [forward + backward], [reset], [clip + AdamW], [to the next step's start].
        timed = [n for i, n in enumerate(intervals) if i % 4 in (0, 2)]
        if len(timed) != 2 * args.steps:
            raise RuntimeError(f"{variant}: {len(intervals)} intervals counted, expected more")
        return round(sum(timed) / args.steps)

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        counted = pool.map(lambda v: count(v, Path(tmp)), variants)
        return dict(zip(variants, counted, strict=True))


def time_launches_on_cuda(args: argparse.Namespace, variants: list[str], phase: str) -> None:
    """Each variant's run of `phase` on the GPU, timed with the Triton launches recorded and made,
    in turn."""

    def synced() -> float:  # the GPU drained at both ends: wall time is the host's issue time
        torch.cuda.synchronize()
        return time.perf_counter()

    steps = {v: make_run(v, args.layers, phase, args.autocast, "cuda")[0] for v in variants}
    launches_a_step = {}
    for v, step in steps.items():  # warm both ways: kernels compiled, AdamW state, allocator
        for _ in range(3):
            step(synced)
        with triton_aot.recording(keep_arguments=False) as launches:
            marks: list[int] = []  # launches so far at each boundary: timed parts between pairs

            def counting(marks: list[int] = marks, launches: list = launches) -> float:
                marks.append(len(launches))
                return synced()

            for _ in range(3):
                launches.clear()
                marks.clear()
                step(counting)
            timed = sum(marks[i + 1] - marks[i] for i in range(0, len(marks), 2))
            launches_a_step[v] = timed / (DECODED_TOKENS if phase == "decode" else 1)
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for v, step in steps.items():
            with triton_aot.recording(keep_arguments=False):
                times.setdefault((v, False), []).append(step(synced))
            times.setdefault((v, True), []).append(step(synced))
    median = {key: statistics.median(t) for key, t in times.items()}
    base = median[(variants[0], True)]
    import triton  # the recording needs it anyway

    print(f"{PHASES[phase]}: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; {args.layers} blocks, width 64, 1 × 8 tokens, "
          f"autocast {args.autocast}; medians of {args.repeats}, interleaved")  # fmt: skip
    print(
        f"| variant | Triton launches a {UNIT[phase]} | host ms, launches recorded "
        f"| host ms, launched | launcher µs a launch | {variants[0]} ÷ it, launched |"
    )
    print("|---|---|---|---|---|---|")
    for v in variants:
        recorded, launched, n = median[(v, False)], median[(v, True)], launches_a_step[v]
        per_launch = f"{(launched - recorded) / n * 1e6:.1f}" if n else "–"
        print(
            f"| {v} | {n:g} | {recorded * 1e3:.2f} | {launched * 1e3:.2f} | {per_launch} "
            f"| {base / launched:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="baseline,ddl,ddl-cc,ddl-tc")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--autocast", action="store_true", help="the forward under bf16 autocast")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--count", action="store_true", help="count instructions (valgrind)")
    parser.add_argument("--steps", type=int, default=4, help="steps counted (--count)")
    parser.add_argument("--jobs", type=int, default=2, help="callgrind runs at once (--count)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (see above)")
    parser.add_argument(
        "--phase", default="train", help="comma-separated: train, infer, decode (timed only)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes.SMALL_STATE = (
        0  # the reads of a real-sized state take their Function, not the few-op form
    )
    variants = args.variants.split(",")
    phases = args.phase.split(",")
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"--phase takes {', '.join(PHASES)}; got {', '.join(unknown)}")
    if args.device != "cpu":
        if args.device != "cuda" or not torch.cuda.is_available():
            raise SystemExit(
                f"--device must be cpu, or cuda on a machine with one; got {args.device}"
            )
        for phase in phases:
            time_launches_on_cuda(args, variants, phase)
        return
    if args.child:
        counted_child(args.child, args.layers, args.steps, args.autocast)
        return
    if args.count:
        if args.steps < 1:
            raise SystemExit(f"--steps must be >= 1, got {args.steps}")
        if phases != ["train"]:
            raise SystemExit(f"--count counts training steps only; got --phase {args.phase}")
        counts = count_instructions(args, variants)
        base = counts[variants[0]]
        print(f"| variant | instructions a step | {variants[0]} ÷ it |\n|---|---|---|")
        for v, n in counts.items():
            print(f"| {v} | {n:,} | {base / n:.3f} |")
        return
    for phase in phases:
        time_on_cpu(args, variants, phase)


def time_on_cpu(args: argparse.Namespace, variants: list[str], phase: str) -> None:
    """Each variant's run of `phase` on the Triton path with every launch recorded instead of
    made (the record is dropped), interleaved."""
    with triton_aot.recording() as launches:
        made = {v: make_run(v, args.layers, phase, args.autocast) for v in variants}
        runs = {v: run for v, (run, _) in made.items()}
        counts = {v: count() for v, (_, count) in made.items()}
        for run in runs.values():  # warm: AdamW state, allocator
            for _ in range(3):
                run()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                launches.clear()
                times[v].append(runs[v]())
    base = statistics.median(times[variants[0]])
    ops = "ATen ops fwd + bwd" if phase == "train" else f"ATen ops a {UNIT[phase]}"
    print(f"{PHASES[phase]}:")
    print(f"| variant | autograd nodes | {ops} | host ms a {UNIT[phase]} | {variants[0]} ÷ it |")
    print("|---|---|---|---|---|")
    for v in variants:
        median = statistics.median(times[v])
        nodes, n_ops = counts[v]
        print(f"| {v} | {nodes} | {n_ops} | {median * 1e3:.2f} | {base / median:.2f} |")


if __name__ == "__main__":
    main()
