"""`torch.compile` on every preset: the training forward is one graph (no graph breaks), and the
compiled forward gives the eager logits and loss. One layer, vocab 256, 2 x 16 tokens."""

from __future__ import annotations

import pytest
import torch

from deltalearn import DeltaLM, DeltaLMConfig
from deltalearn.models import VARIANTS

PRESETS = list(VARIANTS)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every preset compiles the same forward: start each from a clean cache
    yield
    torch._dynamo.reset()


def _model_and_ids(variant: str) -> tuple[DeltaLM, torch.Tensor]:
    torch.manual_seed(0)
    model = DeltaLM(DeltaLMConfig.preset(variant, "tiny", num_layers=1, vocab_size=256)).train()
    return model, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_all_nine_presets_are_covered():  # the paper's eight and the expanded additive control
    assert len(PRESETS) == 9


@pytest.mark.parametrize("variant", PRESETS)
def test_training_forward_has_no_graph_breaks(variant):
    model, ids = _model_and_ids(variant)
    explained = torch._dynamo.explain(model)(ids, labels=ids)
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
