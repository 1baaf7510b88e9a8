"""Shard writer: corpus -> tokenized WebDataset ``.tar`` shards + ``tokenizer.json`` + manifest.

Documents stream from the corpus (never all in memory) and are tokenized in a
``multiprocessing.Pool`` with ordered ``imap``, a bounded batch at a time, so the shards are
byte-identical for any worker count. Each document (eos appended) is one sample::

    <key>.tokens.npy   (n,) uint16 (uint32 when the vocab exceeds 65536)
    <key>.doc_id       decimal corpus index
    <key>.source       path or ``file.jsonl:LINE``

A document goes to ``val`` when ``sha256(f"{seed}:{index}")`` maps below ``val_fraction``:
deterministic, independent of worker count and of the caps. A shard is closed once it holds at
least ``shard_tokens`` tokens (documents are never split across shards). Everything is written
under temporary names and renamed at the end, the manifest last, so a crash never leaves a
manifest that points at incomplete shards.
"""
from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar, Union

import numpy as np

from hybrid_lm.data import corpus
from hybrid_lm.data.errors import DataError, DataWarning
from hybrid_lm.data.manifest import FILE_NAME as MANIFEST, VERSION, sha256_file
from hybrid_lm.data.tokenizer import FILE_NAME as TOKENIZER, Tokenizer

TMP_PREFIX = ".tmp-"


