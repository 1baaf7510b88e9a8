"""Chunked SSD (Mamba-2's training form) in plain PyTorch, with documents and state passing.

The sequence is cut into chunks of Q tokens (spec 01 §1.4). Inside a chunk the output is a masked
Q x Q "attention" with scores C·B and decays exp(segsum(dt·A)); across chunks a (B, H, P, N) state
is passed by a sequential loop over the L/Q chunks. Nothing of size L x L is ever built, so time
and memory are linear in L (the largest intermediates are (B, L/Q, H, Q, Q) and (B, L/Q, H, P, N)).

Packed documents use the five explicit masks of §1.7 rather than -inf decays (which give
inf - inf = NaN in the state decay). All internals run in fp32 (fp64 when x is fp64), as the
cumulative decays lose precision in bf16.

See README.md in this folder for the derivation; ``reference.ssd_sequential`` is the oracle.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hybrid_lm.kernels.ssd.reference import segment_index


def segsum(dA: torch.Tensor) -> torch.Tensor:
    """Stable segment sums within a chunk: dA (..., Q) -> (..., Q, Q).

    ``out[..., i, j] = sum_{k=j+1..i} dA[..., k]`` for i >= j and -inf above the diagonal. Built
    as a cumulative sum of a strictly-lower-triangular copy instead of ``cumsum[i] - cumsum[j]``,
    which cancels catastrophically for long chunks and large |dA|.
    """
    q = dA.size(-1)
    strict = torch.ones(q, q, dtype=torch.bool, device=dA.device).tril(-1)
    rows = dA[..., :, None].expand(*dA.shape, q).masked_fill(~strict, 0.0)
    out = rows.cumsum(dim=-2)
    return out.masked_fill(~strict.logical_or(torch.eye(q, dtype=torch.bool, device=dA.device)), float("-inf"))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan.

    Args:
        x: (B, L, H, P) inputs per head (not yet scaled by dt).
        dt: (B, L, H) step sizes, already softplus'ed (and clamped).
        A: (H,) negative decay rates (``-exp(A_log)``).
        B: (B, L, G, N) input projections; head h reads group h // (H / G).
        C: (B, L, G, N) output projections.
        chunk_size: Q; L need not be a multiple (the tail is zero-padded, then dropped).
        D: (H,) skip weight on the unscaled x, or None.
        initial_state: (B, H, P, N) state before the first token. With ``doc_ids`` it applies to
            the row's first document only.
        doc_ids: (B, L) ids; wherever the id changes between t-1 and t the state restarts at zero.
        return_final_state: also return the state after the last token, (B, H, P, N) fp32/fp64.
    Returns:
        y (B, L, H, P) in x's dtype [, final_state].
    """
    batch, length, heads, hdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    rep = heads // groups
    q = chunk_size
    work = torch.promote_types(x.dtype, torch.float32)
    pad = (-length) % q
    nchunks = (length + pad) // q

    xw, dtw = x.to(work), dt.to(work)
    Xs = xw * dtw[..., None]  # dt-scaled input (B, L, H, P)
    dA = dtw * A.to(work)  # (B, L, H) log decays, <= 0
    Bw, Cw = B.to(work), C.to(work)
    seg = segment_index(doc_ids) if doc_ids is not None else None
    if pad:
        # Padding with dt = 0 means decay 1 and no input, so the final state is untouched;
        # the padded tail repeats the last id so it cannot trigger a reset.
        Xs = F.pad(Xs, (0, 0, 0, 0, 0, pad))
        dA = F.pad(dA, (0, 0, 0, pad))
        Bw = F.pad(Bw, (0, 0, 0, 0, 0, pad))
        Cw = F.pad(Cw, (0, 0, 0, 0, 0, pad))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(batch, pad)], dim=1)

    # Chunked views; heads split as (G, R) so B and C are never copied per head.
    Xc = Xs.view(batch, nchunks, q, groups, rep, hdim)
    Bc = Bw.view(batch, nchunks, q, groups, dstate)
    Cc = Cw.view(batch, nchunks, q, groups, dstate)
    dAc = dA.view(batch, nchunks, q, groups, rep).permute(0, 3, 4, 1, 2)  # (B, G, R, c, Q)
    Acum = dAc.cumsum(dim=-1)

    # 1. Intra-chunk (diagonal blocks): masked attention with decay exp(segsum).
    decay = torch.exp(segsum(dAc))  # (B, G, R, c, Q, Q)
    scores = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)  # (B, G, c, Q, Q)
    if seg is not None:
        segc = seg.view(batch, nchunks, q)
        same = (segc[:, :, :, None] == segc[:, :, None, :]).to(work)  # mask 2: (B, c, Q, Q)
        scores = scores * same[:, None]
    y = torch.einsum("bgcls,bgrcls,bcsgrp->bclgrp", scores, decay, Xc)

    # 2. State contributed by each chunk, measured at its last position.
    to_end = torch.exp(Acum[..., -1:] - Acum)  # (B, G, R, c, Q); exponent <= 0
    if seg is not None:
        to_end = to_end * (segc == segc[:, :, -1:]).to(work)[:, None, None]  # mask 3
    chunk_states = torch.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", Bc, to_end, Xc)

    # 3. State passing: a loop over L/Q chunks (linear in L; the (c+1)^2 matmul is not).
    chunk_decay = torch.exp(Acum[..., -1])  # (B, G, R, c)
    if initial_state is None:
        state = Xs.new_zeros(batch, groups, rep, hdim, dstate)
    else:
        state = initial_state.to(work).reshape(batch, groups, rep, hdim, dstate)
    if seg is not None:
        end_ids = segc[:, :, -1]  # (B, c)
        prev_ids = torch.cat([seg[:, :1], end_ids[:, :-1]], dim=1)  # id owning the entering state
        carry = (end_ids == prev_ids).to(work)  # mask 4
    # unbind, not [:, c]: the backward of indexing allocates a full-size zero tensor per chunk,
    # which would make the loop quadratic in L.
    decays = chunk_decay.unsqueeze(-1).unsqueeze(-1)  # (B, G, R, c, 1, 1)
    if seg is not None:
        decays = decays * carry[:, None, None, :, None, None]
    entering = []
    for a, contribution in zip(decays.unbind(3), chunk_states.unbind(1)):
        entering.append(state)
        state = a * state + contribution
    entering_states = torch.stack(entering, dim=1)  # (B, c, G, R, P, N)

    # 4. Entering state -> outputs, decayed to each position.
    from_start = torch.exp(Acum)  # (B, G, R, c, Q)
    if seg is not None:
        from_start = from_start * (segc == prev_ids[:, :, None]).to(work)[:, None, None]  # mask 5
    y = y + torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", Cc, entering_states, from_start)

    y = y.reshape(batch, nchunks * q, heads, hdim)[:, :length]
    if D is not None:
        y = y + D.to(work)[:, None] * xw
    y = y.to(x.dtype)
    if return_final_state:
        return y, state.reshape(batch, heads, hdim, dstate)
    return y
