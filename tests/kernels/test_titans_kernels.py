"""Chunked Titans memory update against the token-by-token oracle, gate edge cases, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_lm.kernels.atlas.newton_schulz import newton_schulz
from hybrid_lm.kernels.titans.chunked import _closed_form, _materialised, chunked_memory_update
from hybrid_lm.kernels.titans.memory_mlp import memory_dims, memory_forward, memory_grads
from hybrid_lm.kernels.titans.reference import sequential_memory_update

DT = torch.float64


def make_inputs(n=3, length=13, c=1, d=6, depth=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = memory_dims(d, d, depth, 2)
    w = [torch.randn(n, *s, generator=g, dtype=DT) * 0.3 for s in dims]
    s = [torch.randn(x.shape, generator=g, dtype=DT) * 0.01 for x in w]
    k = F.normalize(torch.randn(n, length, c, d, generator=g, dtype=DT), dim=-1)
    v = torch.randn(n, length, c, d, generator=g, dtype=DT)
    gamma = torch.rand(n, length, c, generator=g, dtype=DT)
    q = F.normalize(torch.randn(n, length, d, generator=g, dtype=DT), dim=-1)
    theta = torch.rand(n, length, generator=g, dtype=DT) * 0.2
    eta = torch.rand(n, length, generator=g, dtype=DT)
    alpha = torch.rand(n, length, generator=g, dtype=DT) * 0.2
    valid = torch.ones(n, length, dtype=torch.bool)
    return w, s, k, v, gamma, q, theta, eta, alpha, valid


@pytest.mark.parametrize("depth", [1, 2], ids=["depth1", "depth2"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 16], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("length", [13, 37], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("clamp", [None, 0.05], ids=["noclamp", "clamp"])
def test_chunked_equals_sequential(depth: int, chunk: int, length: int, clamp: float | None) -> None:
    w, s, k, v, gamma, q, th, et, al, valid = make_inputs(length=length, depth=depth)
    for residual in (False, True):
        y1, w1, s1, _ = chunked_memory_update(w, s, w, k, v, gamma, q, th, et, al, valid, chunk, residual=residual,
                                              max_grad_norm=clamp)
        y2, w2, s2, _ = sequential_memory_update(w, s, w, k, v, gamma, q, th, et, al, valid, chunk, residual=residual,
                                                 max_grad_norm=clamp)
        torch.testing.assert_close(y1, y2, atol=1e-10, rtol=1e-10)
        for a, b in zip(w1 + s1, w2 + s2):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("bias", ["l2", "dot"])
def test_analytic_grads_match_torch_func(bias: str) -> None:
    w, _, k, v, gamma, *_ = make_inputs(n=2, length=5, c=3, depth=3)

    def loss(ws, kk, vv, gg):
        out = memory_forward(ws, kk, residual=True)
        per = ((out - vv) ** 2).sum(-1) if bias == "l2" else -(out * vv).sum(-1)
        return (gg * per).sum()

    got = memory_grads(w, k, v, gamma, residual=True, bias=bias)
    clamped = memory_grads(w, k, v, gamma, residual=True, bias=bias, max_grad_norm=0.5)
    for a, b in zip(got, clamped):  # the clamp rescales each token's gradient to norm 0.5 tanh(|g| / 0.5)
        norm = a.flatten(-2).norm(dim=-1)
        torch.testing.assert_close(b.flatten(-2).norm(dim=-1), 0.5 * torch.tanh(norm / 0.5), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(b, a * (b.flatten(-2).norm(dim=-1) / norm)[..., None, None], atol=1e-12, rtol=1e-12)
    for i in range(2):
        for t in range(5):
            ref = torch.func.grad(loss)([x[i] for x in w], k[i, t], v[i, t], gamma[i, t])
            for a, b in zip(got, ref):
                torch.testing.assert_close(a[i, t], b, atol=1e-10, rtol=1e-10)


def test_linear_memory_is_gated_delta_rule() -> None:
    """Depth 1, eta = 0, b = 1: W_t = (1 - a_t) W_{t-1} - 2 theta_t (W_{t-1} k_t - v_t) k_t^T."""
    w, s, k, v, gamma, q, th, _, al, valid = make_inputs(depth=1)
    eta = torch.zeros_like(th)
    y, w_end, *_ = chunked_memory_update(w, [torch.zeros_like(x) for x in s], w, k, v, torch.ones_like(gamma), q, th, eta, al, valid, 1, residual=False)
    m = w[0].clone()
    for t in range(th.size(1)):
        err = m @ k[:, t, 0, :, None] - v[:, t, 0, :, None]
        m = (1 - al[:, t, None, None]) * m - 2 * th[:, t, None, None] * err @ k[:, t, 0, None, :]
        torch.testing.assert_close(y[:, t], (m @ q[:, t, :, None])[..., 0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w_end[0], m, atol=1e-12, rtol=1e-12)


OPTIMIZERS = pytest.mark.parametrize("ns_steps", [0, 5], ids=["momentum", "muon"])


def _grads_at(anchor: list[torch.Tensor], k, v, gamma, t: int, residual: bool) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """Token t's inner gradient u_t (per layer, (N, out, in)) at the given weights."""
    return [g[:, 0] for g in memory_grads(anchor, k[:, t : t + 1], v[:, t : t + 1], gamma[:, t : t + 1], residual)]


