"""``build_loader``: a resumable, rank- and worker-sharded stream of packed (B, T) batches.

Built around one idea: every reader's output is a pure function of (manifest, seed, epoch,
reader id, cursor), so the loader owns the order instead of trusting torch or webdataset to.

* Equal batches per rank. Each epoch every reader reads a contiguous token range of the epoch's
  shuffled stream (``source.reader_ranges``), computed from the manifest alone: for ``train`` the
  ranges are ``Q = floor(N / (R*B*T)) * B*T`` tokens each, so the epoch drops only the stream's
  last ``N mod (R*B*T)`` tokens (< one batch per reader, the least equal counts allow); for
  ``val`` they cover the stream, each boundary moved back to a document start, and the quota is
  ``ceil(max_r tokens_r / (B*T))`` (nothing dropped; short readers pad with label -100). So every
  rank yields ``quota * W`` batches per epoch and no collective can hang.
* Order across workers. Workers take turns strictly: batch i of the rank comes from logical
  worker ``(start + i) % W``. torch's DataLoader hands out iterable-dataset batches round-robin
  from worker 0, so on resume DataLoader worker k plays logical worker ``(k + start) % W``.
* Row streams (``data.row_streams``, train only). Normally a batch's B rows are B consecutive
  pieces of the reader's stream, so row b of batch i+1 is far from row b of batch i. With row
  streams each reader's range is cut into B sub-ranges, row b reads only sub-range b with its
  own cursor, and row b of every batch continues row b of the reader's previous batch: what
  carrying a recurrent state from batch to batch (``train.state_passing``) needs. Same tokens
  per epoch (``floor(N / (R*B*T))*T`` per row stream), B open shards per reader instead of one.
* State. Each batch travels with its worker's cursor *after* that batch; the loader records it
  when it hands the batch to the caller, so ``state_dict()`` is exact whatever has been
  prefetched. ``train`` loops over epochs forever (the epoch reshuffles); ``val`` is one pass.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybrid_lm.data.config import DataConfig
from hybrid_lm.data.errors import DataError
from hybrid_lm.data.manifest import check_tokenizer, is_remote, load_manifest, split_shards
from hybrid_lm.data.packing import pack_rows
from hybrid_lm.data.source import ReaderPlan, plan_epoch, reader_ranges
from hybrid_lm.data.state import STATE_VERSION, Cursor, check_compatible
from hybrid_lm.data.stream import TokenStream
from hybrid_lm.typed_config import validate_section

Batch = dict[str, torch.Tensor]


def tokenizer_path(cfg: DataConfig) -> Path:
    """Where the shards' tokenizer lives (``<path>/tokenizer.json``)."""
    return Path(cfg.path) / "tokenizer.json"


