"""One training per run dir: rank 0 holds an exclusive ``flock`` on ``<run_dir>/train.lock`` while it runs.

    with exclusive_run([run_dir, checkpoint_dir], is_main=info.is_main):   # collective
        ...  # train

Two jobs on the same ``train.run_dir`` would both resume from the same checkpoint and then overwrite
each other's checkpoints and ``metrics.jsonl``. The lock is the kernel's lock on an open file, not
the file's existence: it goes away with the process however that ends (exit, exception, kill -9,
OOM), so a crashed run never leaves the run dir blocked and nobody has to delete a stale file. The
file stays behind and only records the last holder (pid, host, start time) for the refusal message.

On NFS, Linux emulates ``flock`` with a whole-file POSIX lock that the server arbitrates across
hosts (the server frees it when a dead client's lease expires). A filesystem that supports no locks
at all gets a warning and no lock, rather than no training.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from hybrid_lm.train import distributed as D

LOCK_NAME = "train.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run dir's lock; the message names the holder."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        # the holder may have locked the file but not yet written its record
        return "holder unknown"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``path``; ``acquire`` raises RunDirLocked when it is held."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(
                    f"{self.path}: another training is running in {self.path.parent} ({_holder(self.path)}); "
                    "refusing to start a second one, which would overwrite its checkpoints and metrics. "
                    "Wait for it to finish, stop it, or use another train.run_dir.") from None
            print(f"[train] warning: {self.path}: cannot lock ({exc.strerror}); nothing stops a second "
                  "training on this run dir", file=sys.stderr, flush=True)
            return self
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


@contextmanager
def exclusive_run(dirs: Sequence[Path], *, is_main: bool) -> Iterator[None]:
    """Collective: rank 0 locks every dir in ``dirs`` (run dir, and a checkpoint dir outside it);
    if any is held, every rank raises the same RunDirLocked instead of rank 0 alone."""
    locks: list[RunLock] = []
    refusal: Optional[str] = None
    if is_main:
        try:
            for d in dict.fromkeys(Path(d).resolve() for d in dirs):
                locks.append(RunLock(d / LOCK_NAME).acquire())
        except RunDirLocked as exc:
            refusal = str(exc)
    refusal = D.broadcast_object(refusal)  # type: ignore[assignment]
    try:
        if refusal is not None:
            raise RunDirLocked(refusal)
        yield
    finally:
        for lock in reversed(locks):
            lock.release()
