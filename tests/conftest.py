"""Shared test settings: deterministic, single-threaded torch so 2-core CI runs stay predictable."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
