"""Autograd-aware collectives over a context-parallel group, on gloo (CPU) as on NCCL.

``torch.distributed.nn.functional`` has all-gather and all-to-all with a backward, but on gloo
both go through ``dist.scatter(src=i)`` with ``i`` a *group* rank used as a global one, which is
wrong for any CP group that is not ranks 0..N-1 (data x context parallel). These use the tensor
collectives (``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_to_all_single``), which
gloo and NCCL both implement on subgroups, so the same code runs in the tests and on GPUs.

Shapes: ``gather(x)`` stacks the N ranks' ``x`` on a new leading dim, (N, *x.shape), in group-rank
order; its backward sums the gradients of every rank's copy (reduce-scatter). ``all_to_all(x)``
takes (N, ...) and returns (N, ...) where row j came from group rank j (row ``rank`` of its
input); it is its own adjoint, so the backward is the same exchange. ``all_reduce(x)`` sums, and
its backward sums the gradients (torch's own autograd all-reduce is deprecated).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


# torch 2.13 renamed the tensor forms (*_into_tensor / *_tensor -> *_single) and deprecates the old names
# (looked up at call time, so a benchmark can wrap them to count bytes)
_ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
_REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        gx = grad.new_empty(grad.shape[1:])
        # the collectives work on (N * dim0, ...): stacked rows are the same memory
        getattr(dist, _REDUCE_SCATTER)(gx.view(-1), grad.contiguous().view(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        return gx, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of every rank's x, differentiable: each rank's x gets the sum of every rank's
    gradient of the result (the result feeds the same loss on every rank)."""
    return _AllReduce.apply(x, group)


def gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    """x (...) on each of N ranks -> (N, ...), differentiable (backward: reduce-scatter)."""
    return _Gather.apply(x, group)


def all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """x (N, ...) -> (N, ...): row j of the result is row ``rank`` of group rank j's x; differentiable."""
    if x.size(0) != dist.get_world_size(group):
        raise ValueError(f"all_to_all: leading dim {x.size(0)} != group size {dist.get_world_size(group)}")
    return _AllToAll.apply(x, group)


def gather_no_grad(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Integer metadata (doc ids): x (...) -> (N, ...), no autograd."""
    return _all_gather(x, group)


def _all_gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group), *x.shape))
    getattr(dist, _ALL_GATHER)(out.view(-1), x.contiguous().view(-1), group=group)
    return out