class _Plan:
    """The manifest-derived facts every reader needs; picklable into worker processes."""

    def __init__(self, cfg: DataConfig, split: str, rank: int, world_size: int) -> None:
        validate_section(cfg, "data")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.base = cfg.path if is_remote(cfg.path) else str(Path(cfg.path))
        manifest = load_manifest(self.base)
        check_tokenizer(manifest, self.base, cfg.expected_vocab_size, cfg.tokenizer_fingerprint)
        self.shards = split_shards(manifest, split, self.base)
        self.pad_id = int(manifest["tokenizer"]["pad_id"])
        self.workers = max(1, cfg.num_workers)
        self.readers = world_size * self.workers
        self.rows = cfg.micro_batch_size * cfg.seq_len
        total = sum(int(s["tokens"]) for s in self.shards)
        # row streams: B sub-readers of one row each per reader; cursor k of worker w is row k % B
        self.streams = cfg.micro_batch_size if cfg.row_streams and split == "train" else 1
        self.ranges = reader_ranges(total, self.readers * self.streams, self.rows // self.streams,
                                    drop_remainder=split == "train")
        # val keeps documents whole: it pads anyway, and a cut would lose the target across it
        self.whole_samples = split != "train"
        self._quota: dict[int, int] = {}
        if self.quota(0) == 0:
            need = self.readers * self.rows
            raise DataError(f"{self.base}: split {split!r} has {total:,} tokens; one batch for each of "
                            f"{self.readers} readers (world_size x workers) needs {need:,}")

    def plans(self, epoch: int, readers: Optional[list[int]] = None) -> list[ReaderPlan]:
        """The plans of global readers ``readers`` (default: all) for ``epoch``."""
        ranges = [self.ranges[g] for g in (range(self.readers) if readers is None else readers)]
        return plan_epoch(self.shards, self.cfg.seed, epoch, ranges, whole_samples=self.whole_samples)

    def quota(self, epoch: int = 0) -> int:
        """Batches every reader yields in ``epoch``."""
        if self.split == "train":  # equal ranges of whole batches: the same every epoch
            return (self.ranges[0][1] - self.ranges[0][0]) * self.streams // self.rows
        if epoch not in self._quota:
            # snapped val ranges depend on the epoch's shuffle by up to a document
            self._quota = {epoch: math.ceil(max(p.tokens for p in self.plans(epoch)) / self.rows)}
        return self._quota[epoch]

    def row_stream_batches(self, worker: int, cursors: list[Cursor]) -> Iterator[tuple[Batch, list[Cursor]]]:
        """``reader_batches`` with row streams: row b of each batch from sub-reader b's own cursor."""
        cfg, rows = self.cfg, self.streams
        first = (self.rank * self.workers + worker) * rows  # global index of this reader's row 0
        curs = copy.deepcopy(cursors)
        while True:
            quota = self.quota(curs[0].epoch)
            if curs[0].batches >= quota:
                curs = [c.next_epoch() for c in curs]
                continue
            plans = self.plans(curs[0].epoch, list(range(first, first + rows)))
            streams = [TokenStream(self.base, self.shards, plan, cur, seed=cfg.seed, verify=cfg.verify_checksums,
                                   policy=cfg.bad_shard_policy) for plan, cur in zip(plans, curs)]
            try:
                while curs[0].batches < quota:
                    parts = []
                    for stream, cur in zip(streams, curs):
                        pieces = stream.take(cfg.seq_len)
                        full = sum(len(p) for p, _ in pieces) == cfg.seq_len
                        cur.padded_rows += int(not full)
                        parts.append(pack_rows(pieces, stream.peek() if full else None, 1, cfg.seq_len, self.pad_id))
                        cur.batches += 1
                    yield {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, copy.deepcopy(curs)
            finally:
                for stream in streams:
                    stream.close()

    def reader_batches(self, worker: int, cursor: Cursor) -> Iterator[tuple[Batch, Cursor]]:
        """Batches of logical worker ``worker`` from ``cursor``, each with the cursor after it."""
        cfg, g = self.cfg, self.rank * self.workers + worker
        cur = copy.deepcopy(cursor)
        while True:
            quota = self.quota(cur.epoch)
            if cur.batches >= quota:
                if self.split != "train":
                    return
                cur = cur.next_epoch()
                continue
            plan = self.plans(cur.epoch, [g])[0]
            stream = TokenStream(self.base, self.shards, plan, cur, seed=cfg.seed,
                                 verify=cfg.verify_checksums, policy=cfg.bad_shard_policy)
            try:
                while cur.batches < quota:
                    pieces = stream.take(self.rows)
                    got = sum(len(p) for p, _ in pieces)
                    if got < self.rows:
                        cur.padded_rows += math.ceil((self.rows - got) / cfg.seq_len)
                    batch = pack_rows(pieces, stream.peek() if got == self.rows else None,
                                      cfg.micro_batch_size, cfg.seq_len, self.pad_id)
                    cur.batches += 1
                    yield batch, copy.deepcopy(cur)
            finally:  # also when the caller stops early: the open shard's file (or spool) is released
                stream.close()


def _identity(x: Any) -> Any:
    return x


class _WorkerDataset(IterableDataset):
    def __init__(self, plan: _Plan, cursors: list[Cursor], start: int) -> None:
        self.plan, self.cursors, self.start = plan, cursors, start

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any], int]]:
        info = get_worker_info()
        w = ((info.id if info is not None else 0) + self.start) % self.plan.workers
        for batch, cur in _worker_batches(self.plan, w, self.cursors):
            yield batch, [c.to_dict() for c in cur], w


