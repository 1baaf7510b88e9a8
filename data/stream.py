"""Streaming shard access: a reader's token stream whose memory is bounded by a batch, not a shard.

A reader consumes each shard's samples in a shuffled order (``source.sample_order``) and, at the
ends of its token range, only a slice of them (``ReaderPlan.bounds``), so it needs random access
to samples. Instead of reading the shard whole into memory, a shard is opened in two steps:

1. One sequential pass checks the whole shard before any of its tokens is used, so a bad shard is
   still rejected whole (its samples are shuffled: a partial shard has no meaningful prefix): the
   tar parses, each ``.tokens.npy`` member is a 1-D integer array of the size its header says, the
   sample count and per-sample token counts equal the manifest's ``docs`` / ``sample_tokens``, the
   byte count equals the manifest's ``bytes``, and, with ``verify_checksums``, the sha256 matches.
   The pass records where each sample's tokens lie.

   * A local shard is seekable: the pass reads tar and ``.npy`` headers only (tarfile seeks over
     the data; verifying adds one sequential hashing read), and tokens are read in place.
   * A ``pipe:``/URL source is a one-way byte stream: the pass reads it once to its end (so the
     command's exit status is checked) and copies the tokens of the samples this reader selects
     into an anonymous temporary file (``tempfile``: ``TMPDIR`` picks the disk), dropped when the
     reader moves on. Disk holds at most one shard's selected tokens per reader.
2. ``take`` reads only the tokens it returns (a seek and a read per piece).

Memory per open shard: the index (about 32 bytes per sample) plus I/O buffers of at most
``CHUNK`` bytes, whatever the shard's size. The token stream is the same as the in-memory
reader's (``source.TokenStream``): same plans, same cursors, same batches.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import warnings
from array import array
from typing import Any, BinaryIO, Optional

import numpy as np

from hybrid_lm.data.errors import DataError
from hybrid_lm.data.manifest import is_remote, join
from hybrid_lm.data.source import ReaderPlan, sample_order
from hybrid_lm.data.state import Cursor

TOKENS_SUFFIX = ".tokens.npy"
CHUNK = 1 << 16
"""largest single read or copy while indexing, in bytes"""


class ShardFile:
    """A checked shard: sample ``i`` (stored order) has ``lengths[i]`` tokens of ``dtypes[i]`` at
    byte ``offsets[i]`` of ``file`` (-1: not copied, this reader does not read it)."""

    def __init__(self, url: str, file: BinaryIO) -> None:
        self.url, self.file = url, file
        self.offsets, self.lengths = array("q"), array("q")
        self.dtypes: list[np.dtype] = []

    def add(self, offset: int, n: int, dtype: np.dtype) -> None:
        self.offsets.append(offset)
        self.lengths.append(n)
        self.dtypes.append(dtype)

    def read(self, i: int, a: int, b: int) -> np.ndarray:
        """Tokens ``a:b`` of sample ``i``, (b - a,) in the shard's dtype."""
        dtype, n = self.dtypes[i], b - a
        self.file.seek(self.offsets[i] + a * dtype.itemsize)
        raw = self.file.read(n * dtype.itemsize)
        if len(raw) != n * dtype.itemsize:
            raise DataError(f"bad shard {self.url}: sample {i} ended early while being read (file changed?)")
        return np.frombuffer(raw, dtype=dtype)

    def close(self) -> None:
        self.file.close()


def _next_member(tar: tarfile.TarFile) -> Optional[tarfile.TarInfo]:
    member = tar.next()
    # tarfile keeps every header it has read: O(members) memory on a large shard otherwise
    tar.members = []
    return member


def _npy_header(f: BinaryIO, member: tarfile.TarInfo) -> tuple[np.dtype, int]:
    """(dtype, token count) of the ``.npy`` member whose data starts at ``f``'s position; leaves
    ``f`` at its first token."""
    start = f.tell()
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise DataError(f"member {member.name}: unsupported .npy version {version}")
    if len(shape) != 1 or dtype.kind not in "iu":
        raise DataError(f"member {member.name} holds a {dtype} array of shape {shape}, not 1-D integer tokens")
    if f.tell() - start + shape[0] * dtype.itemsize != member.size:
        raise DataError(f"member {member.name}: {member.size} bytes do not hold the {shape[0]} tokens its header says")
    return dtype, int(shape[0])


