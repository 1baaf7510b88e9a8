"""Chunked SSD (Mamba-2's training form) in plain PyTorch, with documents and state passing.

The sequence is cut into chunks of Q tokens (the Mamba-2 paper's SSD algorithm). Inside a chunk the output is a masked
Q x Q "attention" with scores C·B and decays exp(segsum(dt·A)); across chunks a (B, H, P, N) state
is passed by the recurrence S_end(c) = exp(total_c) · S_end(c-1) + st_c (c = L/Q chunks). The
largest intermediates are the per-head (B, c, H, Q, Q) decays and (B, c, H, P, N) states.

Two custom autograd functions keep the graph small and the backward cheap:
``_DiagonalBlocks`` builds the per-head Q x Q decay once per call (no autograd graph over it) and
takes its gradient from dY·Y and X·dX instead of differentiating the Q x Q segsum (see README);
``_StatePassing`` runs the chunk recurrence as in-place multiply-adds with a hand-written reverse
recurrence (an autograd graph over that loop had ~20 nodes per chunk, and the dense
(c+1) x (c+1) matmul that replaced it cost ~70x the flops plus layout copies).

Packed documents use five explicit masks (README.md, Documents) rather than -inf decays (which give
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
    multiplies by a lower-triangular score matrix, which zeroes those). Requires dA <= 0 (log
    decays): in fp32 the exponents are clamped to [log floor, 0], which is what sets the l < s
    entries (positive differences there) to 1.
    Decays below 2^30 x the smallest normal number (1e-29 in fp32) are raised to it, so no
    subnormal reaches the matmuls (see ``exp_flushed``; an absolute error of 1e-29 is far below
    rounding).

    fp32: ``Acum[l] - Acum[s]`` with Acum summed in fp64 and split into fp32 hi + lo parts, i.e.
    (hi[l] - hi[s]) + lo[l] - lo[s]. The lo parts carry what rounding Acum to fp32 dropped, so there
    is no cancellation of large prefix sums (the reason ``segsum`` avoids plain differences), and
    the error stays a few ulp of the segment sum itself, the same order as the masked cumsum's.
    Five vectorised passes instead of a masked multiply plus a cumsum along Q, which runs
    scalar on CPU: 4.2 ms instead of 9.5-18 ms at (1, 64, 1, 16, 64, 64) alone (~1 ms of the scan's
    forward at L = 4096).
    fp64 (tests, the oracle's dtype) keeps the masked cumsum of ``segsum``, with nothing wider to
    split into.
    """
    q = dA.size(-1)
    floor = _log_floor(dA.dtype)
    if dA.dtype == torch.float64:
        later = torch.ones(q, q, dtype=dA.dtype, device=dA.device).triu(1)  # [s, l] = 1 where l > s
        return (dA[..., None, :] * later).cumsum(dim=-1).clamp_min_(floor).exp_()
    acum = dA.double().cumsum(dim=-1)
    hi = acum.to(dA.dtype)
    lo = (acum - hi.double()).to(dA.dtype)
    out = hi[..., None, :] - hi[..., :, None]  # [s, l] = Acum[l] - Acum[s]
    return out.add_(lo[..., None, :]).sub_(lo[..., :, None]).clamp_(floor, 0.0).exp_()


