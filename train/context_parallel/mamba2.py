"""Exact context parallelism for Mamba-2 (``M``): every slice runs at once, then a prefix over slices.

The SSD is linear in its initial state (``kernels/ssd/carry.py``), so per layer and per slice s
(in sequence order, whichever rank holds it):

1. in_proj, then the causal conv with a halo: the last d_conv-1 pre-conv inputs of slice s-1
   (zeroed where they belong to an earlier document than slice s's first token);
2. the chunked SSD from a zero state -> local output, local final state H_s, total decay G_s
   (0 when a document starts inside s);
3. one all-gather of (H_s, G_s) for all slices; every rank runs the recurrence
   H_in(s) = c_s · (G_{s-1} H_in(s-1) + H_{s-1}), c_s = 0 where a document starts exactly at s;
4. y += C_t · (prod_{start(s)..t} a) H_in(s) on the slice's first document, then norm and out_proj.

Communication per layer: two all-gathers (halo, then states) of, per slice and batch row,
``conv_dim * (d_conv-1)`` activations and ``nheads * (headdim * d_state + 1)`` fp32 (fp64) floats,
plus one gather of two int64 document ids per slice and row (``communicated_bytes``); nothing is
sequential between ranks. Backward goes through
the same gathers (reduce-scatter), ordered by ``chain.CommChain``. Contiguous and zig-zag layouts
differ only in which rank holds which slice. The fp64 result equals one process to ~1e-15.

The Stuffed Mamba knobs (state norm clamp, windowed state, decay multipliers) are evaluation
options and are refused here, as are slices shorter than d_conv - 1 (the halo would span slices).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hybrid_lm.kernels.ssd.carry import carried_decay, carried_output
from hybrid_lm.kernels.ssd.chunked import ssd_chunked
from hybrid_lm.models.common.mixer import State
from hybrid_lm.models.mamba2 import backends
from hybrid_lm.models.mamba2.conv import causal_conv, final_conv_state
from hybrid_lm.models.mamba2.layer import Mamba2
from hybrid_lm.train.context_parallel import ContextParallel, register_cp_forward
from hybrid_lm.train.context_parallel.chain import CommChain, replay_log

_NEUTRAL = {"dt_mult": 1.0, "a_mult": 1.0, "decay_mult": 1.0, "b_mult": 1.0, "state_norm_max": None, "state_window": None}


def owner(cp: ContextParallel, s: int) -> tuple[int, int]:
    """(group rank, index among that rank's local slices) of global slice s."""
    if cp.layout == "contiguous":
        return s, 0
    return (s, 0) if s < cp.size else (2 * cp.size - 1 - s, 1)


def by_slice(gathered: torch.Tensor, cp: ContextParallel) -> list[torch.Tensor]:
    """(N ranks, local slices, ...) from a gather -> one entry per global slice, in sequence order."""
    return [gathered[owner(cp, s)] for s in range(cp.n_slices)]


def continuation(doc_slices: Optional[torch.Tensor], cp: ContextParallel, chain: CommChain
                 ) -> list[Optional[torch.Tensor]]:
    """Per global slice s, (B,) bool: its first token continues slice s-1's last document.

    doc_slices: (m, B, n) the local slices' ids. None entries mean "always continues" (no ids).
    """
    if doc_slices is None:
        return [None] * cp.n_slices
    ends = torch.stack([doc_slices[..., 0], doc_slices[..., -1]], dim=-1)  # (m, B, 2)
    ids = by_slice(chain.values(ends), cp)
    return [ids[0].new_zeros(ids[0].shape[0], dtype=torch.bool)] + [
        ids[s - 1][:, 1] == ids[s][:, 0] for s in range(1, cp.n_slices)]


def communicated_bytes(layer: Mamba2, batch: int, cp: ContextParallel, dtype: torch.dtype = torch.bfloat16,
                       documents: bool = True) -> tuple[int, int]:
    """(forward, backward) bytes one rank receives from the others per layer call.

    With N ranks, m = 1 (contiguous) or 2 (zig-zag) slices per rank, e_a / e_s the activation and
    state element sizes (states are fp32 at least):

        forward  = (N-1) * m * B * (conv_dim * (d_conv-1) * e_a + H * (P * N_state + 1) * e_s + 16)
        backward = (N-1) * m * B * (conv_dim * (d_conv-1) * e_a + H * (P * N_state + 1) * e_s)

    (the 16 bytes are the first and last document id; backward is the reduce-scatter of the same
    two buffers). Independent of the sequence length.
    """
    e_a = torch.empty((), dtype=dtype).element_size()
    e_s = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    per_row = layer.conv_dim * (layer.d_conv - 1) * e_a + layer.nheads * (layer.headdim * layer.d_state + 1) * e_s
    rows = (cp.size - 1) * len(cp.slice_ids()) * batch
    return rows * (per_row + 16 * documents), rows * per_row


def _keep(t: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """t (B, ...) with the rows zeroed whose slice starts a new document (keep (B,) bool)."""
    return t if keep is None else t * keep.view(-1, *[1] * (t.dim() - 1)).to(t.dtype)


def _check(layer: Mamba2, cp: ContextParallel, slice_len: int) -> None:
    for key, neutral in _NEUTRAL.items():
        if getattr(layer, key, neutral) != neutral:
            raise NotImplementedError(f"context parallel Mamba-2: mamba2.{key}={getattr(layer, key)} is an evaluation "
                                      f"knob without a CP form; leave it at {neutral} with parallel.context_parallel > 1")
    if slice_len < layer.d_conv - 1:
        raise ValueError(f"context parallel Mamba-2: slices of {slice_len} tokens (seq_len {cp.seq_len} over "
                         f"{cp.n_slices} slices) are shorter than the conv halo of d_conv - 1 = {layer.d_conv - 1}")


def mamba2_context_parallel(
    layer: Mamba2, x: torch.Tensor, *, doc_ids: Optional[torch.Tensor], cp: ContextParallel,
    return_state: bool = False,
) -> tuple[torch.Tensor, Optional[State]]:
    """x (B, T_local, D) local slices -> y (B, T_local, D) and, when asked, the state after the
    whole sequence (identical on every rank): conv (B, conv_dim, d_conv-1), ssm (B, H, P, N)."""
    batch, t_local, _ = x.shape
    m = len(cp.slice_ids())
    n = t_local // m
    _check(layer, cp, n)
    k1, cdim = layer.d_conv - 1, layer.conv_dim
    chain = CommChain(x, cp.group, replay_log(layer))

    def per_slice(t: torch.Tensor) -> torch.Tensor:  # (B, m*n, ...) -> (m*B, n, ...), slices as batch rows
        return t.reshape(batch, m, n, *t.shape[2:]).transpose(0, 1).reshape(m * batch, n, *t.shape[2:])

    z, xbc, dt_raw = torch.split(layer.in_proj(x), [layer.d_inner, cdim, layer.nheads], dim=-1)
    xbc, dt_raw = per_slice(xbc), per_slice(dt_raw)
    docs = None if doc_ids is None else per_slice(doc_ids)
    cont = continuation(None if docs is None else docs.view(m, batch, n), cp, chain)

    # conv halo: every slice's last k1 inputs (earlier documents zeroed), gathered
    tails = final_conv_state(xbc, xbc.new_zeros(m * batch, cdim, k1), docs).view(m, batch, cdim, k1)
    all_tails = by_slice(chain.gather(tails), cp)
    local = cp.slice_ids()

    halo = torch.cat([torch.zeros_like(tails[0]) if s == 0 else _keep(all_tails[s - 1], cont[s]) for s in local])
    xbc, _ = causal_conv(xbc, layer.conv1d.weight[:, 0], layer.conv1d.bias, halo, docs)
    xs, bm, cm = layer._split_xbc(F.silu(xbc))
    work = torch.promote_types(x.dtype, torch.float32)
    dt = F.softplus(dt_raw.to(work) + layer.dt_bias.to(work))
    A = -torch.exp(layer.A_log.to(work))

    if backends.use_mamba_kernels(x, layer.backend):  # pragma: no cover - CUDA
        seq_idx = None if docs is None else backends.seq_idx_from_doc_ids(docs)
        y, h_loc = backends.mamba_chunk_scan_combined(xs, dt, A, bm, cm, layer.chunk_size, D=layer.D.float(),
                                                      seq_idx=seq_idx, return_final_states=True)
    else:
        y, h_loc = ssd_chunked(xs, dt, A, bm, cm, layer.chunk_size, D=layer.D, doc_ids=docs, return_final_state=True)
    through, total = carried_decay(dt, A, docs)  # (m*B, n, H), (m*B, H)

    heads, hdim, dstate = layer.nheads, layer.headdim, layer.d_state
    packed = torch.cat([h_loc.to(work).flatten(1), total], dim=1).view(m, batch, -1)
    gathered = by_slice(chain.gather(packed), cp)
    h_all = [g[:, : heads * hdim * dstate].view(batch, heads, hdim, dstate) for g in gathered]
    g_all = [g[:, heads * hdim * dstate:] for g in gathered]
    # the prefix over slices, redundantly on every rank: H_in(s) = c_s (G_{s-1} H_in(s-1) + H_{s-1})
    last = cp.n_slices - 1 if return_state else max(local)
    h_in = [torch.zeros_like(h_all[0])]
    for s in range(1, last + 1):
        h_in.append(_keep(g_all[s - 1][..., None, None] * h_in[s - 1] + h_all[s - 1], cont[s]))
    entering = torch.cat([h_in[s] for s in local])  # (m*B, H, P, N)
    y = (y.to(work) + carried_output(cm, through, entering)).to(x.dtype)

    y = y.reshape(m, batch, n, layer.d_inner).transpose(0, 1).reshape(batch, t_local, layer.d_inner)
    y = chain.attach(layer.out_proj(layer.norm(y, z)))
    if not return_state:
        return y, None
    final = g_all[-1][..., None, None] * h_in[-1] + h_all[-1]
    return y, {"conv": all_tails[-1], "ssm": final}


@register_cp_forward(Mamba2)
def mamba2_cp_forward(layer: Mamba2, x: torch.Tensor, *, doc_ids: Optional[torch.Tensor],
                      position_ids: Optional[torch.Tensor], cp: ContextParallel) -> torch.Tensor:
    return mamba2_context_parallel(layer, x, doc_ids=doc_ids, cp=cp)[0]
