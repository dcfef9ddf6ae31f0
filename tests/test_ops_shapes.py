"""Host-side helpers the kernel Functions share: their allocations (`ops._shapes.new_empty`) and
the multiprocessor count their reducing launches are sized by (`ops.backend.multiprocessors`)."""

from types import SimpleNamespace

import pytest
import torch

from deltalearn.ops import backend
from deltalearn.ops._shapes import new_empty


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4), torch.Size([1, 8, 64])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_new_empty_allocates_what_torch_empty_would(shape, dtype):
    made = new_empty(shape, dtype, torch.device("cpu"))
    expected = torch.empty(shape, dtype=dtype)
    assert (made.shape, made.dtype, made.device, made.stride()) == (
        expected.shape,
        expected.dtype,
        expected.device,
        expected.stride(),
    )


def test_multiprocessors_asks_the_driver_once_a_device(monkeypatch):
    asked = []

    def properties(index):
        asked.append(index)
        return SimpleNamespace(multi_processor_count=100 + index)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    backend._multiprocessors.cache_clear()
    try:
        counts = [
            backend.multiprocessors(torch.device(name)) for name in ("cuda:0", "cuda:0", "cuda")
        ]
        assert counts == [100, 100, 101]  # "cuda" is the current device
        assert asked == [0, 1]
    finally:
        backend._multiprocessors.cache_clear()  # no stand-in's count left for a real device
