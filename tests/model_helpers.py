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
