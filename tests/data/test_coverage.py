"""Sharding across ranks and workers: every token exactly once per epoch, equal batch counts."""
from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from hybrid_lm.data.loader import build_loader
from hybrid_lm.data.manifest import load_manifest
from hybrid_lm.data.source import plan_epoch

EOS = 256


def _epoch_tokens(cfg_for, path, split, world, workers, **kw):
    """All input tokens (and real-token count) each rank yields in epoch 0, plus per-rank batch counts."""
    tokens, counts = [], []
    for rank in range(world):
        loader = build_loader(cfg_for(path, num_workers=workers, **kw), split, rank, world)
        n = loader.batches_per_epoch(0)
        batches = list(itertools.islice(iter(loader), n))
        assert len(batches) == n
        counts.append(n)
        for b in batches:
            real = b["input_ids"][b["input_ids"] != 257]  # 257 = pad; synthetic tokens never use it
            tokens.extend(real.tolist())
            _check_labels(b)
        assert loader.state_dict()["cursors"][0]["epoch"] == 0
    return tokens, counts


def _check_labels(b):
    """Synthetic docs count up by one then end in eos: a label is the next id or eos, never another doc's."""
    ids, labels = b["input_ids"], b["labels"]
    keep = labels != -100
    ok = (labels == ids + 1) | (labels == EOS)
    assert bool(ok[keep].all())
    assert bool((labels[ids == EOS] == -100).all())  # the next token after eos is another document


@pytest.mark.parametrize("workers", [0, 2])
def test_every_token_once_exact_fit(synthetic, cfg_for, workers):
    # 8 shards of exactly 64 tokens; 2 ranks x 2 workers => 2 shards (128 tokens = 4 batches of 2x16)
    # per reader (x1 worker: 4 shards, 8 batches): nothing may be dropped
    path, docs = synthetic([10, 22, 32] * 8, shard_tokens=64)
    assert len(load_manifest(str(path))["splits"]["train"]["shards"]) == 8
    tokens, counts = _epoch_tokens(cfg_for, path, "train", 2, workers)
    expected = np.concatenate(docs).tolist()
    assert len(set(counts)) == 1
    assert collections.Counter(tokens) == collections.Counter(expected)  # no loss, no duplicate


def test_remainder_dropped_equally(synthetic, cfg_for):
    rng = np.random.default_rng(0)
    path, docs = synthetic(rng.integers(5, 60, size=120).tolist(), shard_tokens=300)
    shards = load_manifest(str(path))["splits"]["train"]["shards"]
    world, workers, rows = 2, 2, 2 * 16
    tokens, counts = _epoch_tokens(cfg_for, path, "train", world, workers)
    assert len(set(counts)) == 1
    non_eos = [t for t in tokens if t != EOS]
    assert len(non_eos) == len(set(non_eos))  # no duplicates
    # exactly what the documented rule drops: each reader's tail beyond the common quota
    plans = plan_epoch(shards, 0, 0, world * workers)
    quota = min(p.tokens for p in plans) // rows
    assert counts[0] == quota * workers
    total = sum(len(d) for d in docs)
    assert len(tokens) == quota * rows * world * workers
    assert total - len(tokens) == sum(p.tokens - quota * rows for p in plans)


@pytest.mark.parametrize("split", ["train", "val"])
def test_fewer_shards_than_readers(synthetic, cfg_for, split):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 40, size=80).tolist()
    path, docs = synthetic(lengths, shard_tokens=10_000, val_fraction=0.5)
    m = load_manifest(str(path))
    assert len(m["splits"][split]["shards"]) == 1  # one shard, four readers: split by sample
    tokens, counts = _epoch_tokens(cfg_for, path, split, 2, 2)
    assert len(set(counts)) == 1
    in_split = [d for i, d in enumerate(docs) if (split == "val") == _is_val(m, i)]
    expected = collections.Counter(np.concatenate(in_split).tolist())
    got = collections.Counter(tokens)
    if split == "val":
        assert got == expected  # val drops nothing: short readers pad instead
    else:
        assert not got - expected
        non_eos = [t for t in tokens if t != EOS]
        assert len(non_eos) == len(set(non_eos))


def _is_val(m, index):
    from hybrid_lm.data.writer import is_val

    return is_val(index, m["seed"], m["val_fraction"])
