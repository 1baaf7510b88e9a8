"""Polynomial feature map of keys/queries (ATLAS paper): more keys per memory dimension.

Learnable coefficients ``c_i`` on the degree-i blocks, initialised to ``c_i = sqrt(1/i!)`` so that
``phi(q) . phi(k) = sum_i c_i^2 (q . k)^i`` starts as the degree-p Taylor series of ``exp(q . k)``.
Two layouts of the degree-i block, both with that same kernel:

* ``"tensor"``: the self-tensor power ``x^(x)i`` (the paper's form), dimension ``d^i``; the
  whole map has ``1 + d + ... + d^p`` features.
* ``"monomial"``: each distinct monomial once, scaled by the square root of its multinomial
  coefficient (e.g. ``sqrt(2) x_a x_b`` for a < b), dimension ``C(d+i-1, i)``; the whole map has
  ``C(d+p, p)`` features, about ``1/p!`` of the tensor form for large d. The tensor form only
  repeats these monomials, so a memory sees the same information at a fraction of the key size.

The coefficients are shared across heads (our choice; the paper does not say).
"""
from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from typing import Literal

import torch
from torch import nn

# spelled out in models/atlas/config.py too: the config layer stays free of torch
PolyForm = Literal["tensor", "monomial"]


def poly_feature_dim(dim: int, degree: int, form: PolyForm = "tensor") -> int:
    """Number of features of ``PolynomialFeatures(dim, degree, form)``."""
    if form == "tensor":
        return sum(dim**i for i in range(degree + 1))
    if form == "monomial":
        return math.comb(dim + degree, degree)
    raise ValueError(f"polynomial form must be 'tensor' or 'monomial', got {form!r}")


@functools.lru_cache(maxsize=None)
def monomial_table(dim: int, degree: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """Index tuples i1 <= ... <= i_degree of the distinct degree-``degree`` monomials, and each
    one's multinomial count: the number of orderings of its tuple, whose square root makes the
    monomial block's dot product that of the dim**degree-entry tensor power."""
    combos = list(itertools.combinations_with_replacement(range(dim), degree))
    mult = [math.factorial(degree) // math.prod(math.factorial(n) for n in Counter(t).values()) for t in combos]
    return combos, mult


class PolynomialFeatures(nn.Module):
    def __init__(self, dim: int, degree: int, form: PolyForm = "tensor") -> None:
        super().__init__()
        if degree < 1:
            raise ValueError(f"polynomial degree must be >= 1, got {degree}")
        self.dim, self.degree, self.form = dim, degree, form
        self.coeffs = nn.Parameter(torch.empty(degree + 1))
        self.out_dim = poly_feature_dim(dim, degree, form)
        # the monomial tables, per (degree, device), built on first use: derived from (dim, degree),
        # so checkpoints hold only coeffs; not buffers, because loaders that build the model on the
        # meta device (transformers) refill non-persistent buffers with uninitialised memory
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def _monomials(self, i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (n, i), mult (n,)) of the degree-``i`` monomials, on ``device``."""
        key = (i, device)
        if key not in self._tables:
            combos, mult = monomial_table(self.dim, i)
            # integers, so that the square root is taken in the input's precision
            self._tables[key] = (torch.tensor(combos, dtype=torch.long, device=device),
                                 torch.tensor(mult, dtype=torch.long, device=device))
        return self._tables[key]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.coeffs.copy_(torch.tensor([math.sqrt(1.0 / math.factorial(i)) for i in range(self.degree + 1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., out_dim)."""
        parts = [self.coeffs[0] * torch.ones_like(x[..., :1]), self.coeffs[1] * x]
        if self.form == "monomial":
            for i in range(2, self.degree + 1):
                index, mult = self._monomials(i, x.device)
                mono = x[..., index[:, 0]]
                for m in range(1, i):  # products of gathers: prod()'s backward divides by the factors
                    mono = mono * x[..., index[:, m]]
                parts.append(self.coeffs[i] * mult.to(x.dtype).sqrt() * mono)
            return torch.cat(parts, dim=-1)
        power = x
        for i in range(2, self.degree + 1):
            power = (power[..., :, None] * x[..., None, :]).flatten(-2)
            parts.append(self.coeffs[i] * power)
        return torch.cat(parts, dim=-1)
