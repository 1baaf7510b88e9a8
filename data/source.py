"""Shards -> per-reader token streams: epoch plans, shard reading, and the seekable stream.

Rules (all deterministic functions of seed, epoch and the manifest; no global RNG is touched):

* Readers. A rank with W DataLoader workers (W = max(1, num_workers)) has W readers; global reader
  ``g = rank * W + worker`` of ``R = world_size * W``.
* Shard order. Each epoch permutes the split's shards with ``Generator(seed, epoch)``.
* Assignment. With ``n_shards >= R``, reader g reads the permuted shards at positions
  ``i % R == g``, all their samples. With fewer shards than readers every reader visits every
  shard and takes the samples at positions ``p % R == g`` of that shard's shuffled sample order.
  Either way every sample belongs to exactly one reader.
* Sample order. Inside a shard samples are permuted by ``Generator(seed, epoch, shard index)``.
* Bad shards. A shard that cannot be read completely, or whose samples/token counts/sha256 differ
  from the manifest, is rejected as a whole (samples are shuffled, so a partial shard has no
  meaningful prefix): skipped with a warning or raised as ``DataError``.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from hybrid_lm.data.errors import DataError
from hybrid_lm.data.manifest import join, read_bytes
from hybrid_lm.data.state import Cursor


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def sample_order(n_samples: int, seed: int, epoch: int, shard_index: int) -> np.ndarray:
    return _rng(seed, epoch, shard_index, 1).permutation(n_samples)


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader reads in one epoch."""
    shards: tuple[int, ...]
    """manifest shard indices, in reading order"""
    stride: int
    offset: int
    """the reader takes shuffled sample positions ``p`` with ``p % stride == offset``"""
    tokens: int
    """tokens in this reader's stream (from the manifest)"""


def plan_epoch(shards: list[dict[str, Any]], seed: int, epoch: int, n_readers: int) -> list[ReaderPlan]:
    """One plan per global reader for ``epoch``."""
    perm = [int(i) for i in _rng(seed, epoch, 0).permutation(len(shards))]
    plans = []
    if len(shards) >= n_readers:
        for g in range(n_readers):
            mine = tuple(perm[g::n_readers])
            plans.append(ReaderPlan(mine, 1, 0, sum(shards[i]["tokens"] for i in mine)))
        return plans
    lengths = {i: np.asarray(shards[i]["sample_tokens"], dtype=np.int64)[sample_order(shards[i]["docs"], seed, epoch, i)]
               for i in perm}
    for g in range(n_readers):
        plans.append(ReaderPlan(tuple(perm), n_readers, g, int(sum(lengths[i][g::n_readers].sum() for i in perm))))
    return plans


def read_shard(base: str, entry: dict[str, Any], dtype: np.dtype, verify: bool) -> list[np.ndarray]:
    """All samples' tokens of one shard in stored order; ``DataError`` naming it if it is bad."""
    url = join(base, entry["name"])
    try:
        raw = read_bytes(url)
        if verify and hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise DataError(f"sha256 differs from the manifest")
        samples: dict[str, np.ndarray] = {}
        keys: list[str] = []
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for member in tar:
                if not member.name.endswith(".tokens.npy"):
                    continue
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise DataError(f"member {member.name} is truncated")
                key = member.name[: -len(".tokens.npy")]
                keys.append(key)
                samples[key] = np.load(io.BytesIO(data), allow_pickle=False)
        tokens = [samples[k] for k in keys]
        if len(tokens) != entry["docs"] or [len(t) for t in tokens] != list(entry["sample_tokens"]):
            raise DataError(f"holds {len(tokens)} samples / {sum(map(len, tokens))} tokens, the manifest says "
                            f"{entry['docs']} / {entry['tokens']} (truncated?)")
        return [t.astype(np.int64) if t.dtype != dtype else t for t in tokens]
    except DataError as exc:
        raise DataError(f"bad shard {url}: {exc}") from None
    except Exception as exc:  # tarfile/numpy/OS errors all mean the same thing here
        raise DataError(f"bad shard {url}: {exc.__class__.__name__}: {exc}") from exc


class TokenStream:
    """A reader's token stream for one epoch, positioned at a cursor; ``take`` advances it."""

    def __init__(self, base: str, shards: list[dict[str, Any]], plan: ReaderPlan, cursor: Cursor, *, seed: int,
                 dtype: np.dtype, verify: bool, policy: str, on_bad: Optional[Callable[[str], None]] = None) -> None:
        self.base, self.shards, self.plan, self.cur = base, shards, plan, cursor
        self.seed, self.dtype, self.verify, self.policy, self.on_bad = seed, dtype, verify, policy, on_bad
        self._docs: Optional[list[np.ndarray]] = None  # selected samples of shard plan.shards[cur.shard_pos]

    def _load(self) -> bool:
        """Make the current shard's samples available; False at the end of the stream."""
        while self._docs is None:
            if self.cur.shard_pos >= len(self.plan.shards):
                return False
            idx = self.plan.shards[self.cur.shard_pos]
            entry = self.shards[idx]
            try:
                samples = read_shard(self.base, entry, self.dtype, self.verify)
            except DataError as exc:
                if self.policy == "raise":
                    raise
                warnings.warn(f"skipping {exc}", RuntimeWarning, stacklevel=2)
                if entry["name"] not in self.cur.bad_shards:
                    self.cur.bad_shards.append(entry["name"])
                self._advance_shard()
                continue
            order = sample_order(len(samples), self.seed, self.cur.epoch, idx)[self.plan.offset::self.plan.stride]
            self._docs = [samples[i] for i in order]
        return True

    def _advance_shard(self) -> None:
        self.cur.shard_pos += 1
        self.cur.sample_pos = self.cur.token_pos = 0
        self._docs = None

    def _current(self) -> Optional[np.ndarray]:
        while self._load():
            assert self._docs is not None
            if self.cur.sample_pos < len(self._docs):
                return self._docs[self.cur.sample_pos]
            self._advance_shard()
        return None

    def take(self, n: int) -> list[tuple[np.ndarray, bool]]:
        """Up to ``n`` tokens as ``(tokens, starts_document)`` pieces; fewer at the stream's end."""
        pieces = []
        while n > 0:
            doc = self._current()
            if doc is None:
                break
            t = self.cur.token_pos
            piece = doc[t:t + n]
            pieces.append((piece, t == 0))
            n -= len(piece)
            if t + len(piece) >= len(doc):
                self.cur.sample_pos += 1
                self.cur.token_pos = 0
            else:
                self.cur.token_pos = t + len(piece)
        return pieces

    def peek(self) -> Optional[tuple[int, bool]]:
        """The next token and whether it starts a document, without consuming it."""
        doc = self._current()
        return None if doc is None else (int(doc[self.cur.token_pos]), self.cur.token_pos == 0)
