"""Chunked parallel training form of the Titans / ATLAS memory update (Titans paper section 3.2;
ATLAS paper section 3.3).

Recurrence, per head and token t (momentum form; ``T`` is the identity or Newton-Schulz):

    u_t = d/dW sum_j gamma_{t,j} loss(W_anchor; k_{t,j}, v_{t,j})     # Omega window j (c=1: Titans)
    S_t = eta_t S_{t-1} - inner_t u_t
    W_t = (1 - alpha_t) W_{t-1} + outer_t T(S_t)
    y_t = M_{W_t}(q_t)                                                 # read after write

``W_anchor`` is the memory at the start of the chunk containing t (mini-batch gradient descent;
chunk size 1 is exact online learning). Plain momentum (Titans): inner = theta, outer = 1.
Muon (ATLAS, step size outside the orthogonalisation, ATLAS paper section 3.3): inner = 1, outer = theta.

Inside a chunk all b gradients are computed in one batched call and both recurrences are
lower-triangular matmuls with log-space decay matrices (``scan.py``). Chunks run one after
another because each needs the previous chunk's final weights. Every token still reads with its
own weights W_t (exact per-token read-after-write), in one of two ways:

* plain momentum (``ns_steps == 0``): closed form, no per-token weights. Everything in a chunk is
  linear in the gradients, and each layer's gradient is a sum of outer products
  ``u_i = sum_j dz_{i,j} h_{i,j}^T`` (``memory_mlp.memory_grads``), so for the vector a_t that
  layer reads at token t

      W_t a_t = P_dec[t] W_0 a_t + kappa_t S_0 a_t + sum_{i<=t} K[t, i] sum_j dz_{i,j} (h_{i,j} . a_t)

  with ``K = D_dec diag(outer) D_mom diag(-inner)`` and ``kappa = D_dec (outer * P_mom)``
  (b x b, lower-triangular). Only the chunk's final W and S are formed (one matmul each), so a
  chunk needs O(b^2 c + b c d + d^2) memory instead of O(b d^2) for b copies of W. K, kappa and
  everything else that does not depend on the state are built for all chunks at once before the
  sequential loop, leaving about twenty small ops per chunk inside it (depth 2). Decays and
  coefficients below 2^30 x the smallest normal number (1e-29 in fp32) are raised to it or
  zeroed, which keeps subnormals, slow on x86, out of the matmuls.
* Muon (``ns_steps > 0``): Newton-Schulz is not linear, so the b momenta and weights of a chunk
  are materialised and every token is read through its own copy (``_materialised``).

Padding convention: tokens with ``valid == 0`` leave (W, S) untouched (eta=1, alpha=0,
inner=outer=0, whatever their inputs); callers use them to align documents and carried
partial chunks to the chunk grid; a chunk holding only padding keeps the anchor it was given. All state math runs in at least fp32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hybrid_lm.kernels.atlas.newton_schulz import newton_schulz
from hybrid_lm.kernels.titans.memory_mlp import Bias, memory_forward, memory_grads, soft_clamp_factor
from hybrid_lm.kernels.titans.scan import decay_matrix, safe_log

Result = tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]


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
    max_grad_norm: Optional[float] = None,
) -> Result:
    """Run the memory over N independent streams of L tokens, chunk by chunk.

    w, s, anchor: per memory layer, (N, out_l, in_l): weights, momentum, and the weights at the
        start of the current (possibly partially processed) chunk, where gradients are taken.
        The first token of ``k`` must sit at a chunk start (callers front-pad to align).
    k: (N, L, c, d_in) key windows (oldest first), v: (N, L, c, d_out), gamma: (N, L, c) window gates.
    q: (N, L, d_in). theta, eta, alpha: (N, L). valid: (N, L) bool.
    ns_steps: 0 = plain momentum (Titans); > 0 = Muon with that many Newton-Schulz steps.
    max_grad_norm: soft clamp of every token's per-layer gradient u_t to this Frobenius norm
        (``memory_mlp.soft_clamp_factor``; None = off). It bounds every write, so with
        eta <= eta_max < 1 and alpha >= alpha_min > 0 the state stays bounded:
        ||S_t|| <= max_inner * G / (1 - eta_max) and ||W_t|| <= max(||W_0||, ||S||_max / alpha_min).

    Returns y (N, L, d_out), final w and s (per layer, (N, out, in)), and for each chunk the
    per-layer anchor it used (so a caller can recover the anchor of a partial last chunk).
    L need not be a multiple of chunk_size: the tail is padded with no-op tokens.
    """
    impl = _materialised if ns_steps > 0 else _closed_form
    return impl(w, s, anchor, k, v, gamma, q, theta, eta, alpha, valid, chunk_size,
                residual=residual, ns_steps=ns_steps, bias=bias, max_grad_norm=max_grad_norm)


def _pad_and_cast(
    w: Sequence[torch.Tensor], s: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], k: torch.Tensor,
    v: torch.Tensor, gamma: torch.Tensor, q: torch.Tensor, theta: torch.Tensor, eta: torch.Tensor,
    alpha: torch.Tensor, valid: torch.Tensor, chunk_size: int, muon: bool,
) -> tuple:
    """Pad the tail to whole chunks with no-op tokens, cast to the state dtype, make the gates."""
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
    inner, eta, alpha, outer = prepare_gates(theta.to(cdt), eta.to(cdt), alpha.to(cdt), valid, muon)
    w = [t.to(cdt) for t in w]
    s = [t.to(cdt) for t in s]
    anc = [t.to(cdt) for t in anchor]
    return w, s, anc, k, v, gamma, q, inner, eta, alpha, outer, valid


def _materialised(
    w: Sequence[torch.Tensor], s: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], k: torch.Tensor,
    v: torch.Tensor, gamma: torch.Tensor, q: torch.Tensor, theta: torch.Tensor, eta: torch.Tensor,
    alpha: torch.Tensor, valid: torch.Tensor, chunk_size: int, *, residual: bool, ns_steps: int = 0,
    bias: Bias = "l2", max_grad_norm: Optional[float] = None,
) -> Result:
    """``chunked_memory_update`` with the b per-token weights of each chunk formed explicitly.

    Needed for Muon; for plain momentum it is the reference the closed form is tested against.
    """
    length = theta.size(1)
    w, s, anc, k, v, gamma, q, inner, eta, alpha, outer, valid = _pad_and_cast(
        w, s, anchor, k, v, gamma, q, theta, eta, alpha, valid, chunk_size, ns_steps > 0)
    ys: list[torch.Tensor] = []
    anchors: list[list[torch.Tensor]] = []
    b = chunk_size
    for start in range(0, k.size(1), b):
        sl = slice(start, start + b)
        anchors.append(anc)
        grads = memory_grads(anc, k[:, sl], v[:, sl], gamma[:, sl], residual, bias, max_grad_norm)
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


def _floor(dtype: torch.dtype) -> float:
    """2^30 x the smallest normal number of dtype: about 1e-29 in fp32, 2e-299 in fp64."""
    return torch.finfo(dtype).tiny * 2.0**30


def _flush(x: torch.Tensor) -> torch.Tensor:
    """Zero entries below ``_floor``.

    Products of gates underflow into subnormals, and x86 matmuls and elementwise ops (exp
    included) slow down several times on them (see ``kernels/ssd/chunked.py``); what is dropped
    is far below rounding of anything it is added to.
    """
    return x.masked_fill(x.abs() < _floor(x.dtype), 0.0)


def _decay_flushed(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scan.decay_matrix`` built for speed; D comes back as a transposed view.

    The same masked cumsum as ``scan.segsum`` (no prefix-sum differences), but summed along the
    contiguous last dim, with finite exponents everywhere (exp(-inf) is ~10x slower than a finite
    exp on x86) and the upper triangle zeroed by a multiply. Decays below ``_floor`` are raised to
    it, so no subnormal reaches the matmuls (as ``ssd.chunked.decay_transposed``).
    """
    b = a.size(-1)
    log_floor = math.log(_floor(a.dtype))
    log_a = safe_log(a)
    upper = torch.ones(b, b, dtype=a.dtype, device=a.device).triu()  # [s, t] = 1 where t >= s
    later = upper.triu(1)
    # in place on fresh outputs whose producers do not save them for backward
    seg_t = (log_a[..., None, :] * later).cumsum_(dim=-1)  # [s, t] = sum_{j=s+1..t} log a_j for t >= s, else 0
    d_t = seg_t.clamp_min_(log_floor).exp_() * upper
    return d_t.mT, log_a.cumsum(dim=-1).clamp_min(log_floor).exp()