def _is_tokens(member: tarfile.TarInfo) -> bool:
    return member.isfile() and member.name.endswith(TOKENS_SUFFIX)


def _check_size(size: int, entry: dict[str, Any]) -> None:
    if entry.get("bytes") is not None and size != entry["bytes"]:
        raise DataError(f"{size} bytes, the manifest says {entry['bytes']} (truncated?)")


def _open_local(url: str, entry: dict[str, Any], verify: bool) -> ShardFile:
    _check_size(os.path.getsize(url), entry)
    shard = ShardFile(url, open(url, "rb"))
    try:
        if verify:
            src = _Tee(shard.file, hashing=True)
            if _drained_digest(src) != entry["sha256"]:
                raise DataError("sha256 differs from the manifest")
            shard.file.seek(0)
        tar = tarfile.open(fileobj=shard.file, mode="r:")
        while (member := _next_member(tar)) is not None:
            if _is_tokens(member):
                shard.file.seek(member.offset_data)
                dtype, n = _npy_header(shard.file, member)
                shard.add(shard.file.tell(), n, dtype)
        return shard
    except BaseException:
        shard.close()
        raise


class _Tee:
    """A one-way byte stream that counts (and optionally hashes) every byte read through it."""

    def __init__(self, f: Any, hashing: bool) -> None:
        self.f, self.size = f, 0
        self.hash = hashlib.sha256() if hashing else None

    def read(self, n: int = -1) -> bytes:
        block = self.f.read(n)
        self.size += len(block)
        if self.hash is not None:
            self.hash.update(block)
        return block

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _drained_digest(src: _Tee) -> Optional[str]:
    """The stream's sha256 after reading it to its end; None if it cannot be read to its end."""
    try:
        src.drain()
    except Exception:
        return None
    assert src.hash is not None
    return src.hash.hexdigest()


def _open_stream(url: str, entry: dict[str, Any], keep: np.ndarray, verify: bool) -> ShardFile:
    from webdataset import gopen

    shard = ShardFile(url, tempfile.TemporaryFile())
    try:
        src = _Tee(gopen(url, "rb"), verify)
        done = False
        try:
            try:
                tar = tarfile.open(fileobj=src, mode="r|", bufsize=CHUNK)
                while (member := _next_member(tar)) is not None:
                    if _is_tokens(member):
                        _copy_sample(tar, member, shard, keep)
                src.drain()  # the tar's end blocks: part of the byte count and the checksum
            except Exception as exc:
                if verify and _drained_digest(src) != entry["sha256"]:  # damage is best named by the checksum
                    raise DataError("sha256 differs from the manifest") from exc
                raise
            done = True
        finally:
            try:
                src.f.close()  # a pipe's close waits for the command and raises on a failed exit status
            except Exception:
                if done:
                    raise
        _check_size(src.size, entry)
        if src.hash is not None and src.hash.hexdigest() != entry["sha256"]:
            raise DataError("sha256 differs from the manifest")
        return shard
    except BaseException:
        shard.close()
        raise


def _copy_sample(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: ShardFile, keep: np.ndarray) -> None:
    """Read one sample's member to its end (a short one is truncated), copying the tokens to the
    spool file when this reader selects the sample."""
    f = tar.extractfile(member)
    assert f is not None
    dtype, n = _npy_header(f, member)
    i = len(shard.lengths)
    wanted = i < len(keep) and bool(keep[i])
    shard.add(shard.file.tell() if wanted else -1, n, dtype)
    left = n * dtype.itemsize
    while left:
        block = f.read(min(left, CHUNK))
        if not block:
            raise DataError(f"member {member.name} is truncated")
        if wanted:
            shard.file.write(block)
        left -= len(block)