def is_val(index: int, seed: int, val_fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 < val_fraction


@dataclass
class _Shard:
    name: str
    tokens: int = 0
    docs: int = 0
    sample_tokens: list[int] = field(default_factory=list)


class SplitWriter:
    """Writes one split's samples into ``<split>-NNNNN.tar`` shards of about ``shard_tokens`` tokens."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: type) -> None:
        import webdataset as wds

        self._wds, self.out, self.split, self.shard_tokens, self.dtype = wds, out, split, shard_tokens, dtype
        self.done: list[_Shard] = []
        self._cur: Optional[_Shard] = None
        self._tar: Any = None

    def write(self, doc_id: int, source: str, tokens: np.ndarray) -> None:
        """tokens: (n,) ids including the trailing eos."""
        if self._cur is None:
            self._cur = _Shard(f"{self.split}-{len(self.done):05d}.tar")
            # a fixed mtime makes the tar bytes (and so the manifest's sha256) reproducible
            self._tar = self._wds.TarWriter(str(self.out / (TMP_PREFIX + self._cur.name)), mtime=0.0)
        self._tar.write({"__key__": f"{doc_id:010d}", "tokens.npy": tokens.astype(self.dtype),
                         "doc_id": str(doc_id).encode(), "source": source.encode("utf-8", errors="replace")})
        self._cur.tokens += len(tokens)
        self._cur.docs += 1
        self._cur.sample_tokens.append(len(tokens))
        if self._cur.tokens >= self.shard_tokens:
            self._close()

    def _close(self) -> None:
        if self._cur is not None:
            self._tar.close()
            self.done.append(self._cur)
            self._cur, self._tar = None, None

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        entries = []
        for s in self.done:
            tmp = self.out / (TMP_PREFIX + s.name)
            entries.append({"name": s.name, "tokens": s.tokens, "docs": s.docs, "bytes": tmp.stat().st_size,
                            "sha256": sha256_file(tmp), "sample_tokens": s.sample_tokens})
        return entries


# worker-process tokenizer, set once per process by the pool initializer
_TOK: Optional[Tokenizer] = None


def _init_worker(tokenizer_json: str) -> None:
    global _TOK
    from tokenizers import Tokenizer as HF

    _TOK = Tokenizer(HF.from_str(tokenizer_json))


def _encode(text: str) -> np.ndarray:
    assert _TOK is not None
    return np.append(_TOK.encode_array(text), _TOK.eos_id)


# documents per worker in one batch; two batches are in flight (one tokenizing while the other is
# written), so memory stays bounded by them, not by the corpus (a single Pool.imap over the whole
# corpus would read all of it ahead)
BATCH_PER_WORKER = 256

T = TypeVar("T")


def encode_parallel(tok: Tokenizer, items: Iterable[T], workers: int,
                    text: Callable[[T], str] = str) -> Iterator[tuple[T, np.ndarray]]:
    """``(item, ids + eos of text(item))`` in input order, using ``workers`` processes (<= 1:
    in-process). ``items`` is read lazily, ``workers * BATCH_PER_WORKER`` at a time."""
    if workers <= 1:
        _init_worker(tok.hf.to_str())
        for item in items:
            yield item, _encode(text(item))
        return
    items = iter(items)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.hf.to_str(),)) as pool:

        def submit() -> tuple[list[T], Iterator[np.ndarray]]:
            batch = list(itertools.islice(items, workers * BATCH_PER_WORKER))
            return batch, pool.imap(_encode, [text(item) for item in batch], chunksize=8)

        batch, encoded = submit()
        while batch:
            upcoming = submit()  # the pool works on it while this batch is consumed
            yield from zip(batch, encoded)
            batch, encoded = upcoming


def make_tokenizer(spec: str, input_spec: str, vocab_size: int, max_docs: Optional[int],
                   max_bytes: Optional[int]) -> Tokenizer:
    if spec == "bpe":
        texts = (d.text for d in corpus.iter_documents(input_spec, max_docs, max_bytes))
        return Tokenizer.train(texts, vocab_size)
    return Tokenizer.from_spec(spec)


def build_shards(input: str = corpus.STDLIB, out: Union[str, Path] = "artifacts/data", *,
                 tokenizer: Union[str, Tokenizer] = "byte", vocab_size: int = 8192, shard_tokens: int = 1 << 20,
                 val_fraction: float = 0.01, workers: int = 1, seed: int = 0, max_docs: Optional[int] = None,
                 max_bytes: Optional[int] = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``input`` into shards under ``out``; returns the manifest dict (also written).

    ``tokenizer``: ``"byte"``, ``"bpe"`` (trained here on the same corpus slice with
    ``vocab_size``), a ``tokenizer.json`` path, or a ``Tokenizer``.
    """
    out = Path(out)
    if (out / MANIFEST).exists() and not force:
        raise DataError(f"{out / MANIFEST} already exists; pass --force (force=True) to rebuild")
    if shard_tokens < 1 or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"bad arguments: shard_tokens={shard_tokens} (>= 1), val_fraction={val_fraction} (in [0, 1))")
    out.mkdir(parents=True, exist_ok=True)
    old = _previous_outputs(out)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else make_tokenizer(tokenizer, input, vocab_size, max_docs, max_bytes)

    # streamed, never listed: a corpus larger than memory goes through in bounded batches
    docs = corpus.iter_documents(input, max_docs, max_bytes)
    first = next(docs, None)
    if first is None:
        raise DataError(f"input {input!r} ({corpus.describe(input)}) has no non-empty documents")
    docs = itertools.chain([first], docs)
    from tqdm import tqdm

    bar = tqdm(total=max_docs, unit="doc", desc="tokenize", disable=not progress, dynamic_ncols=True)
    items = ((d.index, d.source, ids) for d, ids in encode_parallel(tok, docs, workers, text=lambda d: d.text))
    source = {"input": input, "description": corpus.describe(input), "max_docs": max_docs, "max_bytes": max_bytes}
    try:
        manifest = write_token_shards(out, tok, items, shard_tokens=shard_tokens, val_fraction=val_fraction,
                                      seed=seed, source=source, bar=bar, old=old)
    finally:
        bar.close()
    _warn_if_val_empty(manifest, out)
    return manifest


