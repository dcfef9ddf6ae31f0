"""`torch.compile` on every preset: the training forward is one graph (no graph breaks), the
compiled forward gives the eager logits and loss, and the compiled backward the eager gradients.
One layer (two where a read is carried from block to block), vocab 256, 2 x 16 tokens."""

from __future__ import annotations

import pytest
import torch
from model_helpers import assert_compiled_gradients_are_eager
from torch._dynamo.utils import counters

from deltalearn import DeltaLM, DeltaLMConfig
from deltalearn.models import VARIANTS
from deltalearn.ops import switches
from deltalearn.train.validation import mean_beta_per_layer

PRESETS = list(VARIANTS)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every preset compiles the same forward: start each from a clean cache
    yield
    torch._dynamo.reset()


def _model_and_ids(variant: str, layers: int = 1) -> tuple[DeltaLM, torch.Tensor]:
    torch.manual_seed(0)
    config = DeltaLMConfig.preset(variant, "tiny", num_layers=layers, vocab_size=256)
    return DeltaLM(config).train(), torch.randint(
        0, 256, (2, 16), generator=torch.Generator().manual_seed(1)
    )


def test_all_nine_presets_are_covered():  # the paper's eight and the expanded additive control
    assert len(PRESETS) == 9


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("variant", PRESETS)
def test_training_forward_has_no_graph_breaks(variant, autocast):
    model, ids = _model_and_ids(variant)

    def forward(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(ids, labels=ids)

    explained = torch._dynamo.explain(forward)(ids)
    reasons = [
        f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}"
        for b in explained.break_reasons
    ]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.slow  # inductor's C++ codegen: ~3 min for all eight on 2 cold cores, ~40 s warm
@pytest.mark.parametrize("variant", PRESETS)
def test_compiled_forward_equals_eager(variant):
    model, ids = _model_and_ids(variant)
    eager = model(ids, labels=ids)
    compiled = torch.compile(model, fullgraph=True)(ids, labels=ids)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=0, atol=1e-5)


# Each traced backward once: the delta and write-only rewrites of a vector state, the CC read with
# the EC expansion, the TC read with the repeat expansion, write-only and additive with CC.
GRADIENT_PRESETS = ["ddl", "write-only", "ddl-cc", "ddl-tc-noec", "write-only-cc", "additive-cc"]


@pytest.mark.slow  # a forward and a backward graph each: ~10 s a preset on 2 cold cores
@pytest.mark.parametrize("variant", GRADIENT_PRESETS)
def test_compiled_training_step_gives_the_eager_gradients(variant):
    """`deltalearn train --compile` trains on the gradients of Inductor's backward graph, which
    runs the rewrite's hand-written backward as traced code (the C and Triton kernels step aside
    under compile): they must be the eager path's, for every parameter."""
    assert_compiled_gradients_are_eager(*_model_and_ids(variant))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddl-cc", "write-only-cc"])
def test_compiled_gradients_through_a_read_carried_to_the_next_block(variant):
    """Two blocks: the first block's MLP rewrite makes the second block's channel read (one pass
    over the state, `ops.traced_epilogue`), which one block never does. Inductor's CPU code on
    torch 2.11 compiled an earlier form of that read into wrong gradients for every parameter
    below it while one-block models trained right."""
    assert_compiled_gradients_are_eager(*_model_and_ids(variant, layers=2))


@pytest.mark.parametrize("variant", PRESETS)
def test_checkpointed_training_forward_has_no_graph_breaks(variant):
    """`deltalearn train --compile --activation-checkpointing`: each checkpointed block traces
    whole. A block that wrote to the forward's shared context (the carried channel read's slot,
    even to clear it) broke the graph at every block of a CC model ("HOP: Unsafe side effect"),
    which then ran eagerly."""
    model, ids = _model_and_ids(variant, layers=2)
    model.gradient_checkpointing_enable()
    explained = torch._dynamo.explain(lambda ids: model(ids, labels=ids))(ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc"])
def test_compiled_checkpointed_training_gives_the_eager_gradients(variant):
    assert_compiled_gradients_are_eager(*_model_and_ids(variant, layers=2), checkpointed=True)


def test_autocast_switch_asks_nothing_dynamo_cannot_trace(monkeypatch):
    """The rewrite runs with autocast off; on cpu and cuda the switch must not call
    `torch.amp.is_autocast_available`, which broke the graph at every sublayer under
    torch.compile on torch 2.11 (H200, bf16: compiled ddl ran at a quarter of the baseline)."""
    from deltalearn.ops._shapes import no_autocast

    def refuse(device_type):
        raise AssertionError(f"asked is_autocast_available({device_type!r})")

    monkeypatch.setattr(torch.amp, "is_autocast_available", refuse)
    with torch.autocast("cpu", dtype=torch.bfloat16), no_autocast(torch.ones(1)):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc"])
def test_an_eager_call_in_between_does_not_recompile_the_training_graph(variant, monkeypatch):
    """`deltalearn train --compile` runs eager code between compiled steps (its evaluation, say),
    which reads the fast paths' switches; the compiled graph must not have guarded on what such a
    read changes (the switches' encoding cache: it once compiled the graph a second time)."""
    monkeypatch.setattr(switches, "_ENCODED", {})  # as in a fresh process
    model, ids = _model_and_ids(variant)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    counters.clear()
    compiled(ids, labels=ids)
    model(ids, labels=ids)  # eager: each switch read here for the first time
    compiled(ids, labels=ids)
    assert counters["stats"]["unique_graphs"] == 1


def test_the_trainers_beta_probe_runs_eagerly_on_a_compiled_model():
    """`deltalearn train --compile` logs the mean β of each layer at every evaluation from one
    small forward of its own (gate records on, four rows); on the compiled model that forward runs
    eagerly — no graph of its own to compile — and gives the eager values."""
    model, ids = _model_and_ids("ddl-cc")
    expected = mean_beta_per_layer(model, ids[:1])
    model.compile(backend="eager", fullgraph=True)  # in place, as the trainer compiles
    counters.clear()
    model(ids, labels=ids)  # the training graph
    assert mean_beta_per_layer(model, ids[:1]) == pytest.approx(expected)
    assert counters["stats"]["unique_graphs"] == 1
    assert model.training


def _captured_compile_kwargs(monkeypatch, **kwargs) -> dict:
    """The keyword arguments `DeltaLM.compile(**kwargs)` hands `torch.compile`."""
    seen = {}

    def fake_compile(fn, *args, **kw):
        seen.update(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, _ = _model_and_ids("ddl-cc")
    model.compile(**kwargs)
    return seen


def test_deltalm_compile_turns_off_inductors_mix_order_reduction(monkeypatch):
    """The fusion that broke compiled ddl-cc training on a GPU (`models/compiling.py`) is off
    for the trainer's `model.compile()`, also with a mode (torch.compile takes a mode or options:
    the mode becomes its options), unless the caller's options turn it on."""
    assert _captured_compile_kwargs(monkeypatch) == {
        "options": {"triton.mix_order_reduction": False}
    }
    tuned = _captured_compile_kwargs(monkeypatch, mode="max-autotune", fullgraph=True)
    assert "mode" not in tuned and tuned["fullgraph"]
    assert tuned["options"]["max_autotune"] and tuned["options"]["triton.cudagraphs"]
    assert tuned["options"]["triton.mix_order_reduction"] is False
    mine = _captured_compile_kwargs(monkeypatch, options={"triton.mix_order_reduction": True})
    assert mine["options"]["triton.mix_order_reduction"] is True
    assert _captured_compile_kwargs(monkeypatch, backend="eager") == {"backend": "eager"}
