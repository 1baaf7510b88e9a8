"""Polynomial feature map of keys/queries (ATLAS, spec 3.3): more keys per memory dimension.

Tensor-power form with learnable coefficients: ``phi(x) = [c_0, c_1 x, c_2 x (x) x, ..., c_p x^(x)p]``
(dimension ``1 + d + ... + d^p``), initialised to ``c_i = sqrt(1/i!)`` so that
``phi(q) . phi(k) = sum_i c_i^2 (q . k)^i`` starts as the degree-p Taylor series of ``exp(q . k)``.
The coefficients are shared across heads (our choice; the paper does not say).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class PolynomialFeatures(nn.Module):
    def __init__(self, dim: int, degree: int) -> None:
        super().__init__()
        if degree < 1:
            raise ValueError(f"polynomial degree must be >= 1, got {degree}")
        self.dim, self.degree = dim, degree
        self.coeffs = nn.Parameter(torch.empty(degree + 1))
        self.out_dim = sum(dim**i for i in range(degree + 1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.coeffs.copy_(torch.tensor([math.sqrt(1.0 / math.factorial(i)) for i in range(self.degree + 1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., 1 + d + ... + d^p)."""
        parts = [self.coeffs[0] * torch.ones_like(x[..., :1])]
        power = x
        for i in range(1, self.degree + 1):
            parts.append(self.coeffs[i] * power)
            if i < self.degree:
                power = (power[..., :, None] * x[..., None, :]).flatten(-2)
        return torch.cat(parts, dim=-1)
