"""Log-space segment sums: the decay matrices of a linear recurrence inside a chunk.

A recurrence ``X_t = a_t X_{t-1} + U_t`` over a chunk of b steps has the closed form
``X_t = (prod_{j<=t} a_j) X_0 + sum_{s<=t} (prod_{j=s+1..t} a_j) U_s``, i.e. a matmul of the
stacked inputs with the lower-triangular matrix ``D[t, s] = exp(segsum(log a)[t, s])``.
The segment sum is built by a masked cumulative sum (as in Mamba-2's SSD) rather than as a
difference of prefix sums, so that long products of small gates do not cancel catastrophically.
"""
from __future__ import annotations

import torch


def safe_log(a: torch.Tensor) -> torch.Tensor:
    """log(a) with a clamped to the smallest normal number, so that a gate of exactly 0 gives a
    decay of ~1e-38 (fp32) / 1e-308 (fp64) with a finite gradient instead of -inf / NaN."""
    return torch.log(a.clamp_min(torch.finfo(a.dtype).tiny))


def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """(..., b) -> (..., b, b): out[t, s] = sum_{j=s+1..t} log_a[j] for s <= t, -inf above."""
    b = log_a.size(-1)
    x = log_a[..., :, None].expand(*log_a.shape, b)  # x[t, s] = log_a[t]
    strict = torch.ones(b, b, dtype=torch.bool, device=log_a.device).tril(-1)
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~strict.logical_or(torch.eye(b, dtype=torch.bool, device=log_a.device)), float("-inf"))


def decay_matrix(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates a: (..., b) in [0, 1] -> (D (..., b, b) lower-triangular, P (..., b) prefix products)."""
    log_a = safe_log(a)
    return torch.exp(segsum(log_a)), torch.exp(torch.cumsum(log_a, dim=-1))
