"""BatchSampler and eval_batches: determinism, slicing, shifts, bounds, coverage, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltalearn.data import BatchSampler, DataError, eval_batches, shard_rows

SEQ, BATCH = 16, 8


@pytest.fixture()
def tokens() -> np.ndarray:
    # ids equal their positions (mod 2^16), so every window reveals where it was cut from
    return np.arange(1000, dtype=np.uint16)


def test_batch_shapes_and_shift(tokens):
    x, y = BatchSampler(tokens, SEQ, BATCH).batch(3)
    assert x.shape == y.shape == (BATCH, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # consecutive ids: y is x shifted by one token


def test_same_seed_and_step_give_the_same_batch(tokens):
    a = BatchSampler(tokens, SEQ, BATCH, seed=7)
    b = BatchSampler(tokens, SEQ, BATCH, seed=7)
    for step in (0, 5, 1000, 5):  # any order: no hidden state
        assert torch.equal(a.batch(step)[0], b.batch(step)[0])


def test_steps_and_seeds_differ(tokens):
    sampler = BatchSampler(tokens, SEQ, BATCH, seed=0)
    assert not torch.equal(sampler.batch(0)[0], sampler.batch(1)[0])
    assert not torch.equal(
        sampler.batch(0)[0], BatchSampler(tokens, SEQ, BATCH, seed=1).batch(0)[0]
    )


@pytest.mark.parametrize("world", [1, 2, 4], ids=lambda w: f"world{w}")
@pytest.mark.parametrize("micro", [1, 2], ids=lambda m: f"micro{m}")
def test_rank_and_micro_batch_slices_union_is_the_global_batch(tokens, world, micro):
    sampler = BatchSampler(tokens, SEQ, BATCH, seed=3)
    for step in (0, 17, 250):  # 250 crosses epoch boundaries (60 windows per epoch)
        full_x, full_y = sampler.batch(step)
        parts_x, parts_y = [], []
        for rank in range(world):
            lo, hi = shard_rows(BATCH, rank, world)
            per = (hi - lo) // micro
            for m in range(micro):
                x, y = BatchSampler(tokens, SEQ, BATCH, seed=3).batch(
                    step, lo + m * per, lo + (m + 1) * per
                )
                parts_x.append(x)
                parts_y.append(y)
        assert torch.equal(torch.cat(parts_x), full_x) and torch.equal(torch.cat(parts_y), full_y)


def test_windows_stay_in_bounds_and_cover_an_epoch_without_repeats(tokens):
    sampler = BatchSampler(tokens, SEQ, global_batch_size=6)
    per_epoch = sampler.windows_per_epoch
    assert per_epoch == (len(tokens) - 1) // SEQ - 1 == 61
    starts = np.concatenate([sampler.starts(step) for step in range(40)])  # ~4 epochs
    assert starts.min() >= 0 and starts.max() + SEQ + 1 <= len(tokens)
    for epoch in range(3):
        chunk = starts[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert len(np.unique(chunk)) == per_epoch  # no window repeats within an epoch
        assert len(np.unique(chunk % SEQ)) == 1  # one phase per epoch: windows do not overlap
    phases = {int(starts[e * per_epoch] % SEQ) for e in range(3)}
    assert len(phases) > 1  # boundaries move between epochs


def test_memmap_and_the_smallest_corpus(tmp_path):
    path = tmp_path / "ids.bin"
    np.arange(SEQ + 1, dtype=np.uint16).tofile(path)
    ids = np.memmap(path, dtype=np.uint16, mode="r")
    sampler = BatchSampler(ids, SEQ, 4)
    assert sampler.windows_per_epoch == 1
    x, y = sampler.batch(9)
    assert torch.equal(x, torch.arange(SEQ).expand(4, SEQ)) and torch.equal(y, x + 1)


def test_too_small_corpus_names_the_sizes():
    with pytest.raises(DataError, match=r"16 tokens.*seq_len=16"):
        BatchSampler(np.zeros(16, dtype=np.uint16), 16, 4)
    with pytest.raises(DataError, match=r"10 tokens.*seq_len=32"):
        list(eval_batches(np.zeros(10, dtype=np.uint16), 32, 4))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 0, None), "step"),
        ((0, 0, BATCH + 1), r"rows \[0:9\)"),
        ((0, 5, 4), r"rows \[5:4\)"),
    ],
)
def test_bad_batch_arguments(tokens, args, match):
    with pytest.raises(DataError, match=match):
        BatchSampler(tokens, SEQ, BATCH).batch(*args)


def test_shard_rows_checks_divisibility():
    assert [shard_rows(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(DataError, match="not divisible"):
        shard_rows(10, 0, 4)


def test_eval_batches_are_contiguous_non_overlapping_and_deterministic(tokens):
    batches = list(eval_batches(tokens, SEQ, batch_size=8))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == ((len(tokens) - 1) // SEQ, SEQ)  # 62 windows: 7 full batches + 6 rows
    assert [len(b[0]) for b in batches] == [8] * 7 + [6]
    assert torch.equal(x.flatten(), torch.arange(x.numel()))  # in order, no overlap, no gap
    assert torch.equal(y, x + 1)
    again = torch.cat([b[0] for b in eval_batches(tokens, SEQ, batch_size=8)])
    assert torch.equal(again, x)
    assert len(list(eval_batches(tokens, SEQ, batch_size=8, max_batches=2))) == 2
