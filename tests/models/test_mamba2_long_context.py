"""Stuffed Mamba's state-collapse mitigations (kernels/ssd/README.md, Long context): on Mamba-2,
multiplier neutrality, forgetting, chunked == decode with a knob on, state normalisation and the
windowed state's identity; the memory letters' retention multiplier."""

import pytest
import torch

from hybrid_lm.kernels.ssd.chunked import ssd_chunked
from hybrid_lm.kernels.ssd.reference import ssd_sequential
from hybrid_lm.models.config import Mamba2Config, ModelConfig
from hybrid_lm.models.mamba2 import Mamba2

KNOBS = {"dt_mult": 1.7, "a_mult": 2.0, "decay_mult": 0.9, "b_mult": 0.5}


def make_layer(dtype=torch.float64, chunk=8, **knobs):
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, d_conv=4, headdim=8, ngroups=2, chunk_size=chunk, backend="torch", **knobs)
    with torch.no_grad():
        layer.in_proj.weight.normal_(0, 0.3)
        layer.out_proj.weight.normal_(0, 0.3)
    return layer.to(dtype)


def decode(layer, x, state=None):
    """Step token by token from ``state`` (the layer's empty state when None): (outputs, state)."""
    if state is None:
        state = layer.init_state(x.size(0), device=x.device, dtype=x.dtype)
    outs = []
    for t in range(x.size(1)):
        y, state = layer.step(x[:, t], state)
        outs.append(y[:, None])
    return torch.cat(outs, 1), state


def test_neutral_multipliers_are_bitwise_the_plain_layer():
    x = torch.randn(2, 21, 16, dtype=torch.float32)
    plain = make_layer(torch.float32)
    neutral = make_layer(torch.float32, dt_mult=1.0, a_mult=1.0, decay_mult=1.0, b_mult=1.0)
    y0, s0 = plain(x, return_state=True)
    y1, s1 = neutral(x, return_state=True)
    assert torch.equal(y0, y1) and torch.equal(s0["ssm"], s1["ssm"])
    assert torch.equal(decode(plain, x[:, :5])[0], decode(neutral, x[:, :5])[0])
    # and a knob away from 1 does change the output (the knobs are wired in at all)
    for name, value in KNOBS.items():
        assert not torch.allclose(make_layer(torch.float32, **{name: value})(x)[0], y0), name


@pytest.mark.parametrize("knob", [*KNOBS, "state_norm_max"])
def test_chunked_equals_decode_with_knob_on(knob):
    value = KNOBS.get(knob, 0.05)
    # state normalisation acts at chunk boundaries in the forward, after every token in decode:
    # the two agree exactly when every token is a chunk (chunk_size 1)
    layer = make_layer(chunk=1 if knob == "state_norm_max" else 8, **{knob: value})
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    y, state = layer(x, return_state=True)
    yd, sd = decode(layer, x)
    torch.testing.assert_close(yd, y, rtol=0, atol=1e-10)
    torch.testing.assert_close(sd["ssm"], state["ssm"], rtol=0, atol=1e-10)


def test_decay_mult_below_one_lowers_state_norm_on_constant_input():
    x = torch.ones(1, 64, 16, dtype=torch.float64) * 0.5
    norms = []
    for mult in (1.0, 0.95, 0.8):
        _, s = make_layer(decay_mult=mult)(x, return_state=True)
        norms.append(float(s["ssm"].detach().norm()))
    assert norms[0] > norms[1] > norms[2] > 0


def test_state_norm_bounds_every_head_and_reports_alike():
    tau = 0.05
    layer = make_layer(state_norm_max=tau)
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    _, s = layer(x, return_state=True)
    per_head = s["ssm"].flatten(2).norm(dim=-1)  # (B, H)
    assert per_head.max() <= tau * (1 + 1e-12)
    _, s_free = make_layer()(x, return_state=True)
    assert s_free["ssm"].flatten(2).norm(dim=-1).max() > tau  # the bound was binding


