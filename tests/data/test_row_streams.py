"""``data.row_streams``: row b of every train batch continues row b of the reader's previous batch,
what ``train.state_passing: carry`` relies on; exact resume and the same tokens per epoch."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from hybrid_lm.data.errors import DataError
from hybrid_lm.data.loader import build_loader


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


@pytest.fixture
def shards(synthetic):
    rng = np.random.default_rng(5)
    path, _ = synthetic(rng.integers(5, 90, size=120).tolist(), shard_tokens=700)
    return path


def test_each_row_is_a_contiguous_slice_of_the_reader_stream(shards, cfg_for):
    rows, t = 3, 16
    loader = build_loader(cfg_for(shards, seq_len=t, micro_batch_size=rows, row_streams=True), "train", 0, 1)
    n = loader.batches_per_epoch(0)
    batches = _take(loader, n)
    # the epoch's stream in order: one row per batch without row streams
    flat = build_loader(cfg_for(shards, seq_len=t, micro_batch_size=1), "train", 0, 1)
    stream = torch.cat([b["input_ids"][0] for b in _take(flat, rows * n)])
    per_row = n * t
    for b in range(rows):
        got = torch.cat([batch["input_ids"][b] for batch in batches])
        assert torch.equal(got, stream[b * per_row:(b + 1) * per_row]), f"row {b} is not its stream slice"
    # a row's last label is the next batch's first token of that row where the document goes on
    for prev, nxt in zip(batches, batches[1:]):
        cont = prev["labels"][:, -1] != -100
        assert torch.equal(prev["labels"][cont, -1], nxt["input_ids"][cont, 0])


@pytest.mark.parametrize("workers", [0, 2])
def test_row_streams_resume_exactly_and_refuse_a_mode_change(shards, cfg_for, workers):
    cfg = cfg_for(shards, num_workers=workers, row_streams=True)
    ref_loader = build_loader(cfg, "train", 1, 2)
    total = ref_loader.batches_per_epoch(0) + 3
    ref = _take(ref_loader, total)
    first = build_loader(cfg, "train", 1, 2)
    head = _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg, "train", 1, 2)
    resumed.load_state_dict(state)
    got = head + _take(resumed, total - 5)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, ref) for k in a)
    with pytest.raises(DataError, match="row_streams"):
        build_loader(cfg_for(shards, num_workers=workers), "train", 1, 2).load_state_dict(state)
