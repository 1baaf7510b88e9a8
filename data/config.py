"""``DataConfig``: the ``data:`` section of a job config, consumed by ``build_loader``.

A plain typed dataclass so ``hybrid_lm.typed_config.from_dict`` can build it strictly from YAML;
the docstring string under each field is the user-facing documentation of that key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from hybrid_lm.typed_config import require_at_least


@dataclass
class DataConfig:
    path: str = "artifacts/data"
    """folder (or ``pipe:``/URL prefix) holding ``manifest.json``, ``tokenizer.json`` and the shards"""
    seq_len: int = 256
    """tokens per packed row (T of the (B, T) batch)"""
    micro_batch_size: int = 8
    """rows per batch (B) on each data-parallel rank"""
    num_workers: int = 0
    """DataLoader worker processes per rank; 0 reads in the main process. Part of the data order:
    a run must resume with the same value"""
    seed: int = 0
    """seed of the shard order (per epoch) and of the sample order inside each shard"""
    prefetch_factor: int = 2
    """batches each worker prepares ahead (only with num_workers > 0)"""
    bad_shard_policy: Literal["skip", "raise"] = "skip"
    """a truncated/corrupt shard is skipped with a warning and counted, or raises naming it"""
    verify_checksums: bool = False
    """check each shard's sha256 against the manifest when it is opened (costs one extra hash)"""
    expected_vocab_size: Optional[int] = None
    """pin: when set, start-up also fails unless the manifest's vocab size matches. Without it the
    manifest is still checked against the tokenizer.json next to local shards"""
    row_streams: bool = False
    """train split: row b of every batch continues row b of the reader's previous batch (each row
    is its own contiguous token stream), as ``train.state_passing: carry`` needs. Off: a batch's rows
    are consecutive pieces of one stream (row b+1 continues row b). Part of the data order"""
    tokenizer_fingerprint: Optional[str] = None
    """pin: when set, start-up also fails unless the manifest's tokenizer sha256 matches (the only
    tokenizer check for remote shards, whose tokenizer.json is not read)"""

    def validate(self) -> None:
        """Impossible values, checked when a job config is loaded (and again by ``build_loader``)."""
        require_at_least(self, 1, "seq_len", "micro_batch_size", "prefetch_factor", "expected_vocab_size")
        require_at_least(self, 0, "num_workers", "seed")  # numpy's generators refuse a negative seed
