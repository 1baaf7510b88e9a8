"""Chunked parallel training form of the Titans / ATLAS memory update (spec 2.4, 3.5).

Recurrence, per head and token t (momentum form; ``T`` is the identity or Newton-Schulz):

    u_t = d/dW sum_j gamma_{t,j} loss(W_anchor; k_{t,j}, v_{t,j})     # Omega window j (c=1: Titans)
    S_t = eta_t S_{t-1} - inner_t u_t
    W_t = (1 - alpha_t) W_{t-1} + outer_t T(S_t)
    y_t = M_{W_t}(q_t)                                                 # read after write

``W_anchor`` is the memory at the start of the chunk containing t (mini-batch gradient descent;
chunk size 1 is exact online learning). Plain momentum (Titans): inner = theta, outer = 1.
Muon (ATLAS, step size outside the orthogonalisation, spec 3.5): inner = 1, outer = theta.

Inside a chunk all b gradients are computed in one batched call, both recurrences are
lower-triangular matmuls with log-space decay matrices (``scan.py``), and every token is read
with its own materialised weights (exact per-token read-after-write; b copies of W per chunk).
Chunks run one after another because each needs the previous chunk's final weights.

Padding convention: tokens with ``valid == 0`` leave (W, S) untouched (eta=1, alpha=0,
inner=outer=0, whatever their inputs); callers use them to align documents and carried
partial chunks to the chunk grid; a chunk holding only padding keeps the anchor it was given. All state math runs in at least fp32.
"""
from __future__ import annotations

from typing import Sequence

import torch

from hybrid_lm.kernels.atlas.newton_schulz import newton_schulz
from hybrid_lm.kernels.titans.memory_mlp import Bias, memory_forward, memory_grads
from hybrid_lm.kernels.titans.scan import decay_matrix


def prepare_gates(
    theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, valid: torch.Tensor, muon: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, L) gates -> (inner, eta, alpha, outer), with padding tokens made into no-ops."""
    v = valid.to(theta.dtype)
    eta = torch.where(valid, eta, torch.ones_like(eta))
    alpha = alpha * v
    if muon:
        return v, eta, alpha, theta * v
    return theta * v, eta, alpha, v


def chunked_memory_update(
    w: Sequence[torch.Tensor],
    s: Sequence[torch.Tensor],
    anchor: Sequence[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    q: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    valid: torch.Tensor,
    chunk_size: int,
    *,
    residual: bool,
    ns_steps: int = 0,
    bias: Bias = "l2",
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
    """Run the memory over N independent streams of L tokens, chunk by chunk.

    w, s, anchor: per memory layer, (N, out_l, in_l): weights, momentum, and the weights at the
        start of the current (possibly partially processed) chunk, where gradients are taken.
        The first token of ``k`` must sit at a chunk start (callers front-pad to align).
    k: (N, L, c, d_in) key windows (oldest first), v: (N, L, c, d_out), gamma: (N, L, c) window gates.
    q: (N, L, d_in). theta, eta, alpha: (N, L). valid: (N, L) bool.
    ns_steps: 0 = plain momentum (Titans); > 0 = Muon with that many Newton-Schulz steps.

    Returns y (N, L, d_out), final w and s (per layer, (N, out, in)), and for each chunk the
    per-layer anchor it used (so a caller can recover the anchor of a partial last chunk).
    L need not be a multiple of chunk_size: the tail is padded with no-op tokens.
    """
    n, length = theta.shape
    cdt = torch.promote_types(k.dtype, torch.float32)
    pad = (-length) % chunk_size
    if pad:
        def padt(x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
            shape = (n, pad) + tuple(x.shape[2:])
            return torch.cat([x, x.new_full(shape, value)], dim=1)
        k, v, gamma, q, theta, eta, alpha = (padt(t) for t in (k, v, gamma, q, theta, eta, alpha))
        valid = padt(valid, False)
    k, v, gamma, q = k.to(cdt), v.to(cdt), gamma.to(cdt), q.to(cdt)
    inner, eta, alpha, outer = prepare_gates(theta.to(cdt), eta.to(cdt), alpha.to(cdt), valid, ns_steps > 0)
    w = [t.to(cdt) for t in w]
    s = [t.to(cdt) for t in s]
    anc = [t.to(cdt) for t in anchor]
    ys: list[torch.Tensor] = []
    anchors: list[list[torch.Tensor]] = []
    b = chunk_size
    for start in range(0, length + pad, b):
        sl = slice(start, start + b)
        anchors.append(anc)
        grads = memory_grads(anc, k[:, sl], v[:, sl], gamma[:, sl], residual, bias)
        d_mom, p_mom = decay_matrix(eta[:, sl])  # (N, b, b), (N, b)
        d_dec, p_dec = decay_matrix(1.0 - alpha[:, sl])
        coef = -inner[:, sl]
        w_tok = []
        new_w, new_s = [], []
        for l, g in enumerate(grads):
            shape = g.shape  # (N, b, out, in)
            # S_t = m_t S_0 + sum_{i<=t} (m_t / m_i) (-inner_i u_i)
            s_tok = (d_mom @ (coef[..., None] * g.flatten(2))).view(shape) + p_mom[..., None, None] * s[l][:, None]
            upd = newton_schulz(s_tok, ns_steps) if ns_steps > 0 else s_tok
            upd = outer[:, sl, None, None] * upd
            # W_t = beta_t W_0 + sum_{j<=t} (beta_t / beta_j) update_j
            w_l = (d_dec @ upd.flatten(2)).view(shape) + p_dec[..., None, None] * w[l][:, None]
            w_tok.append(w_l)
            new_w.append(w_l[:, -1])
            new_s.append(s_tok[:, -1])
        # every token read with its own weights: (N, b, 1, d_in) through (N, b, out, in) matrices
        ys.append(memory_forward(w_tok, q[:, sl, None, :], residual)[:, :, 0])
        # a chunk of padding only (front alignment of a carried chunk) keeps the carried anchor
        keep = ~valid[:, sl].any(dim=1)[:, None, None]
        w, s = new_w, new_s
        anc = [torch.where(keep, a, wl) for a, wl in zip(anc, new_w)]
    y = torch.cat(ys, dim=1)[:, :length]
    return y, w, s, anchors
