"""Chunked SSD (Mamba-2's training form) in plain PyTorch, with documents and state passing.

The sequence is cut into chunks of Q tokens (spec 01 §1.4). Inside a chunk the output is a masked
Q x Q "attention" with scores C·B and decays exp(segsum(dt·A)); across chunks a (B, H, P, N) state
is passed by one small matmul with the (c+1) x (c+1) matrix exp(segsum(chunk totals)) per head
(c = L/Q chunks). The largest intermediates are (B, c, H, Q, Q) and (B, c, H, P, N); the state
passing matrix is quadratic in c, but c = 64 at L = 4096, Q = 64, so it costs as much as one of
the linear einsums and replaces a Python loop whose autograd graph had ~20 nodes per chunk.

The diagonal blocks run in a custom autograd function (``_DiagonalBlocks``): the per-head Q x Q
decay is built once per call (one masked cumsum + exp, no autograd graph over it) and its
gradient is taken from dY·Y and X·dX instead of differentiating the Q x Q segsum (see README).

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


def _log_floor(dtype: torch.dtype) -> float:
    """log(2^30 · smallest normal number of dtype): about -67 in fp32, -688 in fp64."""
    return float(torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64).log()) + 30 * 0.6931471805599453


def exp_flushed(logits: torch.Tensor) -> torch.Tensor:
    """exp(logits), exactly 0 where it would be below 2^30 x the smallest normal number.

    Products of chunk decays underflow into subnormals (exp(-88) in fp32), and x86 matmuls slow
    down several times when their inputs hold subnormals (measured: the state-passing matmul went
    from 4.6 ms to 18 ms at L = 4096). The dropped weights are < 1e-29 (fp32), far below rounding.
    For small tensors only: the comparison costs as much as the exp.
    """
    return torch.where(logits < _log_floor(logits.dtype), float("-inf"), logits).exp()


def decay_transposed(dA: torch.Tensor) -> torch.Tensor:
    """exp(segsum(dA)) transposed, with ones instead of zeros above the diagonal: (..., Q) -> (..., Q, Q).

    ``out[..., s, l] = exp(sum_{k=s+1..l} dA[..., k])`` for l >= s, and 1 for l < s (the caller
    multiplies by a lower-triangular score matrix, which zeroes those). The same stable masked
    cumsum as ``segsum``, but summed along the contiguous last dim (about 2x faster on CPU than
    down the rows) and masked by a multiply, which is cheaper than a broadcast ``masked_fill``.
    Exponents are <= 0 wherever they are used and exactly 0 elsewhere, so nothing overflows.
    Decays below 2^30 x the smallest normal number (1e-29 in fp32) are raised to it, so no
    subnormal reaches the matmuls (see ``exp_flushed``; an in-place clamp is ~5x cheaper than its
    comparison here, and an absolute error of 1e-29 is far below rounding).
    """
    q = dA.size(-1)
    later = torch.ones(q, q, dtype=dA.dtype, device=dA.device).triu(1)  # [s, l] = 1 where l > s
    # In place: every fresh (..., Q, Q) buffer costs page faults comparable to the op itself.
    out = dA[..., None, :] * later
    return out.cumsum_(dim=-1).clamp_min_(_log_floor(dA.dtype)).exp_()


class _DiagonalBlocks(torch.autograd.Function):
    """Y[l] = sum_{s<=l} scores[l, s] · exp(segsum(dA)[l, s]) · X[s] within each chunk, per head.

    Shapes: scores_t (..., G, 1, Q, Q), the scores transposed ([s, l] = C[l]·B[s]), zero where
    l < s (masked by the caller); dA (..., G, R, Q); X (..., G, R, Q, P). Returns Y (..., G, R, Q, P).
    Everything Q x Q is kept as [s, l] so that the per-head products read both operands
    contiguously (a broadcast transposed operand made that multiply 6x slower).

    Backward: with M = scores ∘ decay, dX = Mᵀ dY and dscores = Σ_r dM ∘ decay as usual. For dA,
    segsum[l, s] = Acum[l] − Acum[s], so dAcum[l] = Σ_s dM∘M[l, s] − Σ_{l'} dM∘M[l', l]; the row
    sums are dY[l]·Y[l] and the column sums X[l]·dX[l]. That is O(Q·P) per position instead of
    differentiating through the Q x Q masked cumsum, and it never forms dM∘M.
    """

    @staticmethod
    def forward(ctx, scores_t: torch.Tensor, dA: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        decay_t = decay_transposed(dA)  # (..., G, R, Q, Q), [s, l]
        m_t = decay_t * scores_t  # Mᵀ; zero where l < s
        y = m_t.transpose(-1, -2) @ X
        ctx.save_for_backward(decay_t, m_t, X, y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        decay_t, m_t, X, y = ctx.saved_tensors
        dy = dy.contiguous()
        dX = m_t @ dy
        dm_t = X @ dy.transpose(-1, -2)  # dMᵀ[s, l] = X[s]·dY[l]
        dscores_t = dm_t.mul_(decay_t).sum(dim=-3, keepdim=True)
        dAcum = (dy * y).sum(-1) - (X * dX).sum(-1)  # (..., G, R, Q)
        ddA = dAcum.flip(-1).cumsum(-1).flip(-1)  # Acum[l] = Σ_{k<=l} dA[k]
        return dscores_t, ddA, dX


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

    # Two layouts: token-major (B, c, G, Q, R·P) for the state einsums, which then contract over
    # Q or N with all R heads of a group in one matmul (B and C are never copied per head), and
    # head-major (B, c, G, R, Q, P) for the diagonal blocks, whose decay differs per head.
    Xtok = Xs.view(batch, nchunks, q, groups, rep * hdim).transpose(2, 3)  # (B, c, G, Q, R·P)
    Xhead = Xs.view(batch, nchunks, q, groups, rep, hdim).permute(0, 1, 3, 4, 2, 5).contiguous()
    Bc = Bw.view(batch, nchunks, q, groups, dstate).transpose(2, 3)  # (B, c, G, Q, N)
    Cc = Cw.view(batch, nchunks, q, groups, dstate).transpose(2, 3)
    dAc = dA.view(batch, nchunks, q, groups, rep).permute(0, 1, 3, 4, 2).contiguous()  # (B, c, G, R, Q)
    Acum = dAc.cumsum(dim=-1)

    # 1. Intra-chunk (diagonal blocks): masked attention with decay exp(segsum), per head.
    causal_t = torch.ones(q, q, dtype=work, device=x.device).triu()  # [s, l] = 1 where s <= l
    scores_t = (Bc @ Cc.transpose(-1, -2)) * causal_t  # (B, c, G, Q, Q), [s, l] = C[l]·B[s]
    if seg is not None:
        segc = seg.view(batch, nchunks, q)
        scores_t = scores_t * (segc[:, :, None, :, None] == segc[:, :, None, None, :]).to(work)  # mask 2
    y_diag = _DiagonalBlocks.apply(scores_t.unsqueeze(3), dAc, Xhead)  # (B, c, G, R, Q, P)

    # 2. State contributed by each chunk, measured at its last position.
    to_end = exp_flushed(Acum[..., -1:] - Acum)  # (B, c, G, R, Q); exponent <= 0
    if seg is not None:
        to_end = to_end * (segc == segc[:, :, -1:]).to(work)[:, :, None, None]  # mask 3
    scaled = Xtok.unflatten(-1, (rep, hdim)) * to_end.transpose(-1, -2)[..., None]  # (B, c, G, Q, R, P)
    chunk_states = scaled.flatten(-2).transpose(-1, -2) @ Bc  # (B, c, G, R·P, N)

    # 3. State passing as one matmul per head: entering[i] = Σ_{j<=i} W[i, j] · S[j] over the
    # stacked [S_0, chunk_states], W = exp(segsum(pad(chunk totals))) (spec §1.4 step 3).
    totals = F.pad(Acum[..., -1].permute(0, 2, 3, 1), (1, 0))  # (B, G, R, c+1)
    weights = exp_flushed(segsum(totals))  # (B, G, R, c+1, c+1); exp(-inf) = 0 above the diagonal
    if seg is not None:
        # Mask 4, folded into W: the state of chunk j-1 (or S_0 for j = 0) reaches chunk i only if
        # no chunk j..i-1 starts from a reset, i.e. their count of resets is unchanged. Zeroing by
        # a 0/1 factor keeps every exponent finite (no -inf - -inf).
        end_ids = segc[:, :, -1]  # (B, c)
        prev_ids = torch.cat([seg[:, :1], end_ids[:, :-1]], dim=1)  # id owning the entering state
        resets = F.pad((end_ids != prev_ids).long(), (1, 0)).cumsum(dim=1)  # (B, c+1)
        weights = weights * (resets[:, :, None] == resets[:, None, :]).to(work)[:, None, None]
    if initial_state is None:
        s0 = Xs.new_zeros(batch, 1, groups, rep, hdim * dstate)
    else:
        s0 = initial_state.to(work).reshape(batch, 1, groups, rep, hdim * dstate)
    stacked = torch.cat([s0, chunk_states.reshape(batch, nchunks, groups, rep, hdim * dstate)], dim=1)
    passed = weights @ stacked.permute(0, 2, 3, 1, 4)  # (B, G, R, c+1, P·N)
    final_state = passed[:, :, :, -1]
    entering = passed[:, :, :, :-1].reshape(batch, groups, rep, nchunks, hdim, dstate)

    # 4. Entering state -> outputs, decayed to each position.
    from_start = exp_flushed(Acum)  # (B, c, G, R, Q)
    if seg is not None:
        from_start = from_start * (segc == prev_ids[:, :, None]).to(work)[:, :, None, None]  # mask 5
    entering = entering.permute(0, 3, 1, 5, 2, 4).reshape(batch, nchunks, groups, dstate, rep * hdim)
    y_off = (Cc @ entering).view(batch, nchunks, groups, q, rep, hdim)
    y_off = y_off * from_start.permute(0, 1, 2, 4, 3)[..., None]

    y = (y_off + y_diag.transpose(3, 4)).transpose(2, 3)  # (B, c, Q, G, R, P)
    y = y.reshape(batch, nchunks * q, heads, hdim)[:, :length]
    if D is not None:
        y = y + D.to(work)[:, None] * xw
    y = y.to(x.dtype)
    if return_final_state:
        return y, final_state.reshape(batch, heads, hdim, dstate)
    return y
