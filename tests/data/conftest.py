"""Fixtures for the data tests: synthetic token shards whose tokens identify themselves.

Synthetic documents use unique token values (1000, 1001, ... with eos 256 at each end), so a test
can tell exactly which token of which document a batch holds, and catch any duplicate or loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest

from hybrid_lm.data.config import DataConfig
from hybrid_lm.data.tokenizer import Tokenizer
from hybrid_lm.data.writer import write_token_shards

EOS = 256
FIRST = 1000


def synthetic_docs(lengths: Sequence[int]) -> list[np.ndarray]:
    """Documents of the given lengths (eos included): unique ids, then eos."""
    docs, nxt = [], FIRST
    for n in lengths:
        docs.append(np.append(np.arange(nxt, nxt + n - 1), EOS))
        nxt += n - 1
    assert nxt < 65536
    return docs


def write_synthetic(out: Path, lengths: Sequence[int], shard_tokens: int, val_fraction: float = 0.0,
                    seed: int = 0) -> list[np.ndarray]:
    docs = synthetic_docs(lengths)
    write_token_shards(out, Tokenizer.byte_level(), ((i, f"doc{i}", d) for i, d in enumerate(docs)),
                       shard_tokens=shard_tokens, val_fraction=val_fraction, seed=seed, source={"input": "synthetic"})
    return docs


@pytest.fixture
def synthetic(tmp_path: Path) -> Callable[..., tuple[Path, list[np.ndarray]]]:
    def make(lengths: Sequence[int], shard_tokens: int, val_fraction: float = 0.0, name: str = "shards"):
        out = tmp_path / name
        return out, write_synthetic(out, lengths, shard_tokens, val_fraction)
    return make


@pytest.fixture
def cfg_for() -> Callable[..., DataConfig]:
    def make(path: Path, **kw) -> DataConfig:
        base = dict(path=str(path), seq_len=16, micro_batch_size=2, num_workers=0, seed=0)
        base.update(kw)
        return DataConfig(**base)
    return make
