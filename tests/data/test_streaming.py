"""The loader streams shards: memory bounded by a batch, not a shard, and the same batches as the
in-memory reader it replaced (``source.TokenStream``, which reads each shard whole: kept as the
reference these tests compare against), for local and ``pipe:`` sources."""
from __future__ import annotations

import itertools
import json
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

import hybrid_lm.data.loader as loader_mod
from hybrid_lm.data import source
from hybrid_lm.data.errors import DataError
from hybrid_lm.data.loader import build_loader
from hybrid_lm.data.manifest import load_manifest
from hybrid_lm.data.tokenizer import Tokenizer
from hybrid_lm.data.writer import write_token_shards


class _WholeShardStream(source.TokenStream):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, dtype=np.dtype("uint16"), **kwargs)

    def close(self):
        pass


@pytest.fixture
def in_memory(monkeypatch):
    """Context in which the loader reads shards the old way, whole into memory."""
    def use():
        monkeypatch.setattr(loader_mod, "TokenStream", _WholeShardStream)
    return use


def _run(cfg, split, rank, world, n):
    """n batches and the state after each."""
    loader = build_loader(cfg, split, rank, world)
    out = []
    for batch in itertools.islice(iter(loader), n):
        out.append((batch, json.dumps(loader.state_dict())))
    return out, loader.stats


def _same(a, b):
    return len(a) == len(b) and all(sa == sb and all(torch.equal(x[k], y[k]) for k in x)
                                    for (x, sa), (y, sb) in zip(a, b))


@pytest.mark.parametrize("split,world", [("train", 2), ("train", 3), ("val", 2)])
@pytest.mark.parametrize("pipe", [False, True], ids=["local", "pipe"])
def test_streamed_batches_equal_the_whole_shard_reader(synthetic, cfg_for, in_memory, split, world, pipe):
    # uneven documents and shards, so reader ranges start and end mid-shard and mid-document
    rng = np.random.default_rng(5)
    path, _ = synthetic(rng.integers(3, 120, size=150).tolist(), shard_tokens=600,
                        val_fraction=0.5 if split == "val" else 0.0)
    cfg = cfg_for(f"pipe:cat {path}" if pipe else path, verify_checksums=pipe)
    counts = [build_loader(cfg, split, r, world).batches_per_epoch(0) for r in range(world)]
    n = 2 * counts[0] + 1 if split == "train" else counts[0]  # train: into a third epoch
    streamed = [_run(cfg, split, r, world, n) for r in range(world)]
    in_memory()
    whole = [_run(cfg, split, r, world, n) for r in range(world)]
    for r in range(world):
        assert len(streamed[r][0]) == n
        assert _same(streamed[r][0], whole[r][0]), f"rank {r} differs from the whole-shard reader"
        assert streamed[r][1] == whole[r][1]


def _big_shard(out, tokens_per_doc=8000, docs=400):
    """One train shard of docs x tokens_per_doc uint16 tokens (about 9 MB); its size in bytes."""
    rng = np.random.default_rng(0)
    items = ((i, f"doc{i}", np.append(rng.integers(0, 256, tokens_per_doc - 1), 256)) for i in range(docs))
    m = write_token_shards(out, Tokenizer.byte_level(), items, shard_tokens=10 ** 9, val_fraction=0.0, seed=0,
                           source={"input": "synthetic"})
    (entry,) = m["splits"]["train"]["shards"]
    return entry["bytes"]


def _peak_bytes(cfg, batches):
    loader = build_loader(cfg, "train", 0, 1)
    tracemalloc.start()
    try:
        got = list(itertools.islice(iter(loader), batches))
        return tracemalloc.get_traced_memory()[1], got
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("pipe", [False, True], ids=["local", "pipe"])
def test_memory_stays_far_below_the_shard_size(tmp_path, cfg_for, in_memory, pipe):
    size = _big_shard(tmp_path / "big")
    base = f"pipe:cat {tmp_path / 'big'}" if pipe else tmp_path / "big"
    cfg = cfg_for(base, seq_len=1024, micro_batch_size=4, verify_checksums=True)
    peak, got = _peak_bytes(cfg, 3)
    assert peak < size / 8, f"peak {peak:,} bytes while reading a {size:,}-byte shard"
    in_memory()  # the whole-shard reader holds the shard: the bound above is a real one
    peak_whole, ref = _peak_bytes(cfg, 3)
    assert peak_whole > size
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, ref) for k in a)


def _truncate(path, index=1):
    name = load_manifest(str(path))["splits"]["train"]["shards"][index]["name"]
    raw = (path / name).read_bytes()
    (path / name).write_bytes(raw[: len(raw) // 2 + 100])  # truncated mid-member
    return name


def _epoch(cfg):
    loader = build_loader(cfg, "train", 0, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(itertools.islice(iter(loader), loader.batches_per_epoch(0)))
    return loader, batches, caught


def test_bad_pipe_shards_are_skipped_and_counted_or_raised(synthetic, cfg_for):
    path, _ = synthetic([40] * 60, shard_tokens=400)
    truncated = _truncate(path)
    missing = load_manifest(str(path))["splits"]["train"]["shards"][3]["name"]
    (path / missing).unlink()  # cat exits 1: the command's failure is the shard's
    loader, batches, caught = _epoch(cfg_for(f"pipe:cat {path}"))
    assert len(batches) == loader.batches_per_epoch(0)
    assert loader.stats["bad_shard_names"] == sorted([truncated, missing])
    assert loader.stats["padded_rows"] > 0
    assert {truncated, missing} <= {n for w in caught for n in (truncated, missing) if n in str(w.message)}
    with pytest.raises(DataError, match=r"bad shard pipe:cat .*-0000[13]\.tar"):
        _epoch(cfg_for(f"pipe:cat {path}", bad_shard_policy="raise"))


@pytest.mark.parametrize("pipe", [False, True], ids=["local", "pipe"])
def test_a_corrupt_token_is_caught_by_the_checksum(synthetic, cfg_for, pipe):
    path, _ = synthetic([40] * 30, shard_tokens=400)
    entry = load_manifest(str(path))["splits"]["train"]["shards"][0]
    raw = bytearray((path / entry["name"]).read_bytes())
    raw[700] ^= 0x01  # a token of the first sample: the tar and the .npy still parse
    (path / entry["name"]).write_bytes(bytes(raw))
    base = f"pipe:cat {path}" if pipe else path
    _epoch(cfg_for(base, bad_shard_policy="raise"))  # unverified, the damage is invisible
    with pytest.raises(DataError, match=f"{entry['name']}: sha256 differs"):
        _epoch(cfg_for(base, verify_checksums=True, bad_shard_policy="raise"))


def test_a_shard_cut_at_a_member_boundary_is_caught_by_its_size(synthetic, cfg_for):
    # the tar still parses and the samples are all there: only the manifest's byte count tells
    path, _ = synthetic([40] * 30, shard_tokens=400)
    entry = load_manifest(str(path))["splits"]["train"]["shards"][0]
    shard = path / entry["name"]
    shard.write_bytes(shard.read_bytes()[:-1024])  # the two end-of-archive blocks
    for base in (path, f"pipe:cat {path}"):
        with pytest.raises(DataError, match=f"{entry['name']}: {entry['bytes'] - 1024} bytes, the manifest says"):
            _epoch(cfg_for(base, bad_shard_policy="raise"))
