"""Corpus inputs: the embedded stdlib corpus, a folder of text files, a JSONL file, or a glob.

The default corpus is the running interpreter's standard library ``.py`` files: it is always
present, needs no network, is real code and is about 30 MB, so the tiny main job and the tests can
train on something meaningful. Every input is enumerated in a deterministic sorted order so a
document's index (which decides its train/val split and its ``doc_id``) never depends on the
file system's listing order.
"""
from __future__ import annotations

import glob as globmod
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from hybrid_lm.data.errors import DataError

STDLIB = "stdlib"


@dataclass(frozen=True)
class Document:
    index: int
    """position in the corpus order (before caps stop it); the document's ``doc_id``"""
    source: str
    """where it came from: a relative path, or ``file.jsonl:LINE``"""
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[Path, str]]:
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # walking order is OS-dependent; pruning in place keeps site-packages' third-party code out
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                out.append((p, "stdlib/" + p.relative_to(root).as_posix()))
    return sorted(out, key=lambda x: x[1])


def _folder_files(root: Path) -> list[tuple[Path, str]]:
    files = [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(((p, p.relative_to(root).as_posix()) for p in files), key=lambda x: x[1])


def _read_text(path: Path) -> Optional[str]:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:  # binary file in a text folder: not a document
        return None
    return raw.decode("utf-8", errors="replace")


def _jsonl_docs(path: Path) -> Iterator[tuple[str, str]]:
    # bytes, decoded line by line: a text-mode reader fails on a bad byte somewhere in its read-ahead,
    # so it cannot say which line held it
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                                f"re-encode the file (e.g. iconv -f latin1 -t utf-8) or drop the line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
            yield f"{path.name}:{lineno}", record["text"]


def _texts(spec: str) -> Iterator[tuple[str, str]]:
    if spec == STDLIB:
        for p, src in _stdlib_files():
            text = _read_text(p)
            if text is not None:
                yield src, text
        return
    p = Path(spec)
    if p.is_dir():
        for f, src in _folder_files(p):
            yield from _file_texts(f, src)
    elif p.is_file():
        yield from _file_texts(p, p.name)
    else:
        matches = sorted(globmod.glob(spec, recursive=True))
        if not matches:
            raise DataError(f"input {spec!r}: no such file or folder, and the glob matches nothing")
        for m in matches:
            yield from _texts(m) if Path(m).is_dir() else _file_texts(Path(m), m)


def _file_texts(path: Path, src: str) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        yield from _jsonl_docs(path)
        return
    text = _read_text(path)
    if text is not None:
        yield src, text


def iter_documents(spec: str = STDLIB, max_docs: Optional[int] = None,
                   max_bytes: Optional[int] = None) -> Iterator[Document]:
    """Non-empty documents of ``spec`` in corpus order, stopping at the caps.

    ``max_bytes`` counts UTF-8 bytes of text; the document that reaches the cap is included.
    """
    n, nbytes = 0, 0
    for src, text in _texts(spec):
        if max_docs is not None and n >= max_docs:
            return
        if max_bytes is not None and nbytes >= max_bytes:
            return
        if not text:
            continue
        yield Document(n, src, text)
        n += 1
        nbytes += len(text.encode("utf-8", errors="replace"))


def describe(spec: str) -> str:
    if spec == STDLIB:
        return f"stdlib .py files of {stdlib_root()} (site-packages excluded)"
    return spec
