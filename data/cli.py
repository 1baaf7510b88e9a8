"""``hybrid-lm data``: ``build`` shards from a corpus, ``inspect`` a shard folder.

    hybrid-lm data build --input stdlib --out artifacts/data [--tokenizer byte|bpe|PATH] ...
    hybrid-lm data inspect artifacts/data

Errors of the pipeline (``DataError``) print as one line and exit 1 instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from hybrid_lm.data.errors import DataError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="tokenize a corpus into WebDataset shards + manifest.json")
    b.add_argument("--input", default="stdlib",
                   help="'stdlib' (the interpreter's standard library .py files), a folder of text files, "
                        "a .jsonl file with a 'text' field, or a glob of those (default: stdlib)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--tokenizer", default="byte", help="'byte', 'bpe' (trained here) or a tokenizer.json path")
    b.add_argument("--vocab-size", type=int, default=8192, help="BPE vocab size (with --tokenizer bpe)")
    b.add_argument("--shard-tokens", type=int, default=1 << 20, help="target tokens per shard")
    b.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents in the val split")
    b.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any)")
    b.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    b.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    b.add_argument("--max-bytes", type=int, default=None, help="stop once this many text bytes are read")
    b.add_argument("--force", action="store_true", help="replace an existing build in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("inspect", help="print a manifest summary and verify shard checksums")
    i.add_argument("dir", help="shard folder")
    i.add_argument("--no-verify", action="store_true", help="skip re-hashing the shards")


def _build(args: argparse.Namespace) -> int:
    from hybrid_lm.data.errors import DataWarning
    from hybrid_lm.data.manifest import summary
    from hybrid_lm.data.writer import build_shards

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        m = build_shards(args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         shard_tokens=args.shard_tokens, val_fraction=args.val_fraction, workers=args.workers,
                         seed=args.seed, max_docs=args.max_docs, max_bytes=args.max_bytes, force=args.force,
                         progress=not args.quiet)
    print(f"wrote {args.out}\n{summary(m)}", flush=True)
    for w in caught:  # after the summary, so the last thing on the screen is what to change
        if issubclass(w.category, DataWarning):
            print(f"hybrid-lm data: WARNING: {w.message}", file=sys.stderr, flush=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hybrid_lm.data.manifest import load_manifest, summary, verify

    m = load_manifest(args.dir)
    print(summary(m))
    if args.no_verify:
        return 0
    problems = verify(Path(args.dir))
    for p in problems:
        print(f"BAD {p}")
    print("checksums: OK" if not problems else f"checksums: {len(problems)} problem(s)")
    return 0 if not problems else 1


def main(args: argparse.Namespace) -> int:
    try:
        return _build(args) if args.action == "build" else _inspect(args)
    except DataError as exc:
        print(f"hybrid-lm data: error: {exc}", file=sys.stderr)
        return 1
