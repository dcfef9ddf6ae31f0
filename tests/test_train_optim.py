"""The trainer's optimizer and gradient-norm clip (`train/optim.py`)."""

from __future__ import annotations

import torch

from deltalearn import DeltaLM, DeltaLMConfig
from deltalearn.train.config import OptimConfig
from deltalearn.train.optim import build_optimizer, stepped_parameters


def test_the_clip_reads_every_parameter_the_optimizer_steps_once():
    """The trainer lists them once (not `model.parameters()` at every step): the same gradients
    enter the norm, tied weights once, frozen ones (no gradient) not at all."""
    torch.manual_seed(0)
    model = DeltaLM(DeltaLMConfig.preset("ddl-cc", "tiny", num_layers=2, vocab_size=256))
    model.layers[0].attn_update.gate.out.bias.requires_grad_(False)
    stepped = stepped_parameters(build_optimizer(model, OptimConfig()))
    trained = [p for p in model.parameters() if p.requires_grad]  # tied ones listed once
    assert len(stepped) == len({id(p) for p in stepped}) == len(trained)
    assert {id(p) for p in stepped} == {id(p) for p in trained}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(stepped, float("inf"))
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