def _clamp_columns(dz_t: torch.Tensor, h_t: torch.Tensor, c: int, max_norm: float) -> torch.Tensor:
    """(N, 1, b*c) soft-clamp factors of the per-token gradients sum_j dz_{i,j} h_{i,j}^T.

    dz_t (N, out, b*c), h_t (N, in, b*c), window entries of a token adjacent. The Frobenius norm
    comes from the Gram matrices over the window, ||sum_j dz_j h_j^T||^2 = sum_{j,j'} (dz_j.dz_j')
    (h_j.h_j'), so no gradient matrix is formed.
    """
    n = dz_t.size(0)
    if c == 1:
        norm_sq = dz_t.square().sum(dim=1) * h_t.square().sum(dim=1)
    else:
        dz = dz_t.view(n, dz_t.size(1), -1, c)
        h = h_t.view(n, h_t.size(1), -1, c)
        gram = torch.einsum("nobi,nobj->nbij", dz, dz) * torch.einsum("nobi,nobj->nbij", h, h)
        norm_sq = gram.sum(dim=(-1, -2))
    factor = soft_clamp_factor(norm_sq, max_norm)
    return (factor.repeat_interleave(c, dim=-1) if c > 1 else factor)[:, None, :]


def _closed_form(
    w: Sequence[torch.Tensor], s: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], k: torch.Tensor,
    v: torch.Tensor, gamma: torch.Tensor, q: torch.Tensor, theta: torch.Tensor, eta: torch.Tensor,
    alpha: torch.Tensor, valid: torch.Tensor, chunk_size: int, *, residual: bool, ns_steps: int = 0,
    bias: Bias = "l2", max_grad_norm: Optional[float] = None,
) -> Result:
    """Plain-momentum ``chunked_memory_update`` by the closed-form read (module docstring)."""
    if ns_steps > 0:
        raise ValueError("the closed-form read is linear in the momentum; Muon needs _materialised")
    if bias not in ("l2", "dot"):
        raise ValueError(f"unknown attentional bias {bias!r}")
    length = theta.size(1)
    w, s, anc, k, v, gamma, q, inner, eta, alpha, outer, valid = _pad_and_cast(
        w, s, anchor, k, v, gamma, q, theta, eta, alpha, valid, chunk_size, False)
    n, padded, c, d_in = k.shape
    b, depth = chunk_size, len(w)
    nc = padded // b
    bc = b * c

    # Everything that does not depend on the state, for all chunks at once, chunk-major
    # (nc, N, ...) so that each chunk's slice is contiguous. Activations inside the loop are kept
    # transposed, (N, features, b*c), which is the layout the state-update products want.
    gates = torch.stack([eta, 1.0 - alpha, -inner, outer]).view(4, n, nc, b).transpose(1, 2).contiguous()
    d_mom, p_mom = _decay_flushed(gates[0])  # (nc, N, b, b), (nc, N, b)
    d_dec, p_dec = _decay_flushed(gates[1])
    coef, out_g = gates[2], gates[3]
    kmat = _flush(d_dec @ (out_g[..., :, None] * d_mom * coef[..., None, :]))  # (nc, N, b, b)
    kappa = _flush((d_dec @ (out_g * p_mom)[..., None])[..., 0])  # (nc, N, b)
    s_row = _flush(d_mom[..., -1, :] * coef)
    # token i's window entries sit at columns i*c .. i*c+c-1 of the flattened (b*c) factors
    krep = kmat.repeat_interleave(c, dim=-1) if c > 1 else kmat  # (nc, N, b, bc)
    s_row = s_row.repeat_interleave(c, dim=-1) if c > 1 else s_row
    last_rows = torch.stack([krep[..., -1, :], s_row], dim=2)[..., None, :]  # (nc, N, 2, 1, bc)
    # [W_b^T; S_b^T] = mix @ [W_0^T; S_0^T] + gradient part
    mix = torch.stack([p_dec[..., -1], kappa[..., -1], torch.zeros_like(kappa[..., -1]), p_mom[..., -1]], dim=-1)
    mix = mix.view(nc, n, 2, 2)
    anchor_coef = torch.stack([p_dec, kappa], dim=-1)[..., None]  # (nc, N, b, 2, 1)

    k_t = k.reshape(n, nc, bc, d_in).permute(1, 0, 3, 2).contiguous()  # (nc, N, d_in, bc)
    v_t = v.reshape(n, nc, bc, -1).permute(1, 0, 3, 2)
    g_t = gamma.reshape(n, nc, 1, bc).transpose(0, 1)
    q_c = q.reshape(n, nc, b, d_in).transpose(0, 1)
    # layer 0 reads q and learns from k, both known up front, so its read
    # [P_dec q, kappa q] @ [W_0^T; S_0^T] + (K * q k^T) @ dZ has both left factors built here
    read0_anchor = (anchor_coef * q_c[..., None, :]).flatten(-2)  # (nc, N, b, 2 d_in)
    read0_grad = krep * (q_c @ k_t)  # (nc, N, b, bc)
    state0 = (k_t[:, :, None] * last_rows).flatten(2, 3)  # (nc, N, 2 d_in, bc)
    if bias == "l2":
        # dZ_out = 2 gamma (M(k) - v) = g2 * z_out + g2_rest, with the residual k folded into the rest
        g2 = 2.0 * g_t
        dz_terms = [g2, g2 * (k_t - v_t) if residual else -g2 * v_t]
    else:
        dz_terms = [-v_t * g_t]
    per_chunk = [read0_anchor, read0_grad, state0, mix, anchor_coef, krep, last_rows, k_t] + dz_terms
    per_chunk_lists = [x.contiguous().unbind(0) for x in per_chunk]
    keep = ~valid.reshape(n, nc, b).any(dim=-1).t()  # (nc, N): chunk of padding only
    keep_any = keep.any(dim=1).tolist()
    keep = keep[..., None, None]

    # state of layer l as [W^T; S^T]: (N, 2 in_l, out_l), the layout both matmuls below want
    ws = [torch.cat([wl.mT, sl.mT], dim=1) for wl, sl in zip(w, s)]
    dims_in = [wl.size(-1) for wl in w]
    ys: list[torch.Tensor] = []
    anchors: list[list[torch.Tensor]] = []
    for ci, chunk_terms in enumerate(zip(*per_chunk_lists)):
        rd0_a, rd0_g, st0, mx, ac, kr, lr, h_t = chunk_terms[:8]
        anchors.append(anc)
        # gradient factors at the anchor, transposed: layer inputs h_l^T and output gradients dz_l^T
        hs_t, zs_t = [h_t], []
        for l, al in enumerate(anc):
            z_t = torch.bmm(al, h_t)
            if l < depth - 1:
                zs_t.append(z_t)
                h_t = F.gelu(z_t)
                hs_t.append(h_t)
        dz_t = torch.addcmul(chunk_terms[9], chunk_terms[8], z_t) if bias == "l2" else chunk_terms[8]
        dzs_t: list[torch.Tensor] = [dz_t] * depth
        for l in range(depth - 1, 0, -1):
            dz_t = torch.ops.aten.gelu_backward(torch.bmm(anc[l].mT, dz_t), zs_t[l - 1])
            dzs_t[l - 1] = dz_t
        if max_grad_norm is not None:
            # token i's layer-l gradient is sum_j dz_{i,j} h_{i,j}^T: scaling its dz columns scales it
            dzs_t = [dz * _clamp_columns(dz, h, c, max_grad_norm) for dz, h in zip(dzs_t, hs_t)]
        # read after write through the closed form, layer by layer, then the chunk's final state;
        # baddbmm_ runs in place on fresh bmm outputs (the out-of-place form copies its input)
        dz = dzs_t[0].mT
        z = torch.bmm(rd0_a, ws[0]).baddbmm_(rd0_g, dz)
        grad_parts = [torch.bmm(st0, dz)]
        for l in range(1, depth):
            a, dz, hl_t = F.gelu(z), dzs_t[l].mT, hs_t[l]
            z = torch.bmm((ac * a[:, :, None, :]).flatten(-2), ws[l]).baddbmm_(kr * torch.bmm(a, hl_t), dz)
            grad_parts.append(torch.bmm((hl_t[:, None] * lr).flatten(1, 2), dz))
        ys.append(z)
        ws = [g.view(n, 2, -1).baddbmm_(mx, wsl.view(n, 2, -1)).view(wsl.shape) for g, wsl in zip(grad_parts, ws)]
        new_w = [wsl[:, :di].mT for wsl, di in zip(ws, dims_in)]
        # a chunk of padding only (front alignment of a carried chunk) keeps the carried anchor
        anc = [torch.where(keep[ci], al, wl) for al, wl in zip(anc, new_w)] if keep_any[ci] else new_w
    y = torch.cat(ys, dim=1)[:, :length]
    if residual:
        y = y + q[:, :length]
    w_end = [wsl[:, :di].mT.contiguous() for wsl, di in zip(ws, dims_in)]
    s_end = [wsl[:, di:].mT.contiguous() for wsl, di in zip(ws, dims_in)]
    return y, w_end, s_end, anchors


