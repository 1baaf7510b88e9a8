"""Process-group set-up and the few collectives the engine needs.

Run under ``torchrun`` (``torchrun --nproc_per_node 2 -m hybrid_lm.cli train configs/debug.yaml``)
the ranks come from the environment; run as a plain process (``hybrid-lm train configs/debug.yaml``)
a one-rank group is created on a free loopback port, so the same code path (DeepSpeed, ZeRO,
collectives) runs everywhere and there is no "non-distributed" special case to drift.

NCCL on CUDA, gloo on CPU. The group timeout bounds how long a rank stuck before a collective can
hang the job: past it the collective raises and the job exits non-zero.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (good enough for tests and 1-rank runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join (or create) the default process group through DeepSpeed's comm layer; idempotent."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        # Without torchrun: a private 1-rank group on a fresh port, leaving os.environ alone so
        # child processes (tests, the main job's helpers) do not inherit a rendezvous in use.
        extra = {} if launched else {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
        if not launched:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine asserts it exists
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                                   auto_mpi_discovery=False, verbose=False, **extra)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks in one collective (fp64 so counters stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(value: float, device: torch.device) -> float:
    (total,) = all_reduce_sum([value], device)
    return total / (dist.get_world_size() if dist.is_initialized() else 1)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s value on every rank (used for decisions only rank 0 can make, e.g. which
    checkpoint directory is the newest complete one)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
