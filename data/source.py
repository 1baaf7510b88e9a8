"""Shards -> per-reader token streams: epoch plans, shard reading, and the seekable stream.

Rules (all deterministic functions of seed, epoch and the manifest; no global RNG is touched):

* Readers. A rank with W DataLoader workers (W = max(1, num_workers)) has W readers; global reader
  ``g = rank * W + worker`` of ``R = world_size * W``.
* The epoch stream. Each epoch permutes the split's shards with ``Generator(seed, epoch)`` and,
  inside each shard, its samples with ``Generator(seed, epoch, shard index)``; concatenated, that
  is one stream of all N tokens of the split.
* Assignment. Reader g reads one contiguous token range of that stream (``reader_ranges``):
  ``[g*Q, (g+1)*Q)`` with ``Q = N // (R*B*T) * B*T`` for train, so only the stream's last
  ``N mod (R*B*T) < R*B*T`` tokens are dropped (the least equal batch counts allow, and a
  different slice each epoch), a document cut at a boundary continuing on the next reader; for
  val ``[g*N//R, (g+1)*N//R)`` with each boundary moved back to the start of the sample holding
  it (nothing dropped, no document cut). One rule whatever the shard count or sizes: a range
  covers whole shards in its middle and a slice of the shuffled samples of the shards at its
  ends, so a shard is read only by the readers whose range touches it.
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


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """Manifest shard indices in ``epoch``'s reading order."""
    return [int(i) for i in _rng(seed, epoch, 0).permutation(n_shards)]


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader reads in one epoch: a contiguous token range of the epoch stream."""
    shards: tuple[int, ...]
    """manifest shard indices, in reading order (empty for an empty range)"""
    start: tuple[int, int]
    """(sample, token) in ``shards[0]``'s shuffled sample order where the range begins"""
    stop: tuple[int, int]
    """(sample, token) in ``shards[-1]``'s shuffled order: the range ends just before that token,
    ``0 < token <= len(sample)``, so the sample is the last one (partly) read"""
    tokens: int
    """tokens in this reader's stream"""

    def bounds(self, pos: int, n_samples: int) -> tuple[int, int, int, Optional[int]]:
        """``(lo, hi, head, tail)`` of the shard at ``pos``: its shuffled samples ``lo:hi`` are read,
        the first from token ``head`` on, the last up to token ``tail`` (None: to its end)."""
        lo, head = self.start if pos == 0 else (0, 0)
        last = pos == len(self.shards) - 1
        hi, tail = (self.stop[0] + 1, self.stop[1]) if last else (n_samples, None)
        return lo, hi, head, tail


