"""The memory network M_W as pure functions of its weights, and its per-token inner gradients.

The memory is an MLP without biases whose weight matrices are the recurrent state (Titans' deep
memory, L_M >= 1 layers): ``dims = (d_in, e*d_out, ..., e*d_out, d_out)``, GELU between layers,
optionally with the residual ``M(x) = x + MLP(x)`` used by Miras/ATLAS (only possible when
d_in == d_out).
Depth 1 is the linear memory ``M(k) = W k``.

The gradients are written out analytically instead of ``vmap(grad(...))``: every per-token
gradient of a weight matrix is a sum of outer products ``dz h^T``, and forming it with one einsum
over the batch of tokens is several times faster on CPU than functorch's per-sample machinery,
while staying an ordinary differentiable expression for the outer (backprop) loop.
Tests compare these gradients with ``torch.func.grad``.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

Bias = Literal["l2", "dot"]


def memory_dims(d_in: int, d_out: int, depth: int, expansion: int) -> list[tuple[int, int]]:
    """(out, in) shape of each weight matrix of a depth-``depth`` memory MLP."""
    if depth < 1:
        raise ValueError(f"memory depth must be >= 1, got {depth}")
    dims = [d_in] + [expansion * d_out] * (depth - 1) + [d_out]
    return [(dims[i + 1], dims[i]) for i in range(depth)]


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz of the exact (erf) GELU: Phi(z) + z * phi(z)."""
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def memory_forward(weights: Sequence[torch.Tensor], x: torch.Tensor, residual: bool) -> torch.Tensor:
    """Apply M_W to a batch of inputs.

    weights[l]: (..., out_l, in_l); x: (..., m, d_in) with the same leading dims -> (..., m, d_out).
    """
    h = x
    for l, w in enumerate(weights):
        h = h @ w.transpose(-1, -2)
        if l < len(weights) - 1:
            h = F.gelu(h)
    return h + x if residual else h


def soft_clamp_factor(norm_sq: torch.Tensor, max_norm: Optional[float]) -> torch.Tensor:
    """Factor that maps a gradient of squared Frobenius norm ``norm_sq`` to the norm
    ``max_norm * tanh(norm / max_norm)``.

    Identity for small gradients (factor -> 1), a smooth cap at ``max_norm`` for large ones, and
    differentiable everywhere, so the outer loop still sees how the write depends on the input.
    It takes the squared norm so that zero gradients (padding tokens) have a finite derivative:
    the floor keeps sqrt away from 0, where its derivative is infinite. ``None`` = off (factor 1).
    """
    if max_norm is None:
        return torch.ones_like(norm_sq)
    norm = norm_sq.clamp_min(1e-30).sqrt()
    return torch.tanh(norm / max_norm) * (max_norm / norm)


def memory_grads(
    weights: Sequence[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    residual: bool,
    bias: Bias = "l2",
    max_grad_norm: Optional[float] = None,
) -> list[torch.Tensor]:
    """Per-token gradients of the windowed inner loss at shared weights.

    For token t of a chunk, ``grad_t = d/dW sum_j gamma[t, j] * loss(W; k[t, j], v[t, j])`` with
    loss ``||M_W(k) - v||^2`` (``bias="l2"``, no 1/2 as in the paper) or the Hebbian
    ``-<M_W(k), v>`` (``bias="dot"``, DeepTransformers; the minus sign makes gradient descent the
    Hebbian write ``W + eta v k^T``).

    weights[l]: (N, out_l, in_l); k: (N, b, c, d_in); v: (N, b, c, d_out); gamma: (N, b, c)
    (c = Omega window, 1 for Titans). Returns one (N, b, out_l, in_l) tensor per layer.
    ``max_grad_norm``: soft-clamp each token's gradient of each layer to this Frobenius norm
    (``soft_clamp_factor``), after the window sum.
    """
    n, b, c, d_in = k.shape
    flat_k = k.reshape(n, b * c, d_in)
    hs = [flat_k]
    zs = []
    h = flat_k
    for l, w in enumerate(weights):
        z = h @ w.transpose(-1, -2)
        zs.append(z)
        h = F.gelu(z) if l < len(weights) - 1 else z
        if l < len(weights) - 1:
            hs.append(h)
    out = h + flat_k if residual else h
    g = gamma.reshape(n, b * c, 1)
    if bias == "l2":
        dz = 2.0 * (out - v.reshape(n, b * c, -1)) * g
    elif bias == "dot":
        dz = -v.reshape(n, b * c, -1) * g
    else:
        raise ValueError(f"unknown attentional bias {bias!r}")
    grads: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    for l in range(len(weights) - 1, -1, -1):
        h_in = hs[l]
        # sum over the window entries of each token: (N, b, out, c) @ (N, b, c, in)
        grads[l] = dz.reshape(n, b, c, -1).transpose(-1, -2) @ h_in.reshape(n, b, c, -1)
        if max_grad_norm is not None:
            grads[l] = grads[l] * soft_clamp_factor(grads[l].flatten(-2).square().sum(-1), max_grad_norm)[..., None, None]
        if l > 0:
            dz = (dz @ weights[l]) * _gelu_grad(zs[l - 1])
    return grads
