"""``manifest.json``: the one file that says what a shard folder contains.

Written last by the shard writer, so its presence means every shard it names is complete. The
loader plans each epoch from it alone (shard token counts and per-sample token counts), which is
how every rank agrees on the number of batches without reading a byte of shard data or talking to
the other ranks. Layout (version 1)::

    {"version": 1,
     "source": {"input": "stdlib", "description": "...", "max_docs": null, "max_bytes": null},
     "tokenizer": {"file": "tokenizer.json", "fingerprint": "<sha256>", "vocab_size": 258,
                   "eos_id": 256, "pad_id": 257},
     "token_dtype": "uint16", "seed": 0, "val_fraction": 0.01, "shard_tokens": 1048576,
     "splits": {"train": {"docs": D, "tokens": N, "shards": [
                   {"name": "train-00000.tar", "tokens": n, "docs": d, "bytes": b, "sha256": "...",
                    "sample_tokens": [len_0, len_1, ...]}, ...]},
                "val": {...}},
     "totals": {"docs": D, "tokens": N, "shards": S}}

``sample_tokens`` lists each sample's token count (eos included) in the order stored in the tar.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from hybrid_lm.data.errors import DataError
from hybrid_lm.data.tokenizer import FILE_NAME as TOKENIZER_FILE, Tokenizer

VERSION = 1
FILE_NAME = "manifest.json"
SPLITS = ("train", "val")


def is_remote(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def join(base: str, name: str) -> str:
    """``base/name`` for a local folder, URL prefix or ``pipe:`` command prefix."""
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def read_bytes(url: str) -> bytes:
    if is_remote(url):
        from webdataset import gopen

        with gopen(url, "rb") as f:
            return f.read()
    return Path(url).read_bytes()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(base: str) -> dict[str, Any]:
    """Parse and sanity-check ``base/manifest.json``; ``DataError`` naming the file otherwise."""
    url = join(base, FILE_NAME)
    try:
        raw = read_bytes(url)
    except (OSError, ValueError) as exc:
        raise DataError(f"no shard manifest at {url} ({exc.__class__.__name__}); "
                        f"build shards first: hybrid-lm data build --out {base}") from exc
    if not raw:
        raise DataError(f"no shard manifest at {url} (empty); build shards first: hybrid-lm data build --out {base}")
    try:
        m = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{url}: not valid JSON ({exc.msg})") from exc
    if m.get("version") != VERSION:
        raise DataError(f"{url}: manifest version {m.get('version')!r}, this loader reads version {VERSION}")
    for key in ("tokenizer", "splits", "token_dtype"):
        if key not in m:
            raise DataError(f"{url}: missing key {key!r}")
    return m


def check_tokenizer(m: dict[str, Any], base: str, expected_vocab_size: Optional[int],
                    expected_fingerprint: Optional[str]) -> None:
    """Fail when the shards' tokenizer is not the one training will use: the manifest's record must
    match the ``tokenizer.json`` next to the shards (when local), and the config's pins when set."""
    tok = m["tokenizer"]
    url = join(base, FILE_NAME)
    if expected_vocab_size is not None and tok["vocab_size"] != expected_vocab_size:
        raise DataError(f"tokenizer mismatch: {url} says vocab_size={tok['vocab_size']} but the config expects "
                        f"expected_vocab_size={expected_vocab_size}")
    if expected_fingerprint is not None and tok["fingerprint"] != expected_fingerprint:
        raise DataError(f"tokenizer mismatch: {url} says fingerprint={tok['fingerprint']} but the config expects "
                        f"tokenizer_fingerprint={expected_fingerprint}")
    check_tokenizer_file(m, base)


def check_tokenizer_file(m: dict[str, Any], base: str) -> None:
    """The tokenizer file next to the shards must be the one the manifest says tokenized them.

    That file is what training copies into checkpoints and exports, so a swapped one would ship a
    model whose ids decode to the wrong text. Skipped for remote shards (every rank would fetch it
    at start-up; pin ``data.tokenizer_fingerprint`` instead) and when the file is absent (nothing
    ships it; ``hybrid-lm data inspect`` reports that).
    """
    if is_remote(base):
        return
    rec = m["tokenizer"]
    path = Path(base) / rec.get("file", TOKENIZER_FILE)
    if not path.is_file():
        return
    # the writer saves the canonical text whose sha256 is the fingerprint: an untouched file
    # matches without parsing it
    if sha256_file(path) == rec["fingerprint"]:
        return
    found = Tokenizer.load(path)
    if found.fingerprint() == rec["fingerprint"]:
        return  # the same tokenizer, only re-serialized
    raise DataError(f"tokenizer mismatch: {join(base, FILE_NAME)} says the shards were tokenized with "
                    f"fingerprint={rec['fingerprint']} vocab_size={rec['vocab_size']}, but {path} has "
                    f"fingerprint={found.fingerprint()} vocab_size={found.vocab_size}; put back the tokenizer.json "
                    f"the shards were built with, or rebuild the shards with this one")


def split_shards(m: dict[str, Any], split: str, base: str) -> list[dict[str, Any]]:
    if split not in m["splits"]:
        raise DataError(f"{join(base, FILE_NAME)}: no split {split!r} (has {sorted(m['splits'])})")
    shards = m["splits"][split]["shards"]
    if not shards or not m["splits"][split]["tokens"]:
        raise DataError(f"{join(base, FILE_NAME)}: split {split!r} is empty (0 shards/tokens); "
                        f"rebuild with more documents or another --val-fraction")
    return shards


def verify(base: Path) -> list[str]:
    """Problems found by re-hashing every shard of a local folder (empty list: all good)."""
    m = load_manifest(str(base))
    problems = []
    for split, info in m["splits"].items():
        for s in info["shards"]:
            p = base / s["name"]
            if not p.is_file():
                problems.append(f"{p}: missing")
            elif p.stat().st_size != s["bytes"]:
                problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {s['bytes']}")
            elif sha256_file(p) != s["sha256"]:
                problems.append(f"{p}: sha256 differs from the manifest")
    tok_file = base / m["tokenizer"]["file"]
    if not tok_file.is_file():
        problems.append(f"{tok_file}: missing")
    return problems


def summary(m: dict[str, Any]) -> str:
    lines = [f"source:    {m['source'].get('description', m['source'].get('input'))}",
             f"tokenizer: {m['tokenizer']['file']} vocab={m['tokenizer']['vocab_size']} "
             f"eos={m['tokenizer']['eos_id']} pad={m['tokenizer']['pad_id']} sha256={m['tokenizer']['fingerprint'][:16]}...",
             f"dtype:     {m['token_dtype']}  seed={m.get('seed')} val_fraction={m.get('val_fraction')}"]
    for split, info in m["splits"].items():
        lines.append(f"{split:<6} {len(info['shards']):>5} shards {info['docs']:>9,} docs {info['tokens']:>13,} tokens")
    t = m["totals"]
    lines.append(f"total  {t['shards']:>5} shards {t['docs']:>9,} docs {t['tokens']:>13,} tokens")
    return "\n".join(lines)
