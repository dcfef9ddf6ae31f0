"""The allocation helper the kernel Functions share (`ops._shapes.new_empty`)."""

import pytest
import torch

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
