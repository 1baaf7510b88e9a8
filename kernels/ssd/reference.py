"""Sequential Mamba-2 (SSD) recurrence: the test oracle for ``chunked.ssd_chunked``.

It runs the SSM recurrence (README.md, Recurrence) token by token, so it is O(L) Python iterations and only meant for
tests and benchmarks. Documents are handled the obvious way: the state is zeroed wherever the
document id changes, which is what the five masks (README.md, Documents) must reproduce in the chunked form.
"""
from __future__ import annotations

from typing import Optional

import torch


def segment_index(doc_ids: torch.Tensor) -> torch.Tensor:
    """Turn document ids (B, L) into a non-decreasing segment index (B, L) starting at 0.

    A new segment starts wherever the id differs from the previous token's, so ids need not be
    sorted or start at zero.
    """
    change = torch.zeros_like(doc_ids, dtype=torch.long)
    change[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    return change.cumsum(dim=1)


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence one token at a time.

    Args:
        x: (B, L, H, P) inputs per head.
        dt: (B, L, H) step sizes, already softplus'ed (and clamped).
        A: (H,) negative decay rates.
        B: (B, L, G, N) input projections; head h uses group h // (H / G).
        C: (B, L, G, N) output projections.
        D: (H,) skip weights or None.
        initial_state: (B, H, P, N) state before the first token (applies to document 0).
        doc_ids: (B, L) document ids; the state restarts from zero where the id changes.
    Returns:
        y (B, L, H, P) in x's dtype, and the final state (B, H, P, N) when asked.
    Internals run in fp32 (fp64 if x is fp64).
    """
    batch, length, heads, hdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    work = torch.promote_types(x.dtype, torch.float32)
    rep = heads // groups
    xs, dts = x.to(work), dt.to(work)
    Bh = B.to(work).repeat_interleave(rep, dim=2)  # (B, L, H, N)
    Ch = C.to(work).repeat_interleave(rep, dim=2)
    Aw = A.to(work)
    if initial_state is None:
        state = x.new_zeros(batch, heads, hdim, dstate, dtype=work)
    else:
        state = initial_state.to(work)
    seg = segment_index(doc_ids) if doc_ids is not None else None
    keep = None
    if seg is not None:
        keep = torch.ones_like(dts[..., 0])  # (B, L): 0 where a new document starts
        keep[:, 1:] = (seg[:, 1:] == seg[:, :-1]).to(work)
    Dw = None if D is None else D.to(work)[:, None]
    # unbind over time, not [:, t]: the backward of indexing allocates a full (B, L, ...) zero
    # tensor per step, which would make the oracle's backward quadratic in L.
    steps = zip(xs.unbind(1), dts.unbind(1), Bh.unbind(1), Ch.unbind(1),
                keep.unbind(1) if keep is not None else [None] * length)
    ys = []
    for t, (x_t, dt_t, b_t, c_t, keep_t) in enumerate(steps):
        if keep_t is not None and t > 0:
            state = state * keep_t[:, None, None, None]
        decay = torch.exp(dt_t * Aw)[:, :, None, None]  # (B, H, 1, 1)
        upd = (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, :]  # (B, H, P, N)
        state = decay * state + upd
        y = torch.einsum("bhpn,bhn->bhp", state, c_t)
        if Dw is not None:
            y = y + Dw * x_t
        ys.append(y)
    out = torch.stack(ys, dim=1).to(x.dtype)
    if return_final_state:
        return out, state
    return out
