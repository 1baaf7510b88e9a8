"""Chunked SSD against its sequential oracle: outputs, final states, documents, gradients.

fp64 cases must agree to 1e-6 (observed ~1e-15); fp32 to 1e-4 relative: the
chunked form sums the decays in a different order, so fp32 rounding differs by ~1e-6.
"""
import pytest
import torch

from hybrid_lm.kernels.ssd import segsum, ssd_chunked, ssd_sequential
from hybrid_lm.kernels.ssd.chunked import decay_transposed


def make_inputs(batch=2, length=50, heads=4, hdim=3, groups=1, dstate=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, hdim, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=g, dtype=dtype) - 1)
    A = -torch.rand(heads, generator=g, dtype=dtype) * 4 - 0.1
    B = torch.randn(batch, length, groups, dstate, generator=g, dtype=dtype)
    C = torch.randn(batch, length, groups, dstate, generator=g, dtype=dtype)
    D = torch.randn(heads, generator=g, dtype=dtype)
    s0 = torch.randn(batch, heads, hdim, dstate, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("groups", [1, 2], ids=["G1", "G2"])
@pytest.mark.parametrize("length,chunk", [(64, 16), (50, 16), (67, 64), (100, 256), (7, 4)],
                         ids=["L64-Q16", "L50-Q16", "L67-Q64", "L100-Q256", "L7-Q4"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
def test_chunked_equals_sequential_fp64(groups, length, chunk, with_state):
    x, dt, A, B, C, D, s0 = make_inputs(length=length, groups=groups)
    s0 = s0 if with_state else None
    y, s = ssd_chunked(x, dt, A, B, C, chunk, D=D, initial_state=s0, return_final_state=True)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D=D, initial_state=s0, return_final_state=True)
    assert y.shape == x.shape and s.shape == (2, 4, 3, 5)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-6)
    assert (y - y_ref).abs().max() < 1e-10


DOCS = {
    "mid-chunk": [[0] * 11 + [1] * 29, [0] * 40],
    "short-docs": [[0] * 2 + [1] * 1 + [2] * 37, [3] * 16 + [1] * 24],  # unsorted ids, on a chunk edge
    "many": [[i // 3 for i in range(40)], [0] * 39 + [1]],
}


@pytest.mark.parametrize("docs", list(DOCS.values()), ids=list(DOCS))
@pytest.mark.parametrize("chunk", [8, 16, 64], ids=["Q8", "Q16", "Q64"])
def test_chunked_documents_equal_sequential(docs, chunk):
    x, dt, A, B, C, D, s0 = make_inputs(length=40, groups=2)
    doc_ids = torch.tensor(docs)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, D=D, initial_state=s0, doc_ids=doc_ids, return_final_state=True)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D=D, initial_state=s0, doc_ids=doc_ids, return_final_state=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)


def test_documents_are_isolated_inside_the_kernel():
    """A packed row equals its documents run separately (the later one from a zero state)."""
    x, dt, A, B, C, D, s0 = make_inputs(batch=1, length=40)
    cut = 13
    doc_ids = torch.tensor([[0] * cut + [1] * (40 - cut)])
    y = ssd_chunked(x, dt, A, B, C, 16, D=D, initial_state=s0, doc_ids=doc_ids)
    first = ssd_chunked(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], 16, D=D, initial_state=s0)
    second = ssd_chunked(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], 16, D=D)
    torch.testing.assert_close(y, torch.cat([first, second], dim=1), rtol=0, atol=1e-12)


def test_chunked_fp32_close_to_fp64_oracle_and_chunk_invariant():
    x, dt, A, B, C, D, s0 = make_inputs(length=300, groups=2)
    y_ref = ssd_sequential(x, dt, A, B, C, D=D, initial_state=s0)
    args32 = [t.float() for t in (x, dt, A, B, C)]
    y16 = ssd_chunked(*args32, 16, D=D.float(), initial_state=s0.float())
    y256 = ssd_chunked(*args32, 256, D=D.float(), initial_state=s0.float())
    assert y16.dtype == torch.float32
    torch.testing.assert_close(y16.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y16, y256, rtol=1e-5, atol=1e-5)


