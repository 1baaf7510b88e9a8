"""Differentiable CP communication whose backward runs in exactly the reverse order of its forward.

Every rank must enter the backward collectives and the backward sends/receives in the same order,
or a gather meets a receive and the group hangs. Autograd alone does not promise that: a rank
whose slice does not use a gathered tensor (slice 0 needs no earlier state) never runs that
gather's backward, and nodes that are independent on one rank (the two slices of a zig-zag rank,
two layers' relays) may run in either order. So each layer threads a *token* (an empty tensor)
through its communication: it starts from the layer input, each op takes the token and returns a
new one, and the last token is attached to the layer output. An op's backward then waits for the
backward of every later op of the layer, every op's backward runs on every rank (the token is
always on the path to the loss), and the layer input's gradient is only complete after all of it,
which orders layers too.

    chain = CommChain(x, group)
    full = chain.gather(t)               # (N, *t.shape), backward: reduce-scatter
    chain.send([a, b], dst)              # backward: receives the gradients of a, b from dst
    a2, b2 = chain.recv([a, b], src)     # shapes/dtypes from the templates; backward: sends them
    y = chain.attach(y)

``dst``/``src`` are ranks *within* the group. Floating tensors carry gradients; integer and bool
tensors travel as values only. Works on gloo (CPU) and NCCL: only the tensor collectives that
both implement on subgroups are used.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


# the *_single names are torch's current ones; older releases only have *_into_tensor / *_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_flat(t: torch.Tensor, group: Any) -> torch.Tensor:
    """t (...) -> (N, ...): flat buffers, as gloo wants the output concatenated along dim 0."""
    out = t.new_empty(dist.get_world_size(group) * t.numel())
    _all_gather(out, t.contiguous().view(-1), group=group)
    return out.view(-1, *t.shape)


def _global(group: Any, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """bool travels as uint8 (not every backend sends bool)."""
    return t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.new_zeros(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> None:  # type: ignore[override]
        return None  # still an edge into x's graph: x's gradient waits for this chain


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, token: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, token: torch.Tensor, t: torch.Tensor, group: Any):  # type: ignore[override]
        ctx.group = group
        return _gather_flat(t, group), token.new_zeros(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _token: torch.Tensor):  # type: ignore[override]
        gt = grad.new_empty(grad[0].numel())
        _reduce_scatter(gt, grad.contiguous().view(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        return None, gt.view(grad.shape[1:]), None


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, token: torch.Tensor, group: Any, dst: int, *tensors: torch.Tensor):  # type: ignore[override]
        ctx.group, ctx.dst = group, dst
        ctx.meta = [(t.shape, t.dtype, t.device) for t in tensors]
        for t in tensors:
            if t.numel():
                dist.send(_wire(t), dst=_global(group, dst), group=group)
        return token.new_zeros(0)

    @staticmethod
    def backward(ctx: Any, _token: torch.Tensor):  # type: ignore[override]
        grads: list[Any] = []
        for shape, dtype, device in ctx.meta:
            if dtype.is_floating_point:
                g = torch.zeros(shape, dtype=dtype, device=device)
                if g.numel():
                    dist.recv(g, src=_global(ctx.group, ctx.dst), group=ctx.group)
                grads.append(g)
            else:
                grads.append(None)
        return (None, None, None, *grads)


class _Recv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, token: torch.Tensor, group: Any, src: int, *templates: torch.Tensor):  # type: ignore[override]
        ctx.group, ctx.src = group, src
        outs = []
        for t in templates:
            buf = torch.empty(t.shape, dtype=torch.uint8 if t.dtype == torch.bool else t.dtype, device=t.device)
            if buf.numel():
                dist.recv(buf, src=_global(group, src), group=group)
            outs.append(buf.bool() if t.dtype == torch.bool else buf)
        ctx.floating = [o.dtype.is_floating_point for o in outs]
        ctx.mark_non_differentiable(*[o for o in outs if not o.dtype.is_floating_point])
        return (*outs, token.new_zeros(0))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor):  # type: ignore[override]
        for g, floating in zip(grads[:-1], ctx.floating):
            if floating and g.numel():  # gradients are materialised: zeros where this rank's slice did not use it
                dist.send(g.contiguous(), dst=_global(ctx.group, ctx.src), group=ctx.group)
        return (None, None, None, *[None] * len(ctx.floating))


class CommChain:
    """One layer's communication over a CP group, ordered for backward (module docstring)."""

    def __init__(self, x: torch.Tensor, group: Any) -> None:
        self.group = group
        self.token = x.new_zeros(0)
        if torch.is_grad_enabled():
            # a leaf token when x needs no gradient: received states must still carry one back
            self.token = _Start.apply(x) if x.requires_grad else self.token.requires_grad_()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """t (...) on each of N ranks -> (N, ...) in group-rank order."""
        out, self.token = _Gather.apply(self.token, t, self.group)
        return out

    def send(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        self.token = _Send.apply(self.token, self.group, dst, *tensors)

    def recv(self, templates: Sequence[torch.Tensor], src: int) -> list[torch.Tensor]:
        *outs, self.token = _Recv.apply(self.token, self.group, src, *templates)
        return list(outs)

    def attach(self, y: torch.Tensor) -> torch.Tensor:
        """y unchanged, with the chain on its backward path."""
        return _Attach.apply(y, self.token) if self.token.requires_grad else y


def gather_values(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Integer metadata (document ids): t (...) -> (N, ...), no autograd."""
    return _gather_flat(t, group)
