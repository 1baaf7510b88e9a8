"""ATLAS pieces: Omega-rule + Muon chunked update vs the oracle, Newton-Schulz, polynomial map."""
from __future__ import annotations

import math

import pytest
import torch

from hybrid_lm.kernels.atlas.newton_schulz import newton_schulz
from hybrid_lm.kernels.titans.chunked import chunked_memory_update
from hybrid_lm.kernels.titans.memory_mlp import memory_dims
from hybrid_lm.kernels.titans.reference import sequential_memory_update
from hybrid_lm.models.titans.features import PolynomialFeatures, poly_feature_dim

from test_titans_kernels import make_inputs


@pytest.mark.parametrize("window", [1, 2, 4], ids=lambda c: f"c{c}")
@pytest.mark.parametrize("chunk", [1, 4, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("ns_steps", [0, 5], ids=["momentum", "muon"])
@pytest.mark.parametrize("bias", ["l2", "dot"])
def test_omega_chunked_equals_sequential(window: int, chunk: int, ns_steps: int, bias: str) -> None:
    w, s, k, v, gamma, q, th, et, al, valid = make_inputs(length=19, c=window)
    feats = PolynomialFeatures(6, 2).double()
    with torch.no_grad():
        k, q = feats(k), feats(q)

    g = torch.Generator().manual_seed(3)
    w = [torch.randn(3, *d, generator=g, dtype=torch.float64) * 0.1 for d in memory_dims(k.size(-1), 6, 2, 2)]
    s = [torch.zeros_like(x) for x in w]
    args = (w, s, w, k, v, gamma, q, th, et, al, valid, chunk)
    y1, w1, s1, _ = chunked_memory_update(*args, residual=False, ns_steps=ns_steps, bias=bias)
    y2, w2, s2, _ = sequential_memory_update(*args, residual=False, ns_steps=ns_steps, bias=bias)
    torch.testing.assert_close(y1, y2, atol=1e-10, rtol=1e-10)
    for a, b in zip(w1 + s1, w2 + s2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_omega_window_sums_window_gradients() -> None:
    """c = 2 with gamma = (0, 1) on every window equals c = 1 on the current token."""
    w, s, k, v, gamma, q, th, et, al, valid = make_inputs(length=11, c=2)
    gamma = torch.zeros_like(gamma)
    gamma[..., 1] = 1.0
    y2, w2, *_ = chunked_memory_update(w, s, w, k, v, gamma, q, th, et, al, valid, 4, residual=True)
    y1, w1, *_ = chunked_memory_update(w, s, w, k[:, :, 1:], v[:, :, 1:], gamma[:, :, 1:], q, th, et, al, valid, 4, residual=True)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(8, 8), (16, 40), (64, 24)], ids=str)
def test_newton_schulz_orthogonalises(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    m, n = shape
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    sv = torch.linspace(1.0, 10.0, r, dtype=torch.float64)  # condition number 10
    s = u @ torch.diag(sv) @ v.T
    out = newton_schulz(s, 5)
    core = u.T @ out @ v
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-6
    d = torch.diagonal(core)
    assert d.min() > 0.6 and d.max() < 1.25, d
    torch.testing.assert_close(newton_schulz(-s, 5), -out)


def test_polynomial_map_kernel_identity() -> None:
    feats = PolynomialFeatures(5, 2).double()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert feats.out_dim == 1 + 5 + 25
    dot = (q * k).sum(-1)
    expected = 1.0 + dot + dot**2 / 2.0
    torch.testing.assert_close((feats(q) * feats(k)).sum(-1), expected, atol=1e-6, rtol=1e-6)  # coefficients initialised in fp32


@pytest.mark.parametrize("degree", [2, 3])
def test_polynomial_monomial_form_same_kernel(degree: int) -> None:
    """The monomial layout has the tensor form's kernel sum_i c_i^2 (q.k)^i with
    C(d+p, p) features instead of 1 + d + ... + d^p, also for learned (non-Taylor) coefficients."""
    d = 5
    tensor, mono = PolynomialFeatures(d, degree).double(), PolynomialFeatures(d, degree, "monomial").double()
    with torch.no_grad():
        coeffs = torch.tensor([0.7, -1.3, 0.4, 2.1][: degree + 1], dtype=torch.float64)
        tensor.coeffs.copy_(coeffs)
        mono.coeffs.copy_(coeffs)
    assert mono.out_dim == math.comb(d + degree, degree) == poly_feature_dim(d, degree, "monomial")
    assert tensor.out_dim == sum(d**i for i in range(degree + 1)) == poly_feature_dim(d, degree)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 7, d, generator=g, dtype=torch.float64).unbind(0)
    dot = (q * k).sum(-1)
    expected = sum(coeffs[i] ** 2 * dot**i for i in range(degree + 1))
    torch.testing.assert_close((mono(q) * mono(k)).sum(-1), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close((tensor(q) * tensor(k)).sum(-1), expected, atol=1e-12, rtol=1e-12)
    assert len(mono.state_dict()) == 1  # only the coefficients; the index tables are derived
    assert torch.autograd.gradcheck(mono, (q[:2].clone().requires_grad_(),))