def test_segsum_is_stable_and_masked():
    dA = -torch.rand(3, 64, dtype=torch.float32) * 50
    out = segsum(dA)
    exact = torch.cumsum(dA.double(), -1)
    expected = exact[:, :, None] - exact[:, None, :]
    lower = torch.ones(64, 64, dtype=torch.bool).tril()
    assert torch.isneginf(out[:, ~lower]).all()
    torch.testing.assert_close(out[:, lower].double(), expected[:, lower], rtol=1e-5, atol=1e-3)
    assert (out.diagonal(dim1=-2, dim2=-1) == 0).all()



def test_decay_transposed_fp32_keeps_segment_sums_after_a_large_prefix():
    # A huge first decay makes every later prefix sum ~ -1e4, where fp32 spacing is ~1e-3: plain
    # prefix differences would be off by ~5e-4 in the exponent; the fp32 path subtracts fp64
    # prefix sums split into hi + lo parts, so only the segment's own rounding remains.
    g = torch.Generator().manual_seed(0)
    dA = -torch.rand(3, 64, generator=g, dtype=torch.float64) * 0.05
    dA[:, 0] = -1e4
    later = torch.ones(64, 64, dtype=torch.float64).triu(1)
    exact = (dA[:, None, :] * later).cumsum(-1).exp()  # [s, l], the masked cumsum in fp64
    out = decay_transposed(dA.float())
    causal = torch.ones(64, 64, dtype=torch.bool).triu()  # s <= l
    assert (out[:, ~causal] == 1).all()
    torch.testing.assert_close(out[:, causal].double(), exact[:, causal], rtol=1e-6, atol=1e-28)
    torch.testing.assert_close(decay_transposed(dA)[:, causal], exact[:, causal], rtol=1e-13, atol=0)


def test_reference_gradcheck():
    x, dt, A, B, C, D, s0 = make_inputs(batch=1, length=5, heads=2, hdim=2, groups=1, dstate=2)
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    doc_ids = torch.tensor([[0, 0, 1, 1, 1]])

    def fn(x, dt, A, B, C, D, s0):
        return ssd_sequential(x, dt, A, B, C, D=D, initial_state=s0, doc_ids=doc_ids, return_final_state=True)

    assert torch.autograd.gradcheck(fn, inputs)


def test_chunked_gradients_match_reference():
    x, dt, A, B, C, D, s0 = make_inputs(length=37, groups=2)
    doc_ids = torch.tensor([[0] * 20 + [1] * 17, [0] * 37])
    grads = []
    for fn in (lambda *a: ssd_chunked(*a[:5], 8, D=a[5], initial_state=a[6], doc_ids=doc_ids),
               lambda *a: ssd_sequential(*a[:5], D=a[5], initial_state=a[6], doc_ids=doc_ids)):
        inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
        (fn(*inputs) * torch.linspace(-1, 1, 37, dtype=torch.float64)[None, :, None, None]).sum().backward()
        grads.append([t.grad for t in inputs])
    for g_chunk, g_ref in zip(*grads):
        torch.testing.assert_close(g_chunk, g_ref, rtol=1e-9, atol=1e-9)


def test_chunked_gradcheck_against_finite_differences():
    """The chunked kernel's hand-written backward against central differences, through the output
    and the final state, with documents and a carried state. torch's gradcheck cannot run here:
    the backward reuses a saved buffer in place, so the graph allows one backward, and gradcheck
    takes several from one forward. A random cotangent per call makes the scalar check cover
    every output element."""
    x, dt, A, B, C, D, s0 = make_inputs(batch=1, length=7, heads=2, hdim=2, groups=1, dstate=2)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    g = torch.Generator().manual_seed(1)
    w_y, w_s = torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randn(s0.shape, generator=g, dtype=x.dtype)

    def loss(x, dt, A, B, C, D, s0):
        y, s = ssd_chunked(x, dt, A, B, C, 3, D=D, initial_state=s0, doc_ids=doc_ids, return_final_state=True)
        return (y * w_y).sum() + (s * w_s).sum()

    base = [x, dt, A, B, C, D, s0]
    inputs = [t.clone().requires_grad_() for t in base]
    loss(*inputs).backward()
    eps = 1e-6
    for i, t in enumerate(base):
        numeric = torch.empty_like(t)
        for j in range(t.numel()):
            shifted = []
            for sign in (1, -1):
                args = [u.clone() for u in base]
                args[i].view(-1)[j] += sign * eps
                shifted.append(loss(*args))
            numeric.view(-1)[j] = (shifted[0] - shifted[1]) / (2 * eps)
        torch.testing.assert_close(inputs[i].grad, numeric, rtol=1e-6, atol=1e-7)