@OPTIMIZERS
@pytest.mark.parametrize("chunk", [1, 4], ids=lambda b: f"b{b}")
def test_zero_learning_rate_never_changes_memory(chunk: int, ns_steps: int) -> None:
    """theta = 0, alpha = 0, S_0 = 0: W never moves (bit for bit) and every read is M_{W_0}(q)."""
    w, s, k, v, gamma, q, th, et, al, valid = make_inputs()
    zero_s = [torch.zeros_like(x) for x in s]
    y, w_end, s_end, _ = chunked_memory_update(w, zero_s, w, k, v, gamma, q, torch.zeros_like(th), et, torch.zeros_like(al), valid, chunk, residual=True, ns_steps=ns_steps)
    for a, b in zip(w_end, w):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(y, memory_forward(w, q, residual=True), atol=1e-12, rtol=1e-12)
    if ns_steps:  # Muon's step size sits outside NS: the momentum still gathers the gradients
        assert all(x.abs().max() > 1e-3 for x in s_end)
    else:
        assert all(x.abs().max() == 0 for x in s_end)


@OPTIMIZERS
@pytest.mark.parametrize("decay", [False, True], ids=["alpha0", "alpha"])
@pytest.mark.parametrize("chunk", [1, 4], ids=lambda b: f"b{b}")
def test_zero_learning_rate_with_incoming_momentum(chunk: int, decay: bool, ns_steps: int) -> None:
    """theta = 0 with a nonzero carried momentum S_0 and random eta (and alpha), per the update rules.

    Plain momentum (Titans: S_t = eta S_{t-1} - theta g, W_t = (1 - alpha) W_{t-1} + S_t): the
    gradients never enter, but the carried momentum keeps moving W: S_t = eta_t S_{t-1},
    W_t = (1 - alpha_t) W_{t-1} + S_t. Muon (ATLAS: W_t = (1 - alpha) W_{t-1} + theta NS(S_t)):
    W only decays, W_t = (1 - alpha_t) W_{t-1} (never changes when alpha = 0), while the momentum
    keeps gathering gradients at the chunk-start weights, S_t = eta_t S_{t-1} - u_t.
    """
    w, s, k, v, gamma, q, th, et, al, valid = make_inputs(length=11)
    s = [x * 5.0 for x in s]  # carried momentum well above rounding
    alpha = al if decay else torch.zeros_like(al)
    y, w_end, s_end, _ = chunked_memory_update(w, s, w, k, v, gamma, q, torch.zeros_like(th), et, alpha, valid, chunk, residual=True, ns_steps=ns_steps)
    wt, st, anchor = list(w), list(s), list(w)
    for t in range(th.size(1)):
        if t % chunk == 0:
            anchor = list(wt)
        a, e = alpha[:, t, None, None], et[:, t, None, None]
        if ns_steps:
            u = _grads_at(anchor, k, v, gamma, t, residual=True)
            st = [e * x - g for x, g in zip(st, u)]
            wt = [(1 - a) * x for x in wt]
        else:
            st = [e * x for x in st]
            wt = [(1 - a) * x + m for x, m in zip(wt, st)]
        torch.testing.assert_close(y[:, t], memory_forward(wt, q[:, t, None], residual=True)[:, 0], atol=1e-12, rtol=1e-12)
    for a, b in zip(w_end + s_end, wt + st):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    moved = max((a - b).abs().max().item() for a, b in zip(w_end, w))
    if ns_steps and not decay:
        assert moved == 0.0  # bit for bit, whatever the momentum
    else:
        assert moved > 1e-3


