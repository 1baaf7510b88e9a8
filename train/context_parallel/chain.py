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

from typing import Any, Optional, Sequence

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


def recomputing() -> bool:
    """True while a backward pass runs: a forward now is activation checkpointing's recompute."""
    return torch._C._current_graph_task_id() != -1


class CommChain:
    """One layer's communication over a CP group, ordered for backward (module docstring).

    ``replay`` is a list the layer keeps across calls (``replay_log``). Under activation
    checkpointing the block's forward runs again inside the backward pass; communicating then
    would deadlock the relay (rank r waits in a backward receive while rank r+1's recompute waits
    for r's forward send) and repeat every collective. So a forward records what each op
    returned, and a recompute replays those values, with the same ``requires_grad`` so that the
    recompute saves the same tensors, and communicates nothing. The recorded values are those of
    the layer's last forward: right for a backward that follows its own forward (gradient
    accumulation runs one micro-batch's forward and backward before the next). Non-reentrant
    checkpointing only (``train/activation_checkpointing.py``'s): the reentrant form backpropagates
    through the recomputed graph, which has no communication to carry gradients to other ranks.
    """

    def __init__(self, x: torch.Tensor, group: Any, replay: Optional[list[Any]] = None) -> None:
        self.group = group
        self.replaying = replay is not None and recomputing()
        self.log: list[Any] = [] if replay is None else replay
        if replay is not None and not self.replaying:
            replay.clear()
        self.step = 0
        self.token = x.new_zeros(0)
        if torch.is_grad_enabled() and not self.replaying:
            # a leaf token when x needs no gradient: received states must still carry one back
            self.token = _Start.apply(x) if x.requires_grad else self.token.requires_grad_()

    def _record(self, out: Any) -> Any:
        self.log.append([(t.detach(), t.requires_grad) for t in out] if isinstance(out, list) else
                        (out.detach(), out.requires_grad))
        return out

    def _replayed(self) -> Any:
        entry = self.log[self.step]
        self.step += 1
        if isinstance(entry, list):
            return [t.requires_grad_(g) if g else t for t, g in entry]
        t, g = entry
        return t.requires_grad_(g) if g else t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """t (...) on each of N ranks -> (N, ...) in group-rank order."""
        if self.replaying:
            return self._replayed()
        out, self.token = _Gather.apply(self.token, t, self.group)
        return self._record(out)

    def values(self, t: torch.Tensor) -> torch.Tensor:
        """Integer metadata (document ids): t (...) -> (N, ...), no autograd."""
        if self.replaying:
            return self._replayed()
        return self._record(gather_values(t, self.group))

    def send(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        if not self.replaying:
            self.token = _Send.apply(self.token, self.group, dst, *tensors)

    def recv(self, templates: Sequence[torch.Tensor], src: int) -> list[torch.Tensor]:
        if self.replaying:
            return self._replayed()
        *outs, self.token = _Recv.apply(self.token, self.group, src, *templates)
        return self._record(list(outs))

    def attach(self, y: torch.Tensor) -> torch.Tensor:
        """y unchanged, with the chain on its backward path."""
        return _Attach.apply(y, self.token) if self.token.requires_grad else y


def replay_log(layer: Any) -> list[Any]:
    """The list ``CommChain`` records a layer's received values in (kept on the layer instance)."""
    log = layer.__dict__.get("_cp_replay")
    if log is None:
        log = []
        layer.__dict__["_cp_replay"] = log
    return log


def gather_values(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Integer metadata (document ids): t (...) -> (N, ...), no autograd."""
    return _gather_flat(t, group)
