"""Reader cursors and the loader's JSON state.

A reader's position is not "how many samples were seen" but an exact address in its token
stream: (epoch, index into its shard list, index into the selected samples of that shard, token
offset inside that sample) plus the batches it has produced this epoch. Re-opening the shard at
that address reproduces the stream exactly, so no packing buffer has to be saved: a batch never
straddles a cursor, and the cursor after a batch is the address of the next unconsumed token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hybrid_lm.data.errors import DataError

# 2: a reader's stream is a token range of the epoch stream (version 1 dealt whole shards, so its
# cursors address other streams and would silently resume at the wrong tokens)
STATE_VERSION = 2


@dataclass
class Cursor:
    epoch: int = 0
    shard_pos: int = 0
    """index into this reader's shard list for ``epoch``"""
    sample_pos: int = 0
    """index into the shard's selected samples (the slice of its shuffled order in this reader's range)"""
    token_pos: int = 0
    """offset of the next token inside that selected sample, as trimmed at the range's ends
    (documents continue across batches)"""
    batches: int = 0
    """batches this reader has produced in ``epoch`` (its quota is fixed per epoch)"""
    bad_shards: list[str] = field(default_factory=list)
    """names of shards this reader skipped as corrupt, cumulative"""
    padded_rows: int = 0
    """rows filled (partly) with padding because the reader ran out of tokens, cumulative"""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cursor":
        try:
            return cls(**{**d, "bad_shards": list(d.get("bad_shards", []))})
        except TypeError as exc:
            raise DataError(f"loader state: bad reader cursor {d!r} ({exc})") from exc

    def next_epoch(self) -> "Cursor":
        return Cursor(self.epoch + 1, 0, 0, 0, 0, list(self.bad_shards), self.padded_rows)


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """The settings that define the data order must match, or resuming would silently reshuffle."""
    if saved.get("version") != STATE_VERSION:
        raise DataError(f"loader state version {saved.get('version')!r}, this loader reads {STATE_VERSION}: the "
                        f"reader streams differ between versions, so the saved position cannot be resumed exactly")
    for key in ("split", "seed", "rank", "world_size", "num_workers", "seq_len", "micro_batch_size"):
        if saved.get(key) != current[key]:
            raise DataError(f"loader state was saved with {key}={saved.get(key)!r}, this loader has "
                            f"{key}={current[key]!r}; the data order depends on it, so resume with the same value")
    if len(saved.get("cursors", [])) != len(current["cursors"]):
        raise DataError(f"loader state has {len(saved.get('cursors', []))} reader cursors, expected "
                        f"{len(current['cursors'])}")