@OPTIMIZERS
@pytest.mark.parametrize("chunk", [1, 4], ids=lambda b: f"b{b}")
def test_full_decay_resets_every_token(chunk: int, ns_steps: int) -> None:
    """alpha = 1, eta = 0: nothing of W_{t-1} or S_{t-1} survives a token. Plain momentum
    W_t = S_t = -theta_t u_t; Muon S_t = -u_t, W_t = theta_t NS(-u_t); u_t taken at the weights
    the chunk started with. Checked per token (the reads y_t) and for the final state."""
    w, s, k, v, gamma, q, th, _, al, valid = make_inputs(length=8)
    for residual in (False, True):
        y, w_end, s_end, _ = chunked_memory_update(w, s, w, k, v, gamma, q, th, torch.zeros_like(th), torch.ones_like(al), valid, chunk, residual=residual, ns_steps=ns_steps)
        wt, anchor = list(w), list(w)
        for t in range(th.size(1)):
            if t % chunk == 0:
                anchor = list(wt)
            u = _grads_at(anchor, k, v, gamma, t, residual)
            lr = th[:, t, None, None]
            if ns_steps:
                st = [-g for g in u]
                wt = [lr * newton_schulz(x, ns_steps) for x in st]
            else:
                st = [-lr * g for g in u]
                wt = list(st)
            torch.testing.assert_close(y[:, t], memory_forward(wt, q[:, t, None], residual)[:, 0], atol=1e-12, rtol=1e-12)
        for a, b in zip(w_end + s_end, wt + st):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_padding_is_a_noop() -> None:
    w, s, k, v, gamma, q, th, et, al, valid = make_inputs(length=9)
    valid[:, 4:] = False
    _, w1, s1, _ = chunked_memory_update(w, s, w, k, v, gamma, q, th, et, al, valid, 4, residual=True)
    _, w2, s2, _ = chunked_memory_update(w, s, w, k[:, :4], v[:, :4], gamma[:, :4], q[:, :4], th[:, :4], et[:, :4], al[:, :4], valid[:, :4], 4, residual=True)
    for a, b in zip(w1 + s1, w2 + s2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_fp32_matches_fp64() -> None:
    w, s, k, v, gamma, q, th, et, al, valid = make_inputs(length=20)
    y64, *_ = chunked_memory_update(w, s, w, k, v, gamma, q, th, et, al, valid, 4, residual=True)
    f = lambda xs: [x.float() for x in xs]  # noqa: E731
    y32, *_ = chunked_memory_update(f(w), f(s), f(w), k.float(), v.float(), gamma.float(), q.float(), th.float(), et.float(), al.float(), valid, 4, residual=True)
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-5)


