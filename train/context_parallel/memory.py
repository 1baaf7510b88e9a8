"""Exact context parallelism for the memory layers (``T``, ``C``, ``G``, ``L``, ``X``, ``D``): a relay.

A memory chunk maps (W, S) -> (W', S') through gradients taken *at* W, nonlinear in W for a deep
memory (and for any depth with the gradient soft clamp, on by default), so no parallel prefix over
slices exists. Slice s waits for the state slice s-1 ended with, runs the layer's own forward
from it (the two-halves contract of ``models/common/mixer.py`` makes that exact) and passes its
final state on: global slice order 0 -> 1 -> ... whichever ranks hold them (zig-zag: rank r runs
slice r, later slice 2N-1-r). The state relayed is the layer's whole state dict, so the pieces
that continue across a slice boundary all travel with it: memory weights, momentum and chunk
anchor with the chunk-grid offset, the conv and Omega-window tails, and for MAG/MAL/MAC the
attention branch's cache (the last window-1 rotated keys/values and the RoPE counter; MAC's
partial segment). The attention branches therefore need no attention CP of their own.

Backward carries the gradient w.r.t. the relayed state the other way (``chain.CommChain``).
A slice whose row starts a new document exactly at its first token restarts that row from the
layer's initial state (learned W_0), so nothing crosses the boundary; a document start inside a
slice is the layer's own reset.

Cost: the ranks run one after another, so a layer's forward takes about as long as on one rank
(plus N-1 hops, 2N-2 for zig-zag), and memory per rank falls by N: this is CP for memory, not
speed. Per hop the state is sent once (and its gradient once in backward); bytes per batch row:
``relayed_state_bytes``.
"""
from __future__ import annotations

from typing import Optional

import torch

from hybrid_lm.models.common.mixer import Layer, State
from hybrid_lm.models.titans.layers import MemoryAsGate, MemoryAsLayer
from hybrid_lm.models.titans.mac import MemoryAsContext
from hybrid_lm.models.titans.memory import NeuralMemory
from hybrid_lm.train.context_parallel import ContextParallel, register_cp_forward
from hybrid_lm.train.context_parallel.chain import CommChain, replay_log
from hybrid_lm.train.context_parallel.mamba2 import owner


def _restart(layer: Layer, state: State, cont: torch.Tensor, template: State) -> State:
    """Rows with cont False start from the layer's initial state (a document starts here)."""
    def pick(k: str) -> torch.Tensor:
        keep = cont.view(-1, *[1] * (state[k].dim() - 1))
        return torch.where(keep, state[k], template[k].to(state[k].dtype))
    return {k: pick(k) for k in state}


def _ordered(state: State, template: State, where: str) -> list[torch.Tensor]:
    """The state's tensors in ``template`` order; entries the layer leaves out must be empty ones
    (MAC's memory has no conv/Omega tails)."""
    missing = [k for k in template if k not in state and template[k].numel()]
    if missing or set(state) - set(template) or any(state[k].shape != template[k].shape for k in state):
        got = {k: tuple(v.shape) for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in template.items()}
        raise RuntimeError(f"context parallel relay: {where} state {got} differs from init_state {want}")
    return [state[k].to(template[k].dtype) if k in state else template[k] for k in template]


def _pack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One flat buffer per floating dtype (differentiable) and one int64 buffer for the rest, so a
    hop is 2-3 messages instead of one per state tensor."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        key = t.dtype if t.dtype.is_floating_point else torch.int64
        groups.setdefault(key, []).append(t.reshape(-1).to(key))
    return [torch.cat(v) for v in groups.values()]


