"""Run a function in N gloo processes, or a command under torchrun, from a test.

``run_distributed(fn, world_size=2, args=(...))`` spawns ``world_size`` processes on a free
loopback port with the torchrun environment variables set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), calls ``fn(rank, world_size, *args)`` in each, and returns the list of
return values by rank (they must pickle). A failure in any rank raises in the test with that
rank's traceback. ``run_torchrun(argv, nproc=2)`` runs ``python -m torch.distributed.run`` as a
subprocess and returns the CompletedProcess (for end-to-end CLI tests).

Same idea as OLMo-core's ``run_distributed_test``; gloo only, so it works on every CPU machine.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


# Ports handed out below the kernel's ephemeral range (32768-60999 by default), in a disjoint block
# per pytest-xdist worker. bind(("", 0)) would return an ephemeral port that is free now but can be
# handed to another worker's bind(0), or to torchrun's own port probe, before our process listens on
# it: two tests then race for it and one dies with EADDRINUSE (seen in CI). The kernel never gives
# these ports to bind(0) or connect(), and no two workers share a block, so only a foreign service
# could hold one, which the bind probe skips.
_PORT_BASE, _PORT_BLOCK = 20000, 1000
_next_port_offset = 0


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under pytest -n
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that no other test worker and no ephemeral bind can be handed meanwhile."""
    global _next_port_offset
    workers_fit = max(1, (_ephemeral_low() - _PORT_BASE) // _PORT_BLOCK)
    block_start = _PORT_BASE + (_worker_index() % workers_fit) * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = block_start + _next_port_offset
        _next_port_offset = (_next_port_offset + 1) % _PORT_BLOCK
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {block_start}..{block_start + _PORT_BLOCK - 1}")


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - the parent re-raises with this traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = (), timeout_s: float = 300.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout_s)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def run_torchrun(argv: Sequence[str], nproc: int = 2, *, cwd: Optional[Path] = None,
                 env: Optional[dict[str, str]] = None, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N --master_port <free> argv...``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *argv]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout_s)
