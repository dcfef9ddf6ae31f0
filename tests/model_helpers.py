"""Shared tiny configurations for the DeltaLM tests (2 layers, d = 32: fast on 2 CPU cores)."""

from __future__ import annotations

import torch

from deltalearn import DeltaLM, DeltaLMConfig
from deltalearn.models import VARIANTS

ALL_VARIANTS = list(VARIANTS)
VOCAB = 61  # odd on purpose


def tiny_config(variant: str, **overrides) -> DeltaLMConfig:
    fields = dict(num_layers=2, hidden_size=32, num_heads=2, head_dim=16, vocab_size=VOCAB)
    return DeltaLMConfig.preset(variant, "tiny", **{**fields, **overrides})


def tiny_model(variant: str, seed: int = 0, **overrides) -> DeltaLM:
    torch.manual_seed(seed)
    return DeltaLM(tiny_config(variant, **overrides)).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def assert_within_rounding(actual, expected, eps: float, d: int, what: str = "") -> None:
    """`|actual − expected| ≤ eps·|expected| + d·eps_fp32·max|expected|` elementwise.

    For an op that computes in fp32 and rounds once to a dtype of machine epsilon `eps`: the first
    term is one ulp (the rounding is half an ulp, eps/2 relative), the second bounds the fp32
    accumulation over d-long reductions, so that entries made small by cancellation are not held
    to a relative bound. `expected` is a float64 result from the same (rounded) inputs.
    """
    expected = expected.double().cpu()
    err = (actual.double().cpu() - expected).abs()
    bound = eps * expected.abs() + d * torch.finfo(torch.float32).eps * expected.abs().max()
    worst = (err / bound).max().item()
    assert worst <= 1, f"{what}: error {err.max().item():.3g} exceeds the bound by {worst:.3g}x"


def assert_compiled_gradients_are_eager(
    model: DeltaLM, ids: torch.Tensor, checkpointed: bool = False
) -> None:
    """One training step of `model` on `ids`, eager, then compiled whole (`fullgraph`; each block
    checkpointed with `checkpointed`): every parameter's gradient the same up to round-off."""
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    if checkpointed:
        model.gradient_checkpointing_enable()
    torch.compile(model, fullgraph=True)(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-6, msg=name)