class _DiagonalBlocks(torch.autograd.Function):
    """Y[l] = sum_{s<=l} scores[l, s] · exp(segsum(dA)[l, s]) · X[s] within each chunk, per head.

    Shapes: scores_t (..., G, 1, Q, Q), the scores transposed ([s, l] = C[l]·B[s]), zero where
    l < s (masked by the caller); dA (..., G, R, Q); X = x·dt, given as x (B, c, Q, G, R, P) and
    dt (B, c, Q, G, R). Returns Y (..., G, R, Q, P).
    Everything Q x Q is kept as [s, l] so that the per-head products read both operands
    contiguously (a broadcast transposed operand made that multiply 6x slower).

    Backward: with M = scores ∘ decay, dX = Mᵀ dY and dscores = Σ_r dM ∘ decay as usual. For dA,
    segsum[l, s] = Acum[l] − Acum[s], so dAcum[l] = Σ_s dM∘M[l, s] − Σ_{l'} dM∘M[l', l]; the row
    sums are dY[l]·Y[l] and the column sums X[l]·dX[l]. That is O(Q·P) per position instead of
    differentiating through the Q x Q masked cumsum, and it never forms dM∘M.
    """

    @staticmethod
    def forward(ctx, scores_t: torch.Tensor, dA: torch.Tensor, x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        # x (B, c, Q, G, R, P) and dt (B, c, Q, G, R) token-major: X = x·dt is written head-major
        # in one pass (out= takes no autograd), instead of a product and then a transposing copy.
        X = x.new_empty(*x.shape[:2], *x.shape[3:5], x.shape[2], x.shape[5])  # (B, c, G, R, Q, P)
        torch.mul(x.permute(0, 1, 3, 4, 2, 5), dt.permute(0, 1, 3, 4, 2)[..., None], out=X)
        decay_t = decay_transposed(dA)  # (B, c, G, R, Q, Q), [s, l]
        m_t = decay_t * scores_t  # Mᵀ; zero where l < s
        y = m_t.transpose(-1, -2) @ X
        ctx.save_for_backward(decay_t, m_t, X, y, x, dt)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        decay_t, m_t, X, y, x, dt = ctx.saved_tensors
        dy = dy.contiguous()
        dX = m_t @ dy
        # m_t is dead now; writing dMᵀ over it bumps its version, so a second backward through this
        # graph (retain_graph) raises instead of reading garbage.
        dm_t = torch.matmul(X, dy.transpose(-1, -2), out=m_t)  # dMᵀ[s, l] = X[s]·dY[l]
        dscores_t = dm_t.mul_(decay_t).sum(dim=-3, keepdim=True)
        # Row dots through einsum (a batched matmul) instead of mul + sum: no (..., Q, P) temporary.
        dAcum = torch.einsum("...qp,...qp->...q", dy, y) - torch.einsum("...qp,...qp->...q", X, dX)
        ddA = dAcum.flip(-1).cumsum(-1).flip(-1)  # Acum[l] = Σ_{k<=l} dA[k]
        dx = torch.empty_like(x)  # back to token-major in the same pass as the product
        torch.mul(dX, dt.permute(0, 1, 3, 4, 2)[..., None], out=dx.permute(0, 1, 3, 4, 2, 5))
        ddt = (dX * x.permute(0, 1, 3, 4, 2, 5)).sum(-1).permute(0, 1, 4, 2, 3)
        return dscores_t, ddA, dx, ddt


class _StatePassing(torch.autograd.Function):
    """S[i+1] = w[i] · S[i] + st[i] over the chunks from S[0] = S_0; returns (S[0..c-1], S[c]).

    Shapes: states (B, c, G, N, R, P), N-major as the output matmul reads them; decay w (B, c, G, R);
    s0 (B, G, N, R, P) or None (zeros). A loop of c in-place multiply-adds on slices of one buffer,
    with no autograd graph over it: the (c+1) x (c+1) matmul it replaced costs ~70x the flops, and
    its cat, slice and layout copies cost more than the loop. Backward runs the recurrence in
    reverse, G[i] = dS[i] + w[i] · G[i+1], then dw[i] = Σ G[i+1] · S[i] in one pass.
    """

    @staticmethod
    def forward(ctx, states: torch.Tensor, decay: torch.Tensor, s0: Optional[torch.Tensor]):
        batch, nchunks, groups, dstate, rep, hdim = states.shape
        # Expanded over P: a stride-0 innermost dim left the multiply-adds 32-element inner loops.
        w = decay[:, :, :, None, :, None].expand(batch, nchunks, groups, 1, rep, hdim).contiguous()
        out = states.new_empty(batch, nchunks + 1, groups, dstate, rep, hdim)
        if s0 is None:
            out[:, 0].zero_()
        else:
            out[:, 0].copy_(s0)
        for i in range(nchunks):
            torch.addcmul(states[:, i], out[:, i], w[:, i], out=out[:, i + 1])
        ctx.save_for_backward(out, w)
        ctx.has_s0 = s0 is not None
        return out[:, :-1], out[:, -1]

    @staticmethod
    def backward(ctx, d_entering: torch.Tensor, d_final: torch.Tensor):
        out, w = ctx.saved_tensors
        nchunks = out.shape[1] - 1
        grad = torch.empty_like(out)  # grad[:, i] = dLoss/dS[i], through every later chunk
        grad[:, -1].copy_(d_final)
        for i in range(nchunks - 1, -1, -1):
            torch.addcmul(d_entering[:, i], grad[:, i + 1], w[:, i], out=grad[:, i])
        # Summed over N first (an outer, vectorised reduction), then P; an einsum here permuted
        # both operands into copies.
        d_decay = torch.mul(grad[:, 1:], out[:, :-1]).sum(3).sum(-1)
        return grad[:, 1:], d_decay, grad[:, 0] if ctx.has_s0 else None


def clamp_state_norm(state: torch.Tensor, tau: float, dims: tuple[int, ...]) -> torch.Tensor:
    """state · min(1, tau / |state|), the Frobenius norm taken over ``dims`` (one head's P x N)."""
    norm = torch.linalg.vector_norm(state, dim=dims, keepdim=True)
    return state * (tau / norm.clamp_min(tau))


def _state_passing_normed(states: torch.Tensor, decay: torch.Tensor, s0: Optional[torch.Tensor],
                          tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``_StatePassing`` with the state's norm clamped to tau after every chunk (state normalisation).

    Shapes as ``_StatePassing``: states (B, c, G, N, R, P), decay (B, c, G, R). Plain autograd over a
    loop of c steps: an inference knob (and a rare training one), so not worth a hand-written backward.
    """
    batch, nchunks, groups, dstate, rep, hdim = states.shape
    s = states.new_zeros(batch, groups, dstate, rep, hdim) if s0 is None else s0
    entering = []
    for i in range(nchunks):
        entering.append(s)
        s = clamp_state_norm(decay[:, i, :, None, :, None] * s + states[:, i], tau, dims=(2, 4))
    return torch.stack(entering, dim=1), s


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
    log_decay_bias: Optional[torch.Tensor] = None,
    state_norm_max: Optional[float] = None,
    window: Optional[int] = None,
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
        log_decay_bias: (H,) added to every log decay dt·A (<= 0): every decay a_t is multiplied
            by exp(bias), the Stuffed Mamba ``decay_mult`` knob. None: nothing added.
        state_norm_max: tau; the carried state of each head is rescaled at every chunk boundary
            to Frobenius norm <= tau (S <- S·min(1, tau/|S|)); with chunk_size 1 that is after every
            token, as the decode step does. None: no rescaling.
        window: r; every output reads the windowed state S_t - (prod of a over t-r+1..t)·S_{t-r},
            which holds only the last r tokens' writes (README.md, Long context). The initial
            state counts as written at position -1. The returned final state stays the full one.
            Not combinable with ``state_norm_max`` (the identity needs a linear recurrence).
    Returns:
        y (B, L, H, P) in x's dtype [, final_state].
    """
    if window is not None:
        if state_norm_max is not None:
            raise ValueError("ssd_chunked: window and state_norm_max cannot be combined")
        return _windowed(x, dt, A, B, C, chunk_size, D, initial_state, doc_ids, return_final_state,
                         log_decay_bias, window)
    batch, length, heads, hdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    rep = heads // groups
    q = chunk_size
    work = torch.promote_types(x.dtype, torch.float32)
    pad = (-length) % q
    nchunks = (length + pad) // q

    xw, dtw = x.to(work), dt.to(work)
    dA = dtw * A.to(work)  # (B, L, H) log decays, <= 0
    if log_decay_bias is not None:
        dA = dA + log_decay_bias.to(work)
    xp, dtp = xw, dtw
    Bw, Cw = B.to(work), C.to(work)
    seg = segment_index(doc_ids) if doc_ids is not None else None
    if pad:
        # Padding with dt = 0 means decay 1 and no input, so the final state is untouched;
        # the padded tail repeats the last id so it cannot trigger a reset.
        xp = F.pad(xw, (0, 0, 0, 0, 0, pad))
        dtp = F.pad(dtw, (0, 0, 0, pad))
        dA = F.pad(dA, (0, 0, 0, pad))
        Bw = F.pad(Bw, (0, 0, 0, 0, 0, pad))
        Cw = F.pad(Cw, (0, 0, 0, 0, 0, pad))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(batch, pad)], dim=1)

    # Two layouts: token-major (B, c, G, Q, R·P) for the state einsums, which then contract over
    # Q or N with all R heads of a group in one matmul (B and C are never copied per head), and
    # head-major (B, c, G, R, Q, P) for the diagonal blocks, whose decay differs per head.
    # The dt scaling is folded into each path's first product: x·dt head-major inside the diagonal
    # blocks, x·(dt·to_end) for the chunk states; x·dt itself is never stored token-major.
    xtok = xp.view(batch, nchunks, q, groups, rep, hdim)  # (B, c, Q, G, R, P)
    dttok = dtp.view(batch, nchunks, q, groups, rep)
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
    y_diag = _DiagonalBlocks.apply(scores_t.unsqueeze(3), dAc, xtok, dttok)  # (B, c, G, R, Q, P)

    # 2. State contributed by each chunk, measured at its last position, N-major: (B, c, G, N, R·P).
    to_end = exp_flushed(Acum[..., -1:] - Acum)  # (B, c, G, R, Q); exponent <= 0
    if seg is not None:
        to_end = to_end * (segc == segc[:, :, -1:]).to(work)[:, :, None, None]  # mask 3
    coef = dttok.transpose(2, 3) * to_end.transpose(-1, -2)  # (B, c, G, Q, R)
    scaled = xtok.transpose(2, 3) * coef[..., None]  # (B, c, G, Q, R, P)
    chunk_states = Bc.transpose(-1, -2) @ scaled.flatten(-2)  # (B, c, G, N, R·P)

    # 3. State passing (step 3 of the SSD algorithm), S_end(c) = exp(total_c) · S_end(c-1) + st_c.
    chunk_decay = exp_flushed(Acum[..., -1])  # (B, c, G, R)
    if seg is not None:
        # Mask 4: the carried state dies in a chunk that starts a new document before its end,
        # i.e. whose last id differs from the id owning its entering state.
        end_ids = segc[:, :, -1]  # (B, c)
        prev_ids = torch.cat([seg[:, :1], end_ids[:, :-1]], dim=1)  # id owning the entering state
        chunk_decay = chunk_decay * (end_ids == prev_ids).to(work)[:, :, None, None]
    s0 = None
    if initial_state is not None:
        s0 = initial_state.to(work).reshape(batch, groups, rep, hdim, dstate).permute(0, 1, 4, 2, 3).contiguous()
    if state_norm_max is None:
        entering, final_state = _StatePassing.apply(
            chunk_states.view(batch, nchunks, groups, dstate, rep, hdim),
            chunk_decay, s0)  # (B, c, G, N, R, P), (B, G, N, R, P)
    else:
        entering, final_state = _state_passing_normed(
            chunk_states.view(batch, nchunks, groups, dstate, rep, hdim), chunk_decay, s0, state_norm_max)

    # 4. Entering state -> outputs, decayed to each position, plus the diagonal blocks.
    from_start = exp_flushed(Acum)  # (B, c, G, R, Q)
    if seg is not None:
        from_start = from_start * (segc == prev_ids[:, :, None]).to(work)[:, :, None, None]  # mask 5
    y_off = (Cc @ entering.flatten(-2)).view(batch, nchunks, groups, q, rep, hdim)
    # Token-major product first, then the head-major diagonal added in place: one fresh buffer,
    # already in the (B, c, Q, G, R, P) order of the output when G = 1.
    y = (y_off * from_start.transpose(-1, -2)[..., None]).add_(y_diag.transpose(3, 4))
    y = y.transpose(2, 3).reshape(batch, nchunks * q, heads, hdim)[:, :length]
    if D is not None:
        y = y + D.to(work)[:, None] * xw
    y = y.to(x.dtype)
    if return_final_state:
        return y, final_state.permute(0, 1, 3, 4, 2).reshape(batch, heads, hdim, dstate)
    return y