def reader_ranges(total: int, n_readers: int, rows: int, drop_remainder: bool) -> list[tuple[int, int]]:
    """Token range ``[a, b)`` of the epoch stream for each reader.

    ``drop_remainder`` (train): every reader gets the same whole number of ``rows``-token batches,
    as many as fit, so fewer than ``n_readers * rows`` tokens are left over. Otherwise (val) the
    ranges cover the stream, as equal as integer division allows.
    """
    if drop_remainder:
        size = total // (n_readers * rows) * rows
        return [(g * size, (g + 1) * size) for g in range(n_readers)]
    return [(g * total // n_readers, (g + 1) * total // n_readers) for g in range(n_readers)]


class _Stream:
    """The epoch stream's layout: where each shard and each shuffled sample starts."""

    def __init__(self, shards: list[dict[str, Any]], seed: int, epoch: int) -> None:
        self.shards, self.seed, self.epoch = shards, seed, epoch
        self.perm = shard_order(len(shards), seed, epoch)
        self.ends = np.cumsum([int(shards[i]["tokens"]) for i in self.perm], dtype=np.int64)

    def locate(self, x: int, after: bool) -> tuple[int, int, int]:
        """``(shard position, sample, token)`` of stream token ``x``, or with ``after`` of the point
        just past token ``x - 1`` (so the token is in ``(0, len]``: an end address stays in the shard
        that holds the range's last token instead of pointing at the next one)."""
        side = "left" if after else "right"
        k = int(np.searchsorted(self.ends, x, side=side))
        i = self.perm[k]
        lens = np.asarray(self.shards[i]["sample_tokens"], dtype=np.int64)
        lens = lens[sample_order(int(self.shards[i]["docs"]), self.seed, self.epoch, i)]
        within = np.cumsum(lens)
        off = x - int(self.ends[k] - self.shards[i]["tokens"])
        j = int(np.searchsorted(within, off, side=side))
        return k, j, int(off - (within[j] - lens[j]))

    def plan(self, a: int, b: int) -> ReaderPlan:
        if a >= b:
            return ReaderPlan((), (0, 0), (0, 0), 0)
        k0, j0, t0 = self.locate(a, after=False)
        k1, j1, t1 = self.locate(b, after=True)
        return ReaderPlan(tuple(self.perm[k0:k1 + 1]), (j0, t0), (j1, t1), b - a)


def plan_epoch(shards: list[dict[str, Any]], seed: int, epoch: int, ranges: list[tuple[int, int]],
               whole_samples: bool = False) -> list[ReaderPlan]:
    """One plan per token range of ``epoch``'s stream (see ``reader_ranges``).

    ``whole_samples`` moves each boundary back to the start of the sample holding it, so no
    document is cut (val: a cut at a short reader's padded end would lose the target across it).
    """
    stream = _Stream(shards, seed, epoch)
    total = int(stream.ends[-1]) if len(stream.ends) else 0

    def snap(x: int) -> int:
        return x if not whole_samples or x >= total else x - stream.locate(x, after=False)[2]

    return [stream.plan(snap(a), snap(b)) for a, b in ranges]


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
        # selected samples of shard plan.shards[cur.shard_pos] (trimmed at the range's ends), and
        # whether each one's first token is its document's first
        self._docs: Optional[list[np.ndarray]] = None
        self._starts: list[bool] = []
        # the token after the range when the range ends inside a document: the next reader's first
        # input, but also the right label for this reader's last token
        self._after: Optional[int] = None

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
            self._select(samples, idx)
        return True

    def _select(self, samples: list[np.ndarray], idx: int) -> None:
        lo, hi, head, tail = self.plan.bounds(self.cur.shard_pos, len(samples))
        docs = [samples[i] for i in sample_order(len(samples), self.seed, self.cur.epoch, idx)[lo:hi]]
        if tail is not None:
            self._after = int(docs[-1][tail]) if tail < len(docs[-1]) else None
            docs[-1] = docs[-1][:tail]
        docs[0] = docs[0][head:]  # after the tail cut: head and tail index the same untrimmed sample
        self._docs, self._starts = docs, [head == 0] + [True] * (len(docs) - 1)

    def _advance_shard(self) -> None:
        self.cur.shard_pos += 1
        self.cur.sample_pos = self.cur.token_pos = 0
        self._docs = None

    def _current(self) -> Optional[tuple[np.ndarray, bool]]:
        while self._load():
            assert self._docs is not None
            if self.cur.sample_pos < len(self._docs):
                return self._docs[self.cur.sample_pos], self._starts[self.cur.sample_pos]
            self._advance_shard()
        return None

    def take(self, n: int) -> list[tuple[np.ndarray, bool]]:
        """Up to ``n`` tokens as ``(tokens, starts_document)`` pieces; fewer at the stream's end."""
        pieces = []
        while n > 0:
            current = self._current()
            if current is None:
                break
            doc, starts = current
            t = self.cur.token_pos
            piece = doc[t:t + n]
            pieces.append((piece, starts and t == 0))
            n -= len(piece)
            if t + len(piece) >= len(doc):
                self.cur.sample_pos += 1
                self.cur.token_pos = 0
            else:
                self.cur.token_pos = t + len(piece)
        return pieces

    def peek(self) -> Optional[tuple[int, bool]]:
        """The next token and whether it starts a document, without consuming it (past the range's
        end: the rest of a document cut there, which another reader reads)."""
        current = self._current()
        if current is None:
            return None if self._after is None else (self._after, False)
        doc, starts = current
        return int(doc[self.cur.token_pos]), starts and self.cur.token_pos == 0
