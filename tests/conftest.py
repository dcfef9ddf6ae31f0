"""Shared test settings: deterministic seeds and one intra-op thread.

Two intra-op threads on a shared 2-core machine spin against other processes (pytest itself, the
2-process distributed tests): the tiny training loops ran 10-100x slower than on one thread.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
