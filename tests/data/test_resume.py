"""Exact resume, determinism of the order, and no global RNG draws."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from hybrid_lm.data.loader import build_loader


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.fixture
def shards(synthetic):
    rng = np.random.default_rng(3)
    path, _ = synthetic(rng.integers(5, 90, size=160).tolist(), shard_tokens=700)
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_and_across_epoch(shards, cfg_for, workers):
    cfg = cfg_for(shards, num_workers=workers)
    ref_loader = build_loader(cfg, "train", 1, 2)
    per_epoch = ref_loader.batches_per_epoch(0)
    total = per_epoch + 6
    ref = _take(ref_loader, total)
    for k in (3, per_epoch - 2):  # mid-epoch, and a stop whose continuation crosses into epoch 1
        first = build_loader(cfg, "train", 1, 2)
        head = _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        resumed = build_loader(cfg, "train", 1, 2)
        resumed.load_state_dict(state)
        tail = _take(resumed, total - k)
        assert _same(head + tail, ref), f"resume after {k} batches diverged"
    assert ref_loader.epoch == 1


def test_workers_interleave_like_readers(shards, cfg_for):
    # DataLoader workers must yield exactly the strict round-robin of the in-process readers
    from hybrid_lm.data.state import Cursor

    loader = build_loader(cfg_for(shards, num_workers=2), "train", 0, 1)
    got = _take(loader, 12)
    readers = [loader._plan.reader_batches(w, Cursor()) for w in range(2)]
    expected = [next(readers[i % 2])[0] for i in range(12)]
    assert _same(got, expected)


def test_seed_controls_order(shards, cfg_for):
    a = _take(build_loader(cfg_for(shards, seed=1), "train", 0, 1), 5)
    b = _take(build_loader(cfg_for(shards, seed=1), "train", 0, 1), 5)
    c = _take(build_loader(cfg_for(shards, seed=2), "train", 0, 1), 5)
    assert _same(a, b)
    assert not _same(a, c)


def test_epochs_reshuffle(shards, cfg_for):
    loader = build_loader(cfg_for(shards), "train", 0, 1)
    n = loader.batches_per_epoch(0)
    batches = _take(loader, 2 * n)
    assert not _same(batches[:3], batches[n:n + 3])


def test_no_global_rng_draws(shards, cfg_for):
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    for workers in (0, 2):
        _take(build_loader(cfg_for(shards, num_workers=workers), "train", 0, 1), 3)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_val_is_one_pass(synthetic, cfg_for):
    path, _ = synthetic([30] * 40, shard_tokens=200, val_fraction=0.5)
    loader = build_loader(cfg_for(path, num_workers=2), "val", 0, 1)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    assert list(loader) == []  # the pass is over; the state says so


def test_state_mismatch_is_refused(shards, cfg_for):
    from hybrid_lm.data.errors import DataError

    state = build_loader(cfg_for(shards), "train", 0, 1).state_dict()
    with pytest.raises(DataError, match="seq_len"):
        build_loader(cfg_for(shards, seq_len=32), "train", 0, 1).load_state_dict(state)
