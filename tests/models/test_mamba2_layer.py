"""Mamba-2 layer properties: two halves, decode == prefill, document isolation, init."""

import pytest
import torch

from hybrid_lm.models.mamba2 import GatedRMSNorm, Mamba2


def make_layer(ngroups=1, chunk=8, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = Mamba2(16, d_state=8, d_conv=4, headdim=8, ngroups=ngroups, chunk_size=chunk, backend="torch")
    with torch.no_grad():  # larger than init so the conv and gate matter
        layer.in_proj.weight.normal_(0, 0.3)
        layer.out_proj.weight.normal_(0, 0.3)
    return layer.to(dtype)


@pytest.mark.parametrize("split", [1, 3, 13, 16], ids=["s1", "s3-lt-dconv", "s13-mid-chunk", "s16-chunk-edge"])
@pytest.mark.parametrize("ngroups", [1, 2], ids=["G1", "G2"])
def test_two_halves_equal_one_pass(split, ngroups):
    layer = make_layer(ngroups)
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    y, state = layer(x, return_state=True)
    y1, s = layer(x[:, :split], return_state=True)
    y2, s2 = layer(x[:, split:], state=s, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(s2["ssm"], state["ssm"], rtol=0, atol=1e-10)
    torch.testing.assert_close(s2["conv"], state["conv"], rtol=0, atol=1e-12)


def test_two_halves_gradients_match_fp32():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(1, 40, 16)
    w = torch.randn(1, 40, 16)
    xa = x.clone().requires_grad_()
    (layer(xa)[0] * w).sum().backward()
    xb = x.clone().requires_grad_()
    y1, s = layer(xb[:, :17], return_state=True)
    y2, _ = layer(xb[:, 17:], state=s)
    (torch.cat([y1, y2], 1) * w).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefill", [0, 5], ids=["from-empty", "after-prefill"])
def test_step_equals_forward(prefill):
    layer = make_layer(ngroups=2)
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    y, _ = layer(x)
    if prefill:
        ys, state = layer(x[:, :prefill], return_state=True)
        outs = [ys]
    else:
        state, outs = layer.init_state(2, device=x.device, dtype=x.dtype), []
    for t in range(prefill, 21):
        yt, state = layer.step(x[:, t], state)
        outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cut", [2, 11, 16], ids=["doc-shorter-than-dconv", "mid-chunk", "chunk-edge"])
def test_packed_documents_equal_separate_runs(cut):
    layer = make_layer(ngroups=2)
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    doc_ids = torch.tensor([[7] * cut + [3] * (30 - cut)])
    y, state = layer(x, doc_ids=doc_ids, return_state=True)
    ya, _ = layer(x[:, :cut])
    yb, sb = layer(x[:, cut:], return_state=True)
    torch.testing.assert_close(y, torch.cat([ya, yb], 1), rtol=0, atol=1e-10)
    # the final state belongs to the last document only
    torch.testing.assert_close(state["ssm"], sb["ssm"], rtol=0, atol=1e-10)
    torch.testing.assert_close(state["conv"], sb["conv"], rtol=0, atol=1e-12)


def test_carried_state_applies_to_first_document_only():
    layer = make_layer()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    _, s = layer(torch.randn(1, 9, 16, dtype=torch.float64), return_state=True)
    doc_ids = torch.tensor([[0] * 6 + [1] * 14])
    y, _ = layer(x, state=s, doc_ids=doc_ids)
    ya, _ = layer(x[:, :6], state=s)
    yb, _ = layer(x[:, 6:])
    torch.testing.assert_close(y, torch.cat([ya, yb], 1), rtol=0, atol=1e-10)


def test_init_follows_spec_and_marks_no_weight_decay():
    torch.manual_seed(0)
    layer = Mamba2(64, d_state=8, headdim=4, dt_min=0.001, dt_max=0.1)  # 32 heads
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    A = torch.exp(layer.A_log)
    assert A.min() >= 1 and A.max() <= 16 and A.std() > 1
    assert torch.equal(layer.D, torch.ones(32))
    for p in (layer.dt_bias, layer.A_log, layer.D):
        assert getattr(p, "_no_weight_decay", False)
    assert layer.out_proj.weight._is_residual_projection
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
                     "norm.weight", "out_proj.weight"}
    assert layer.in_proj.out_features == 2 * 128 + 2 * 8 + 32


@pytest.mark.parametrize("before", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_gated_rmsnorm_groups(before):
    norm = GatedRMSNorm(8, group_size=4, norm_before_gate=before)
    x, z = torch.randn(3, 8), torch.randn(3, 8)
    y = norm(x, z)
    gate = torch.nn.functional.silu(z)
    h = x if before else x * gate
    parts = [p / p.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() for p in h.split(4, dim=-1)]
    expected = torch.cat(parts, -1) * (gate if before else 1)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("ngroups", [1, 2], ids=["G1", "G2"])
def test_layer_matches_transformers_mixer(ngroups):
    """Our layer vs transformers' Mamba2Mixer with equal weights; since transformers 5.x its torch
    path groups the gated RMSNorm like mamba_ssm, so G = 2 agrees too (older releases did not)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    layer = make_layer(ngroups=ngroups, dtype=torch.float32)
    cfg = transformers.Mamba2Config(hidden_size=16, num_heads=layer.nheads, head_dim=8, state_size=8, n_groups=ngroups,
                                    chunk_size=8, expand=2, num_hidden_layers=1, layer_norm_epsilon=1e-5)
    hf = Mamba2Mixer(cfg, layer_idx=0).eval()
    hf.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 19, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], hf(x), rtol=1e-4, atol=1e-5)


def test_channels_last_conv_equals_conv1d():
    """The shifted multiply-add conv equals torch's depthwise conv1d with left padding."""
    from hybrid_lm.models.mamba2.conv import causal_conv

    torch.manual_seed(0)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    state = torch.randn(2, 6, 3, dtype=torch.float64)
    y, new_state = causal_conv(x, weight, bias, state)
    padded = torch.cat([state, x.transpose(1, 2)], dim=2)
    expected = torch.nn.functional.conv1d(padded, weight[:, None], bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(new_state, x.transpose(1, 2)[:, :, -3:], rtol=0, atol=0)


@pytest.mark.parametrize("length", [7, 2], ids=["L7", "L2-shorter-than-taps"])
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "two-docs"])
def test_conv_gradcheck(length, docs):
    """The conv's hand-written backward (x, taps, bias, carried state) against finite differences."""
    from hybrid_lm.models.mamba2.conv import causal_conv

    torch.manual_seed(0)
    x = torch.randn(2, length, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    doc_ids = torch.tensor([[0] * length, [0] + [1] * (length - 1)]) if docs else None
    assert torch.autograd.gradcheck(lambda *a: causal_conv(*a, doc_ids)[0], (x, weight, bias, state))