def _padded_case(depth: int, c: int, chunk: int, length: int, seed: int = 0) -> tuple:
    """Inputs with a carried anchor != w, a front-padded first chunk, padding inside a chunk,
    and (for chunk <= 4) a chunk of padding only in stream 1."""
    w, s, k, v, gamma, q, th, et, al, valid = make_inputs(length=length, c=c, depth=depth, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    anchor = [x + 0.05 * torch.randn(x.shape, generator=g, dtype=DT) for x in w]
    valid[0, :2] = False
    valid[1, 4:8] = False
    valid[2, length - 3 : length - 1] = False
    return (w, s, anchor, k, v, gamma, q, th, et, al, valid, chunk)


@pytest.mark.parametrize("depth", [1, 2, 3], ids=lambda d: f"depth{d}")
@pytest.mark.parametrize("chunk", [1, 4, 5, 16], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("window", [1, 3], ids=lambda c: f"c{c}")
@pytest.mark.parametrize("clamp", [None, 0.05], ids=["noclamp", "clamp"])
def test_closed_form_equals_materialised(depth: int, chunk: int, window: int, clamp: float | None) -> None:
    """The closed-form read (plain momentum) against b materialised weights per chunk, fp64, with
    and without the per-token gradient soft clamp (which forms no gradient in the closed form)."""
    args = _padded_case(depth, window, chunk, length=23)
    for residual in (False, True):
        for bias in ("l2", "dot"):
            y1, w1, s1, a1 = _closed_form(*args, residual=residual, bias=bias, max_grad_norm=clamp)
            y2, w2, s2, a2 = _materialised(*args, residual=residual, bias=bias, max_grad_norm=clamp)
            if clamp is not None:  # the clamp must be active here, or the case proves nothing
                y0 = _materialised(*args, residual=residual, bias=bias)[0]
                assert (y0 - y2).abs().max() > 1e-3
            torch.testing.assert_close(y1, y2, atol=1e-12, rtol=1e-12)
            assert len(a1) == len(a2) == -(-23 // chunk)
            for x, z in zip(w1 + s1 + sum(a1, []), w2 + s2 + sum(a2, [])):
                torch.testing.assert_close(x, z, atol=1e-12, rtol=1e-12)


def test_closed_form_padding_chunk_keeps_anchor() -> None:
    """A chunk of padding only in one stream leaves that stream's anchor as it was carried."""
    args = list(_padded_case(2, 1, 4, length=12))
    valid = args[10]
    valid[1] = True
    valid[1, :4] = False  # stream 1: first chunk padding only (front alignment of a carried chunk)
    _, _, _, anchors = chunked_memory_update(*args, residual=True)
    _, _, _, ref = _materialised(*args, residual=True)
    for l, a0 in enumerate(args[2]):
        torch.testing.assert_close(anchors[1][l][1], a0[1], atol=0, rtol=0)
        assert not torch.allclose(anchors[1][l][0], a0[0])
        for got, want in zip(anchors, ref):
            torch.testing.assert_close(got[l], want[l], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("clamp", [None, 0.05], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("bias", ["l2", "dot"])
def test_closed_form_gradients_equal_materialised(bias: str, clamp: float | None) -> None:
    """Backprop through the closed form gives the materialised path's gradients for every input."""
    base = _padded_case(2, 2, 4, length=11)

    def grads(fn) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
        leaves = [[x.clone().requires_grad_() for x in base[i]] for i in range(3)]
        tensors = [x.clone().requires_grad_() for x in base[3:10]]
        y, w_end, s_end, anchors = fn(*leaves, *tensors, base[10], base[11], residual=True, bias=bias,
                                      max_grad_norm=clamp)
        loss = (y ** 2).sum() + sum((x ** 2).sum() for x in w_end + s_end + anchors[-1])
        inputs = sum(leaves, []) + tensors
        return torch.autograd.grad(loss, inputs)

    for a, b in zip(grads(_closed_form), grads(_materialised)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