def _worker_batches(plan: _Plan, worker: int, cursors: list[Cursor]) -> Iterator[tuple[Batch, list[Cursor]]]:
    """Logical worker ``worker``'s batches from its slice of the loader's flat cursor list (one cursor
    per worker, or per row stream), each with the slice after it."""
    n = plan.streams
    mine = cursors[worker * n:(worker + 1) * n]
    if n > 1:
        yield from plan.row_stream_batches(worker, mine)
        return
    for batch, cur in plan.reader_batches(worker, mine[0]):
        yield batch, [cur]


class ResumableLoader:
    """Iterable of batches (dict of (B, T) int64 tensors, see ``packing``) with exact resume."""

    def __init__(self, plan: _Plan) -> None:
        self._plan = plan
        self._cursors = [Cursor() for _ in range(plan.workers * plan.streams)]
        self._next = 0

    @property
    def cfg(self) -> DataConfig:
        return self._plan.cfg

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Batches this rank yields in ``epoch`` (the same on every rank)."""
        return self._plan.quota(epoch) * self._plan.workers

    def __len__(self) -> int:
        if self._plan.split == "train":
            raise TypeError("the train loader is infinite; use batches_per_epoch()")
        return self.batches_per_epoch(0)

    @property
    def epoch(self) -> int:
        return self._cursors[self._next * self._plan.streams].epoch

    @property
    def stats(self) -> dict[str, Any]:
        bad = sorted({name for c in self._cursors for name in c.bad_shards})
        return {"bad_shards": len(bad), "bad_shard_names": bad,
                "padded_rows": sum(c.padded_rows for c in self._cursors),
                "batches": sum(c.batches for c in self._cursors[::self._plan.streams]), "epoch": self.epoch}

    def __iter__(self) -> Iterator[Batch]:
        p = self._plan
        if p.cfg.num_workers == 0:
            for batch, cur in _worker_batches(p, 0, self._cursors):
                self._cursors = cur
                yield batch
            return
        dataset = _WorkerDataset(p, copy.deepcopy(self._cursors), self._next)
        # a private generator: creating the iterator must not draw from torch's global RNG
        loader = DataLoader(dataset, batch_size=None, num_workers=p.cfg.num_workers, collate_fn=_identity,
                            prefetch_factor=p.cfg.prefetch_factor, generator=torch.Generator().manual_seed(0),
                            multiprocessing_context="fork" if hasattr(__import__("os"), "fork") else None)
        n = p.streams
        for batch, cur, w in loader:
            self._cursors[w * n:(w + 1) * n] = [Cursor.from_dict(c) for c in cur]
            self._next = (w + 1) % p.workers
            yield batch

    def _header(self) -> dict[str, Any]:
        p = self._plan
        return {"version": STATE_VERSION, "split": p.split, "seed": p.cfg.seed, "rank": p.rank,
                "world_size": p.world_size, "num_workers": p.cfg.num_workers, "seq_len": p.cfg.seq_len,
                "micro_batch_size": p.cfg.micro_batch_size, "row_streams": p.streams > 1}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch handed out."""
        return {**self._header(), "next_worker": self._next, "cursors": [c.to_dict() for c in self._cursors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state.get("row_streams", False)) != (self._plan.streams > 1):
            raise DataError(f"loader state was saved with data.row_streams={bool(state.get('row_streams', False))}, "
                            f"this loader has row streams {'on' if self._plan.streams > 1 else 'off'}; the data order "
                            f"depends on it, so resume with the same value")
        check_compatible(state, {**self._header(), "cursors": self._cursors})
        self._cursors = [Cursor.from_dict(c) for c in state["cursors"]]
        self._next = int(state["next_worker"]) % self._plan.workers


def build_loader(cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1) -> ResumableLoader:
    """The loader of ``split`` ("train": endless epochs, "val": one pass) for one data-parallel rank.

    Fails at once with ``DataError`` on a missing/invalid manifest, an empty split, a local
    ``tokenizer.json`` that is not the tokenizer the manifest records, or a tokenizer that differs
    from the pins ``cfg.expected_vocab_size`` / ``cfg.tokenizer_fingerprint``.
    """
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    return ResumableLoader(_Plan(cfg, split, rank, world_size))