def _ssd_inputs(length, heads=4, groups=2, hdim=3, dstate=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    x = torch.randn(2, length, heads, hdim, generator=g, dtype=d)
    dt = torch.rand(2, length, heads, generator=g, dtype=d) * 0.5 + 0.05
    A = -torch.rand(heads, generator=g, dtype=d) * 0.5 - 0.05
    B = torch.randn(2, length, groups, dstate, generator=g, dtype=d)
    C = torch.randn(2, length, groups, dstate, generator=g, dtype=d)
    return x, dt, A, B, C


@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("with_s0", [False, True], ids=["zero-s0", "s0"])
def test_windowed_state_identity_fp64(docs, with_s0):
    """S_t - (prod a) S_{t-r} is the state of the recurrence restarted at t-r+1: the windowed scan's
    output at t equals a fresh scan over the last r tokens (plus the initial state while it is
    inside the window)."""
    length, r = 29, 7
    x, dt, A, B, C = _ssd_inputs(length)
    D = torch.rand(4, dtype=torch.float64)
    s0 = torch.randn(2, 4, 3, 5, dtype=torch.float64) if with_s0 else None
    doc_ids = None
    if docs:
        doc_ids = torch.zeros(2, length, dtype=torch.long)
        doc_ids[0, 12:] = 1
        doc_ids[1, 20:] = 1
    y = ssd_chunked(x, dt, A, B, C, 4, D=D, initial_state=s0, doc_ids=doc_ids, window=r)
    for t in range(length):
        lo = max(0, t - r + 1)
        init = s0 if t - r + 1 <= -1 else None  # the initial state counts as written at position -1
        ids = None if doc_ids is None else doc_ids[:, lo:t + 1]
        ref = ssd_sequential(x[:, lo:t + 1], dt[:, lo:t + 1], A, B[:, lo:t + 1], C[:, lo:t + 1], D=D,
                             initial_state=init, doc_ids=ids)
        torch.testing.assert_close(y[:, t], ref[:, -1], rtol=0, atol=1e-10, msg=f"t={t}")


def test_window_longer_than_sequence_is_the_plain_scan():
    x, dt, A, B, C = _ssd_inputs(13)
    assert torch.equal(ssd_chunked(x, dt, A, B, C, 4, window=14), ssd_chunked(x, dt, A, B, C, 4))


def test_config_refuses_bad_knobs():
    with pytest.raises(ValueError, match=r"mamba2\.decay_mult: must be in \(0, 1\], got 1.5"):
        ModelConfig(layer_pattern="M-", mamba2=Mamba2Config(decay_mult=1.5))
    with pytest.raises(ValueError, match=r"mamba2\.state_window: cannot be combined"):
        ModelConfig(layer_pattern="M-", mamba2=Mamba2Config(state_window=8, state_norm_max=1.0))


def test_layer_window_matches_kernel():
    layer = make_layer(state_window=6)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    y = layer(x)[0]
    assert not torch.allclose(y[:, 6:], make_layer()(x)[0][:, 6:])
    torch.testing.assert_close(y[:, :5], make_layer()(x)[0][:, :5], rtol=0, atol=1e-12)  # window not yet full


@pytest.mark.parametrize("r", [1, 4, 19, 30])
@pytest.mark.parametrize("knobs", [{}, {"decay_mult": 0.9, "b_mult": 0.5}], ids=["plain", "knobs"])
def test_window_decode_equals_forward(r, knobs):
    """Windowed decode (a ring of the last r tokens' write factors, Mamba2._window_step) reproduces the
    windowed forward: from zero, after a prefill of k tokens (k below, at and above r), from an
    initial state (written at -1, as the forward counts it), and after a prefill whose rows start a
    new document inside it. r = 30 exceeds the sequence: the plain scan."""
    layer = make_layer(state_window=r, **knobs)
    x = torch.randn(2, 19, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
    y, state = layer(x, return_state=True)
    yd, sd = decode(layer, x)
    torch.testing.assert_close(yd, y, rtol=0, atol=1e-10)
    torch.testing.assert_close(sd["ssm"], state["ssm"], rtol=0, atol=1e-10)
    for k in (1, 3, 4, 5, 12):
        yp, sp = layer(x[:, :k], return_state=True)
        torch.testing.assert_close(torch.cat([yp, decode(layer, x[:, k:], sp)[0]], 1), y, rtol=0, atol=1e-10,
                                   msg=lambda m: f"prefill {k}: {m}")
    s0 = layer.init_state(2, device=x.device, dtype=x.dtype)
    s0["ssm"] = torch.randn(s0["ssm"].shape, dtype=x.dtype, generator=torch.Generator().manual_seed(9))
    y0 = layer(x, state={"conv": s0["conv"], "ssm": s0["ssm"]})[0]
    # a state without the window keys (noise, a training carry) is read as written at -1 too
    torch.testing.assert_close(decode(layer, x, {"conv": s0["conv"], "ssm": s0["ssm"]})[0], y0, rtol=0, atol=1e-10)
    docs = torch.zeros(2, 19, dtype=torch.long)
    docs[0, 7:], docs[1, 10:] = 1, 1
    yfull = layer(x, doc_ids=docs)[0]
    for k in (11, 13, 17):  # each row's last document began 1-10 tokens before the prefill's end
        yp, sp = layer(x[:, :k], doc_ids=docs[:, :k], return_state=True)
        torch.testing.assert_close(torch.cat([yp, decode(layer, x[:, k:], sp)[0]], 1), yfull, rtol=0, atol=1e-10,
                                   msg=lambda m: f"documents, prefill {k}: {m}")


@pytest.mark.parametrize("r", [1, 2, 5, 8])
def test_window_forward_from_a_carried_state_equals_one_forward(r):
    """The layer contract with a window: forwards in segments, each from the previous one's state
    (segments shorter than, as long as and longer than r; documents starting inside segments),
    and forwards mixed with steps equal one forward. The ring a state carries is read where
    S_{t-r} came before the call (Mamba2._ring_correction), and a short segment keeps the older
    ring slots (Mamba2._prefill_window)."""
    layer = make_layer(state_window=r, decay_mult=0.9, b_mult=0.5)
    x = torch.randn(2, 23, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + r))
    docs = torch.zeros(2, 23, dtype=torch.long)
    docs[0, 10:], docs[1, 17:] = 1, 1  # no cut below falls on a boundary (a state continues the first document)
    yfull = layer(x, doc_ids=docs)[0]
    for cuts in ((3, 4, 6, 12, 13, 21, 23), (2, 11, 23), (1, 2, 3, 5, 8, 9, 14, 16, 20, 23)):
        state, outs, prev = None, [], 0
        for cut in cuts:
            y, state = layer(x[:, prev:cut], state=state, doc_ids=docs[:, prev:cut], return_state=True)
            outs.append(y)
            prev = cut
        torch.testing.assert_close(torch.cat(outs, 1), yfull, rtol=0, atol=1e-10, msg=lambda m: f"cuts {cuts}: {m}")
    y = layer(x)[0]
    y_head, state = layer(x[:, :3], return_state=True)
    y_steps, state = decode(layer, x[:, 3:7], state)
    y_mid, state = layer(x[:, 7:9], state=state, return_state=True)
    y_steps2, state = decode(layer, x[:, 9:12], state)
    y_tail = layer(x[:, 12:], state=state)[0]
    torch.testing.assert_close(torch.cat([y_head, y_steps, y_mid, y_steps2, y_tail], 1), y, rtol=0, atol=1e-10)


def test_windowed_hybrid_generates_like_forward_greedy():
    from hybrid_lm.models.hybrid import HybridLM

    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, d_model=32, layer_pattern="M-A-",
                                 mamba2=Mamba2Config(d_state=8, headdim=16, chunk_size=8, state_window=4))).eval()
    prompt = torch.randint(64, (2, 6))
    out = model.generate(prompt, max_new_tokens=8)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def _memory(retention=1.0, letter="T"):
    cfg = ModelConfig(d_model=16, layer_pattern=f"{letter}-", vocab_size=23)
    cfg.titans.n_heads, cfg.titans.chunk_size, cfg.titans.memory_expansion = 2, 2, 2
    cfg.titans.retention_mult = retention
    torch.manual_seed(0)
    from hybrid_lm.models.common.registry import get_layer_spec

    return get_layer_spec(letter).build(cfg, 0).double()


def test_titans_retention_mult_neutral_bitwise_forgets_and_decodes_alike():
    x = torch.randn(2, 9, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y0, s0 = _memory()(x, return_state=True)
    y1, s1 = _memory(1.0)(x, return_state=True)
    assert torch.equal(y0, y1) and all(torch.equal(s0[k], s1[k]) for k in s0)
    layer = _memory(0.8)
    y, state = layer(x, return_state=True)
    assert not torch.allclose(y, y0)
    st, outs = layer.init_state(2, device=x.device, dtype=x.dtype), []
    for t in range(x.size(1)):
        yt, st = layer.step(x[:, t], st)
        outs.append(yt)
    torch.testing.assert_close(torch.stack(outs, 1), y, rtol=1e-10, atol=1e-10)
    # stronger forgetting pulls the memory weights towards zero on a constant input
    const = torch.full((1, 32, 16), 0.3, dtype=torch.float64)
    weights = [k for k in s0 if k.startswith("w")]
    norms = [sum(float(s[k].detach().norm()) for k in weights)
             for s in (_memory(r)(const, return_state=True)[1] for r in (1.0, 0.95, 0.8))]
    assert weights and norms[0] > norms[1] > norms[2]
