"""What each call of the inference extension takes inside a decode loop, per variant.

A decoded `tiny` token runs each DDL call once a sublayer, between a branch's matrix products that
stream most of the model's weights through the caches: by its next call, a call's code and data
are cold. Timed alone in a loop, an update takes ~1.5 µs; inside decoding, two to three times as
long. This times every call of `update`, `channel_read`, `token_read` and `expand` where decoding
makes it (cached greedy decoding as `deltalearn bench model` times it, the prompt's prefill not
timed, freed memory kept):

    python benchmarks/decode_calls.py [--variants ddl,ddl-cc,ddl-tc] [--size tiny] \
        [--set KEY=VALUE ...] [--tokens 64] [--repeats 5] [--threads 2]

Printed per variant and function: calls a token, the median call, and the calls' time a token.
The first decode (caches allocated, kernels built) is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

FUNCTIONS = ("update", "channel_read", "token_read", "expand")


class _TimedCalls:
    """The extension module with each of `FUNCTIONS` timed (seconds per call, by name) while
    `on`."""

    def __init__(self, module) -> None:
        self.on = False
        self.seconds: dict[str, list[float]] = {name: [] for name in FUNCTIONS}
        for name in FUNCTIONS:
            setattr(self, name, self._timed(name, getattr(module, name)))

    def _timed(self, name, call):
        seconds = self.seconds[name]

        def timed(*args):
            if not self.on:
                return call(*args)
            start = time.perf_counter()
            out = call(*args)
            seconds.append(time.perf_counter() - start)
            return out

        return timed


@torch.no_grad()
def _decode(model, prompt: torch.Tensor, tokens: int, timed: _TimedCalls) -> None:
    """Greedy decoding as `bench model` times it (its loop): the prompt's prefill not timed, then
    one call per token with the cache and the last token, timed."""
    from deltalearn.bench.model import _decode_loop
    from deltalearn.models.outputs import CACHE_FIELD

    out = model(prompt, use_cache=True, logits_to_keep=1)
    timed.on = True
    try:
        last = out.logits[:, -1].argmax(-1, keepdim=True)
        _decode_loop(model, [prompt, last], out[CACHE_FIELD], tokens)
    finally:
        timed.on = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="ddl,ddl-cc,ddl-tc")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    from deltalearn import DeltaLM, DeltaLMConfig
    from deltalearn.bench.model import parse_overrides
    from deltalearn.ops import extension
    from deltalearn.train.host_allocator import keep_freed_memory

    overrides = parse_overrides(args.set)
    torch.set_num_threads(args.threads)
    keep_freed_memory("cpu")  # as `bench model` and the trainer
    real = extension.loaded()
    if real is None:
        raise SystemExit("the inference extension is not built here (see the warning)")
    print(
        f"calls inside a decode loop: {' '.join([args.size, *args.set])}, {args.threads} threads,"
    )
    print(f"{args.repeats} decodes of {args.tokens} tokens after a 64-token prompt, per variant")
    print(
        "| variant | function | calls a token | median µs a call | µs a token |\n|---|---|---|---|---|"
    )
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        model = DeltaLM(DeltaLMConfig.preset(variant, args.size, **overrides)).eval()
        prompt = torch.randint(0, model.config.vocab_size, (1, 64))
        timed = _TimedCalls(real)
        loaded = extension.loaded
        extension.loaded = lambda timed=timed: timed  # what the model's decoding calls look up
        try:
            _decode(model, prompt, args.tokens, timed)  # warm-up, not counted
            for seconds in timed.seconds.values():
                seconds.clear()
            for _ in range(args.repeats):
                _decode(model, prompt, args.tokens, timed)
        finally:
            extension.loaded = loaded
        tokens = args.repeats * args.tokens
        for name, seconds in timed.seconds.items():
            if seconds:
                median = statistics.median(seconds) * 1e6
                per_token = sum(seconds) / tokens * 1e6
                print(f"| {variant} | {name} | {len(seconds) / tokens:.2f} | {median:.2f} | "
                      f"{per_token:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