def _warn_if_val_empty(manifest: dict[str, Any], out: Path) -> None:
    """Every eval hook reads the val split (and a fresh run evaluates before its first step), so an
    empty one is said now, with what to change, instead of failing the first eval of a training run."""
    if manifest["splits"]["val"]["docs"]:
        return
    n, fraction = manifest["totals"]["docs"], manifest["val_fraction"]
    if fraction > 0:
        advice = (f"rebuild with more documents or a larger --val-fraction (e.g. --val-fraction {min(0.5, 10 / n):.2g}), "
                  f"or train with eval.hooks=[]")
    else:
        advice = "train with eval.hooks=[], or rebuild with --val-fraction > 0 to evaluate"
    warnings.warn(f"{out}: the val split is empty ({n} documents, val_fraction={fraction}); {advice}",
                  DataWarning, stacklevel=3)


def write_token_shards(out: Union[str, Path], tok: Tokenizer, items: Iterable[tuple[int, str, np.ndarray]], *,
                       shard_tokens: int, val_fraction: float, seed: int, source: dict[str, Any],
                       bar: Any = None, old: Optional[list[Path]] = None) -> dict[str, Any]:
    """Write already-tokenized documents ``(doc_id, source, ids (n,) incl. eos)`` as shards + manifest.

    The second half of ``build_shards``; tests use it to write synthetic token streams.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = _previous_outputs(out) if old is None else old
    writers = {s: SplitWriter(out, s, shard_tokens, tok.token_dtype) for s in ("train", "val")}
    total_tokens = n_docs = 0
    for index, src, ids in items:
        split = "val" if is_val(index, seed, val_fraction) else "train"
        writers[split].write(index, src, ids)
        total_tokens += len(ids)
        n_docs += 1
        if bar is not None:
            bar.update(1)
            if bar.n % 64 == 0:
                bar.set_postfix(tokens=f"{total_tokens:,}", refresh=False)
    if bar is not None:
        bar.set_postfix(tokens=f"{total_tokens:,}")
    splits = {}
    for name, w in writers.items():
        entries = w.finish()
        splits[name] = {"docs": sum(e["docs"] for e in entries), "tokens": sum(e["tokens"] for e in entries),
                        "shards": entries}
    tmp_dir = out / (TMP_PREFIX + "tok")
    tok.save(tmp_dir)
    os.replace(tmp_dir / TOKENIZER, out / (TMP_PREFIX + TOKENIZER))
    shutil.rmtree(tmp_dir, ignore_errors=True)
    manifest = {
        "version": VERSION, "source": source,
        "tokenizer": {"file": TOKENIZER, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "token_dtype": np.dtype(tok.token_dtype).name, "seed": seed, "val_fraction": val_fraction,
        "shard_tokens": shard_tokens, "splits": splits,
        "totals": {"docs": n_docs, "tokens": total_tokens,
                   "shards": sum(len(s["shards"]) for s in splits.values())},
    }
    _commit(out, old, [e["name"] for s in splits.values() for e in s["shards"]], manifest)
    return manifest


def _previous_outputs(out: Path) -> list[Path]:
    """Shards/manifest of an earlier build (removed only once the new build is complete)."""
    found = [p for p in out.iterdir() if p.name.endswith(".tar") and p.name.split("-")[0] in ("train", "val")]
    for p in out.iterdir():
        if p.name.startswith(TMP_PREFIX):
            (shutil.rmtree if p.is_dir() else os.remove)(p)
    return found


def _commit(out: Path, old: list[Path], names: list[str], manifest: dict[str, Any]) -> None:
    import json

    # the old manifest goes first: from here until the new one lands there is no manifest at all
    (out / MANIFEST).unlink(missing_ok=True)
    keep = set(names)
    for p in old:
        if p.name not in keep:
            p.unlink(missing_ok=True)
    for name in names:
        os.replace(out / (TMP_PREFIX + name), out / name)
    os.replace(out / (TMP_PREFIX + TOKENIZER), out / TOKENIZER)
    tmp = out / (TMP_PREFIX + MANIFEST)
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