def _windowed(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
              D: Optional[torch.Tensor], initial_state: Optional[torch.Tensor], doc_ids: Optional[torch.Tensor],
              return_final_state: bool, log_decay_bias: Optional[torch.Tensor],
              r: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``ssd_chunked`` with a window of r tokens, by the state-difference identity.

    y_t = C_t·S_t - g_t · C_t·S_{t-r} with g_t = prod_{j=t-r+1..t} a_j. The second term is a scan
    whose query at s is C_{s+r} (outputs are linear in C), so it costs one more chunked scan over
    L - r tokens: no per-position states are ever stored. Where a document starts inside
    (t-r, t], S_t already holds only that document's tokens, all within the window: g_t = 0.
    """
    batch, length, heads, _ = x.shape
    out = ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state, doc_ids=doc_ids,
                      return_final_state=return_final_state, log_decay_bias=log_decay_bias)
    y, final = out if return_final_state else (out, None)
    if r >= length + 1 or (r == length and initial_state is None):
        return (y, final) if return_final_state else y
    work = torch.promote_types(x.dtype, torch.float32)
    rep = heads // B.shape[2]
    dA = dt.to(torch.float64) * A.to(torch.float64)
    if log_decay_bias is not None:
        dA = dA + log_decay_bias.to(torch.float64)
    cum = F.pad(dA.cumsum(dim=1), (0, 0, 1, 0))  # (B, L+1, H); cum[:, t+1] = sum_{j<=t} dA_j
    t = torch.arange(r - 1, length, device=x.device)  # positions with a state r steps back (S_{-1} = S_0)
    gain = (cum[:, t + 1] - cum[:, t + 1 - r]).exp()  # (B, n, H)
    if doc_ids is not None:
        seg = segment_index(doc_ids)
        gain = gain * (seg[:, t] == seg[:, (t - r).clamp_min(0)]).to(gain.dtype)[..., None]
    gain = gain.to(work)
    lagged = []  # (B, n, H, P): C_t·S_{t-r}
    if r - 1 < length:
        if initial_state is not None:
            c0 = C[:, r - 1].to(work).repeat_interleave(rep, dim=1)  # (B, H, N)
            lagged.append(torch.einsum("bhpn,bhn->bhp", initial_state.to(work), c0)[:, None])
        else:
            lagged.append(y.new_zeros(batch, 1, heads, x.shape[3], dtype=work))
    if length > r:
        n = length - r
        lagged.append(ssd_chunked(x[:, :n], dt[:, :n], A, B[:, :n], C[:, r:], chunk_size, initial_state=initial_state,
                                  doc_ids=None if doc_ids is None else doc_ids[:, :n],
                                  log_decay_bias=log_decay_bias).to(work))
    correction = gain[..., None] * torch.cat(lagged, dim=1)
    y = torch.cat([y[:, :r - 1], (y[:, r - 1:].to(work) - correction).to(y.dtype)], dim=1)
    return (y, final) if return_final_state else y
