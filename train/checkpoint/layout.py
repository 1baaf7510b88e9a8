"""Where checkpoints live on disk and when one counts as complete.

    <run_dir>/checkpoints/
        step-0000100/            one complete checkpoint
            ds/                  DeepSpeed's engine.save_checkpoint (model, optimiser; per ZeRO rank)
            zero_to_fp32.py      DeepSpeed's recovery script (it copies it there)
            rank-00000.json      per-rank trainer state: data-loader cursor, python/numpy RNG
            rank-00000.rng.safetensors   per-rank torch CPU/CUDA RNG states
            trainer.json         step, token and skip counters (global)
            config.json          the resolved JobConfig
            tokenizer.json       copy of the data's tokenizer (when the data has one)
            COMPLETE.json        written last: step, world layout, versions, sha256 of every file
        step-0000200.tmp/        a save in progress (or one that crashed): never counts
        latest                   text file naming the newest complete checkpoint

A directory counts only if ``COMPLETE.json`` exists and every file's sha256 matches; ``latest``
is moved (atomic rename) only after the marker exists. This module is pure filesystem code so the
crash/corruption tests can exercise it without a model.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from safetensors import SafetensorError

MARKER = "COMPLETE.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint file could not be written (full disk, quota, I/O error); names the file and the cause."""


# what writers raise on a failed write: Python's file I/O (OSError), torch.save (RuntimeError),
# safetensors (its own error type)
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# torch.save reports a full disk as "unexpected pos ..." or "file write failed", with no errno;
# a filesystem with less than this left is taken to be the cause
_NEARLY_FULL_BYTES = 1 << 20


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def describe_write_error(path: Path, exc: BaseException) -> str:
    """``<file>: <cause>`` for a failed write, in words a user can act on."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{exc.filename or path}: {exc.strerror or os.strerror(exc.errno)}"
    origin = "torch" if isinstance(exc, RuntimeError) else type(exc).__name__
    cause = f"{origin}: {exc}"
    free = free_bytes(path)
    if free is not None and free < _NEARLY_FULL_BYTES:
        cause = f"{os.strerror(errno.ENOSPC)} ({free} bytes free; {cause})"
    return f"{path}: {cause}"


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write inside the block into CheckpointWriteError naming ``path`` (an inner
    ``writing`` that already named a more precise file wins)."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except WRITE_ERRORS as exc:
        raise CheckpointWriteError(describe_write_error(path, exc)) from exc


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-to-temp, fsync, rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def list_files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MARKER)


def write_marker(ckpt: Path, meta: dict[str, Any]) -> None:
    files = {rel: sha256_file(ckpt / rel) for rel in list_files(ckpt)}
    write_json_atomic(ckpt / MARKER, {**meta, "files": files})


def verify(ckpt: Path) -> dict[str, Any]:
    """The marker's contents if ``ckpt`` is complete and intact, else CheckpointError naming the file."""
    marker = ckpt / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{ckpt}: no {MARKER} (the save did not finish)")
    try:
        meta = json.loads(marker.read_text())
        files: dict[str, str] = meta["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{marker}: unreadable completeness marker ({exc})") from exc
    for rel, expected in sorted(files.items()):
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MARKER} but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"{path}: sha256 mismatch (file is {actual[:12]}..., marker says "
                                  f"{expected[:12]}...): truncated or corrupted")
    extra = set(list_files(ckpt)) - set(files)
    if extra:
        raise CheckpointError(f"{ckpt / sorted(extra)[0]}: file not listed in {MARKER}")
    return meta


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Finished-looking step directories, newest first (``.tmp`` ones excluded)."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def newest_complete(ckpt_root: Path, *, report: bool = True) -> Optional[Path]:
    """The newest checkpoint that verifies; each newer one that does not is reported on stderr."""
    return newest_complete_and_failures(ckpt_root, report=report)[0]


def newest_complete_and_failures(ckpt_root: Path, *, report: bool = True
                                 ) -> tuple[Optional[Path], list[tuple[Path, CheckpointError]]]:
    """(the newest checkpoint that verifies or None, each newer step dir with the reason it fails)."""
    failures: list[tuple[Path, CheckpointError]] = []
    for _, path in step_dirs(ckpt_root):
        try:
            verify(path)
            return path, failures
        except CheckpointError as exc:
            failures.append((path, exc))
            if report:
                print(f"[checkpoint] skipping {path.name}: {exc}; falling back to an older checkpoint",
                      file=sys.stderr, flush=True)
    return None, failures


def update_latest(ckpt_root: Path, ckpt: Path) -> None:
    tmp = ckpt_root / (LATEST + ".tmp")
    tmp.write_text(ckpt.name + "\n")
    os.replace(tmp, ckpt_root / LATEST)


def purge(ckpt_root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (stale ``.tmp`` dirs too).

    Never deletes the newest complete one, whatever ``keep`` says; incomplete step dirs older
    than the newest complete are removed, newer ones are left for inspection.
    """
    keep = max(1, keep)
    complete = [p for _, p in step_dirs(ckpt_root) if (p / MARKER).is_file()]
    removed = complete[keep:]
    newest = complete[0] if complete else None
    for _, p in step_dirs(ckpt_root):
        if newest is not None and p not in complete and p.name < newest.name:
            removed.append(p)
    for p in ckpt_root.glob("step-*.tmp"):
        removed.append(p)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint dir from a checkpoint dir, a checkpoints/ dir or a run dir (newest complete)."""
    path = Path(path)
    if (path / MARKER).is_file() or _STEP_RE.match(path.name):
        verify(path)
        return path
    for root in (path / "checkpoints", path):
        if step_dirs(root):
            found = newest_complete(root)
            if found is None:
                raise CheckpointError(f"{root}: no complete checkpoint (every step-* dir failed to verify)")
            return found
    raise CheckpointError(f"{path}: neither a checkpoint, a checkpoints/ dir nor a run dir with checkpoints")