def update_flops_per_token(
    dims: Sequence[tuple[int, int]], chunk_size: int, window: int, ns_steps: int, clamp: bool = False
) -> float:
    """Matmul FLOPs per token and head of ``chunked_memory_update`` as computed (2 per multiply-add).

    dims: (out, in) of each memory weight matrix; window: the Omega window c; clamp: whether
    ``max_grad_norm`` is set. The two paths do different work for the same result: the closed form
    (``ns_steps == 0``) never forms per-token weights, the materialised form (Muon) forms and
    orthogonalises b of them per chunk. Counts the gradient at the anchor (forward, input gradients
    of layers >= 1, weight gradients or their closed-form equivalents), the reads, the b x b scans
    and the clamp's c x c Gram matrices; elementwise work is left out.
    tests/models/test_flops.py checks this against torch's FlopCounterMode on both paths.
    """
    b, c = chunk_size, window
    n_w = sum(o * i for o, i in dims)
    n_w0 = dims[0][0] * dims[0][1]
    # forward at the anchor, and dz back through every layer but the first
    grad = 2 * c * n_w + 2 * c * (n_w - n_w0)
    if ns_steps == 0:
        io = sum(o + i for o, i in dims)
        # the clamp's norms over a window come from dz and h Gram matrices (c = 1: elementwise)
        gram = 2 * c * c * io if clamp and c > 1 else 0
        # per chunk: [W; S] reads (4 n_w b), state update from the b*c gradient factors (4 n_w b c),
        # b x (b*c) read-after-write products per layer, the 2 x 2 state mix, the b x b gate matrices
        return grad + gram + (4 + 4 * c + 8 / b) * n_w + 2 * b * c * io + 2 * b * b + 2 * b
    # per-token weight gradients (the clamp takes their norms elementwise), the two b x b scans over
    # every weight entry, the read, and per Newton-Schulz step X X^T, A @ A and (.) @ X with
    # m = min(out, in), n = max(out, in)
    ns = sum(4 * min(o, i) ** 2 * max(o, i) + 2 * min(o, i) ** 3 for o, i in dims)
    return grad + 2 * c * n_w + 2 * 2 * b * n_w + 2 * n_w + ns_steps * ns