def open_shard(base: str, entry: dict[str, Any], keep: np.ndarray, verify: bool) -> ShardFile:
    """Check shard ``entry`` whole and index it; ``DataError`` naming it if it is bad.

    keep: (docs,) bool over the stored samples, the ones this reader will read (a remote shard
    copies only those; a local one is read in place).
    """
    url = join(base, entry["name"])
    try:
        shard = _open_stream(url, entry, keep, verify) if is_remote(url) else _open_local(url, entry, verify)
        lengths = shard.lengths.tolist()
        if len(lengths) != entry["docs"] or lengths != list(entry["sample_tokens"]):
            shard.close()
            raise DataError(f"holds {len(lengths)} samples / {sum(lengths)} tokens, the manifest says "
                            f"{entry['docs']} / {entry['tokens']} (truncated?)")
        return shard
    except DataError as exc:
        raise DataError(f"bad shard {url}: {exc}") from None
    except Exception as exc:  # tarfile/numpy/OS/pipe errors all mean the same thing here
        raise DataError(f"bad shard {url}: {exc.__class__.__name__}: {exc}") from exc


class TokenStream:
    """A reader's token stream for one epoch, positioned at a cursor; ``take`` advances it.

    The reader's range selects, in shard ``plan.shards[cur.shard_pos]``, the shuffled samples
    ``order = sample_order(...)[lo:hi]``, the first from token ``head`` on, the last up to token
    ``tail``; ``cur.sample_pos`` indexes ``order`` and ``cur.token_pos`` the trimmed sample.
    Call ``close`` when done (it closes the open shard's file).
    """

    def __init__(self, base: str, shards: list[dict[str, Any]], plan: ReaderPlan, cursor: Cursor, *, seed: int,
                 verify: bool, policy: str) -> None:
        self.base, self.shards, self.plan, self.cur = base, shards, plan, cursor
        self.seed, self.verify, self.policy = seed, verify, policy
        self._shard: Optional[ShardFile] = None
        self._order = np.zeros(0, dtype=np.int64)
        self._head, self._tail = 0, None
        # the token after the range when the range ends inside a document: the next reader's first
        # input, but also the right label for this reader's last token
        self._after: Optional[int] = None

    def _load(self) -> bool:
        """Open the current shard; False at the end of the stream."""
        while self._shard is None:
            if self.cur.shard_pos >= len(self.plan.shards):
                return False
            idx = self.plan.shards[self.cur.shard_pos]
            entry = self.shards[idx]
            n = int(entry["docs"])
            lo, hi, head, tail = self.plan.bounds(self.cur.shard_pos, n)
            order = sample_order(n, self.seed, self.cur.epoch, idx)[lo:hi]
            keep = np.zeros(n, dtype=bool)
            keep[order] = True
            try:
                self._shard = open_shard(self.base, entry, keep, self.verify)
            except DataError as exc:
                if self.policy == "raise":
                    raise
                warnings.warn(f"skipping {exc}", RuntimeWarning, stacklevel=2)
                if entry["name"] not in self.cur.bad_shards:
                    self.cur.bad_shards.append(entry["name"])
                self._advance_shard()
                continue
            self._order, self._head, self._tail = order, head, tail
            if tail is not None:
                last = int(order[-1])
                self._after = int(self._shard.read(last, tail, tail + 1)[0]) if tail < self._shard.lengths[last] else None
        return True

    def _advance_shard(self) -> None:
        self.close()
        self.cur.shard_pos += 1
        self.cur.sample_pos = self.cur.token_pos = 0

    def _current(self) -> Optional[tuple[int, int, int, bool]]:
        """(stored sample, first token, end token, starts a document) of the selected sample at the cursor."""
        while self._load():
            assert self._shard is not None
            k = self.cur.sample_pos
            if k < len(self._order):
                i = int(self._order[k])
                a = self._head if k == 0 else 0
                b = self._tail if k == len(self._order) - 1 and self._tail is not None else self._shard.lengths[i]
                return i, a, b, a == 0
            self._advance_shard()
        return None

    def take(self, n: int) -> list[tuple[np.ndarray, bool]]:
        """Up to ``n`` tokens as ``(tokens, starts_document)`` pieces; fewer at the stream's end."""
        pieces = []
        while n > 0:
            current = self._current()
            if current is None:
                break
            i, a, b, starts = current
            t = self.cur.token_pos
            assert self._shard is not None
            piece = self._shard.read(i, a + t, min(a + t + n, b))
            pieces.append((piece, starts and t == 0))
            n -= len(piece)
            if a + t + len(piece) >= b:
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
        i, a, _, starts = current
        t = self.cur.token_pos
        assert self._shard is not None
        return int(self._shard.read(i, a + t, a + t + 1)[0]), starts and t == 0

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None
