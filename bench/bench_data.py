"""Data pipeline throughput: shard writer and loader, each against a no-frills baseline.

    python bench/bench_data.py [--max-bytes 8000000] [--repeats 3] [--batches 60]

* writer: ``build_shards`` tokens/s with 1 and 2 tokenizer workers vs raw single-process
  tokenization of the same documents (no tar, no hashing, no I/O);
* loader: ``build_loader`` tokens/s at seq_len 2048, micro batch 8, 0 and 2 workers vs reading the
  same shards with plain ``tarfile`` + ``numpy.load`` (no shuffle, packing or tensors).

Medians over repeats; ratios are against the baseline of the same section.
"""
from __future__ import annotations

import argparse
import io
import itertools
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from hybrid_lm.data.config import DataConfig
from hybrid_lm.data.corpus import iter_documents
from hybrid_lm.data.loader import build_loader
from hybrid_lm.data.tokenizer import Tokenizer
from hybrid_lm.data.writer import build_shards


def _median_rate(fn, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_writer(tmp: Path, tokenizer: str, max_bytes: int, repeats: int) -> list[tuple[str, float]]:
    tok = Tokenizer.from_spec(tokenizer)
    docs = [d.text for d in iter_documents("stdlib", max_bytes=max_bytes)]

    def raw() -> int:
        return sum(len(tok.encode_array(d)) + 1 for d in docs)

    def build(workers: int) -> int:
        m = build_shards("stdlib", tmp / f"w{workers}", tokenizer=tokenizer, max_bytes=max_bytes, workers=workers,
                         force=True, progress=False)
        return m["totals"]["tokens"]

    rows = [("writer 1 worker", _median_rate(lambda: build(1), repeats)),
            ("writer 2 workers", _median_rate(lambda: build(2), repeats))]
    return [("baseline: raw tokenize", _median_rate(raw, repeats))] + rows


def bench_loader(path: Path, batches: int, repeats: int) -> list[tuple[str, float]]:
    names = sorted(p for p in path.glob("train-*.tar"))

    def baseline() -> int:
        n = 0
        for name in names:
            with tarfile.open(name) as tar:
                for m in tar:
                    if m.name.endswith(".npy"):
                        n += len(np.load(io.BytesIO(tar.extractfile(m).read())))
            if n >= batches * 8 * 2048:
                break
        return n

    def loader(workers: int) -> int:
        cfg = DataConfig(path=str(path), seq_len=2048, micro_batch_size=8, num_workers=workers)
        it = iter(build_loader(cfg, "train", 0, 1))
        n = sum(int(b["input_ids"].numel()) for b in itertools.islice(it, batches))
        return n

    return [("baseline: tarfile+np.load", _median_rate(baseline, repeats)),
            ("loader 0 workers", _median_rate(lambda: loader(0), repeats)),
            ("loader 2 workers", _median_rate(lambda: loader(2), repeats))]


def _table(title: str, rows: list[tuple[str, float]]) -> None:
    base = rows[0][1]
    print(f"\n{title}\n{'':2}{'case':<28}{'tokens/s':>14}{'vs baseline':>13}")
    for name, rate in rows:
        print(f"  {name:<28}{rate:>14,.0f}{rate / base:>12.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-bytes", type=int, default=8_000_000, help="stdlib slice for the writer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=60, help="loader batches per repeat (8 x 2048 tokens each)")
    ap.add_argument("--bpe", action="store_true", help="also time the writer with a trained BPE tokenizer")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _table(f"shard writer, byte-level, stdlib slice of {args.max_bytes:,} bytes",
               bench_writer(tmp, "byte", args.max_bytes, args.repeats))
        if args.bpe:
            bpe = Tokenizer.train((d.text for d in iter_documents("stdlib", max_bytes=2_000_000)), 4096)
            bpe.save(tmp / "bpe")
            _table(f"shard writer, BPE 4096 (tokens/s of BPE tokens), slice of {args.max_bytes:,} bytes",
                   bench_writer(tmp / "bpe", str(tmp / "bpe" / "tokenizer.json"), args.max_bytes, args.repeats))
        _table(f"loader, seq_len 2048 x micro batch 8, {args.batches} batches",
               bench_loader(tmp / "w1", args.batches, args.repeats))


if __name__ == "__main__":
    main()