def _unpack(buffers: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of ``_pack`` given tensors with the original shapes and dtypes."""
    keys = list(dict.fromkeys(t.dtype if t.dtype.is_floating_point else torch.int64 for t in like))
    offsets = dict.fromkeys(keys, 0)
    out = []
    for t in like:
        key = t.dtype if t.dtype.is_floating_point else torch.int64
        buf, o = buffers[keys.index(key)], offsets[key]
        out.append(buf[o:o + t.numel()].view(t.shape).to(t.dtype))
        offsets[key] = o + t.numel()
    return out


def relayed_state_bytes(layer: Layer, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one hop sends for ``batch`` rows: the layer's whole state plus a document id per row."""
    template = layer.init_state(batch, device=torch.device("cpu"), dtype=dtype) or {}
    return sum(t.numel() * t.element_size() for t in template.values()) + 8 * batch


def relay_context_parallel(
    layer: Layer, x: torch.Tensor, *, doc_ids: Optional[torch.Tensor], cp: ContextParallel,
    return_state: bool = False,
) -> tuple[torch.Tensor, Optional[State]]:
    """x (B, T_local, D) local slices -> y (B, T_local, D); with ``return_state`` also the state
    after the whole sequence on the rank holding the last slice (None elsewhere)."""
    batch, t_local, _ = x.shape
    local = cp.slice_ids()
    n = t_local // len(local)
    template = layer.init_state(batch, device=x.device, dtype=x.dtype)
    assert template is not None, f"{type(layer).__name__} has no state to relay"
    keys = list(template)
    chain = CommChain(x, cp.group, replay_log(layer))
    outs: list[Optional[torch.Tensor]] = [None] * len(local)
    carried: Optional[tuple[State, torch.Tensor]] = None  # handed on within this rank
    final: Optional[State] = None
    no_ids = torch.zeros(batch, dtype=torch.long, device=x.device)
    for j in sorted(range(len(local)), key=lambda i: local[i]):
        s = local[j]
        xs = x[:, j * n:(j + 1) * n]
        docs = None if doc_ids is None else doc_ids[:, j * n:(j + 1) * n]
        if s == 0:
            received = {k: torch.zeros_like(v) for k, v in template.items()}
            cont = torch.zeros(batch, dtype=torch.bool, device=x.device)
        else:
            if carried is None:
                like = [*template.values(), no_ids]
                *values, prev_last = _unpack(chain.recv(_pack(like), owner(cp, s - 1)[0]), like)
                carried = (dict(zip(keys, values)), prev_last)
            received, prev_last = carried
            cont = torch.ones_like(prev_last, dtype=torch.bool) if docs is None else prev_last == docs[:, 0]
        # The same ops on every rank and slice, slice 0 included (a select of the initial state): the
        # parameters' gradients must become ready in the same order on every rank, as DeepSpeed's
        # ZeRO-2 fills its reduction buckets in that order (G- at contiguous CP=2 mixed gradients
        # across parameters when slice 0 started from state=None and slice 1 from a select).
        state = _restart(layer, received, cont, template)
        # the class's forward: apply.py replaced the instance's with the one that calls this function
        y, new = type(layer).forward(layer, xs, state=state, doc_ids=docs, return_state=True)
        outs[j] = y
        last_ids = no_ids if docs is None else docs[:, -1]
        carried = None
        if s + 1 == cp.n_slices:
            final = new
        elif owner(cp, s + 1)[0] == cp.rank:
            carried = (dict(zip(keys, _ordered(new, template, f"slice {s}"))), last_ids)
        else:
            chain.send(_pack([*_ordered(new, template, f"slice {s}"), last_ids]), owner(cp, s + 1)[0])
    y = chain.attach(torch.cat(outs, dim=1))  # type: ignore[arg-type]
    return y, (final if return_state else None)


def _relay_cp_forward(layer: Layer, x: torch.Tensor, *, doc_ids: Optional[torch.Tensor],
                      position_ids: Optional[torch.Tensor], cp: ContextParallel) -> torch.Tensor:
    return relay_context_parallel(layer, x, doc_ids=doc_ids, cp=cp)[0]


for _cls in (NeuralMemory, MemoryAsGate, MemoryAsLayer, MemoryAsContext):
    register_cp_forward(_cls)(_relay_cp_forward)
