"""What an initial state contributes to an SSD call: the inter-chunk term with the whole call as
one chunk, so that a caller can run the scan from a zero state first and add the state later.

The SSD is linear in its initial state S_0 (README.md, Recurrence), so for one call

    y(S_0)     = y(0) + carried_output(C, through, S_0)
    final(S_0) = final(0) + total · S_0

with ``through[t] = prod_{j<=t} a_j`` while t is in the row's first document (0 from the first
document start on: the state does not survive it) and ``total = through[L-1]``. Context
parallelism uses this to run every slice of a sequence at once and correct it afterwards
(``train/context_parallel/mamba2.py``); nothing here knows about ranks.
"""
from __future__ import annotations

from typing import Optional

import torch

from hybrid_lm.kernels.ssd.reference import segment_index


def carried_decay(
    dt: torch.Tensor, A: torch.Tensor, doc_ids: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay of an initial state up to each position and over the whole call.

    Args:
        dt: (B, L, H) step sizes, already softplus'ed.
        A: (H,) negative decay rates.
        doc_ids: (B, L) ids or None; the initial state belongs to the row's first document.
    Returns:
        through (B, L, H) and total (B, H), in fp32 at least (fp64 for fp64 inputs). The log
        decays are summed in fp64, as the chunked kernel sums its prefixes, so long calls lose no
        precision in fp32.
    """
    work = torch.promote_types(dt.dtype, torch.float32)
    cum = (dt.to(torch.float64) * A.to(torch.float64)).cumsum(dim=1)  # (B, L, H), <= 0
    through = cum.exp().to(work)
    if doc_ids is not None:
        through = through * (segment_index(doc_ids) == 0).to(work)[..., None]
    return through, through[:, -1]


def carried_output(C: torch.Tensor, through: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """y_add[t] = through[t] · C_t · S_0 per head.

    Args:
        C: (B, L, G, N) output projections; head h reads group h // (H / G).
        through: (B, L, H) from ``carried_decay``.
        state: (B, H, P, N) the initial state.
    Returns:
        (B, L, H, P) in ``through``'s dtype.
    """
    batch, length, groups, dstate = C.shape
    heads, hdim = state.shape[1], state.shape[2]
    work = through.dtype
    s = state.to(work).view(batch, groups, heads // groups, hdim, dstate)
    read = torch.einsum("blgn,bgrpn->blgrp", C.to(work), s).reshape(batch, length, heads, hdim)
    return read * through[..., None]
