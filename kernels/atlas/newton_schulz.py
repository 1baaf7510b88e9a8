"""Newton-Schulz-5 orthogonalisation (Muon), the inner optimiser of ATLAS (Muon's recipe, as
lucidrains' ``newtonschulz5``).

Maps a matrix S to an approximation of the nearest semi-orthogonal matrix ``U V^T`` (for
``S = U Sigma V^T``) with a fixed odd polynomial iteration, so it is differentiable, batched over
any leading dims (heads, tokens of a chunk) and odd: NS(-S) = -NS(S).
"""
from __future__ import annotations

import torch

#: (a, b, c) of the quintic iteration X <- a X + (b A + c A^2) X, A = X X^T (Muon's tuned values)
NS5_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def newton_schulz(s: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """s: (..., m, n) -> (..., m, n) with singular values pushed towards 1 (about [0.7, 1.2]).

    Runs in the input dtype; callers keep memory states in fp32 or fp64.
    """
    a, b, c = NS5_COEFFS
    x = s / s.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    transpose = s.size(-2) > s.size(-1)
    if transpose:
        x = x.transpose(-1, -2)
    for _ in range(steps):
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-1, -2) if transpose else x
