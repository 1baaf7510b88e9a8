"""Layer-level properties of every memory layer type (T, G, L, C, X, D): state passing, document
isolation, decode == parallel forward, causality, reduction of ATLAS to Titans, stacks."""
from __future__ import annotations

import pytest
import torch

from hybrid_lm.models.common.registry import get_layer_spec
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.titans.streams import build_streams

LETTERS = ["T", "G", "L", "C", "X", "D", "D3"]  # D3: D with an Omega window of 3 (SWDT form)
DT = torch.float64


def small_config(pattern: str = "T-") -> ModelConfig:
    cfg = ModelConfig(d_model=16, layer_pattern=pattern, vocab_size=23)
    t = cfg.titans
    t.n_heads, t.chunk_size, t.segment_len, t.window, t.memory_expansion, t.n_persistent = 2, 2, 4, 3, 2, 2
    cfg.atlas.omega_window = 3
    return cfg


def build(letter: str, seed: int = 0, chunk_size: int = 2, segment_len: int = 4):
    cfg = small_config()
    cfg.titans.chunk_size, cfg.titans.segment_len = chunk_size, segment_len
    if letter == "D3":
        letter, cfg.atlas.deep_transformer.omega_window = "D", 3
    torch.manual_seed(seed)
    return get_layer_spec(letter).build(cfg, 0).to(DT)


def inputs(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(1), dtype=DT)


@pytest.mark.parametrize("letter", LETTERS)
@pytest.mark.parametrize("cut", [3, 5, 8], ids=lambda c: f"cut{c}")
def test_two_halves_equal_one_pass(letter: str, cut: int) -> None:
    layer, x = build(letter), inputs()
    y, state = layer(x, return_state=True)
    y1, s1 = layer(x[:, :cut], return_state=True)
    y2, s2 = layer(x[:, cut:], state=s1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-10, rtol=1e-10)
    for key in state:
        torch.testing.assert_close(s2[key].to(state[key].dtype), state[key], atol=1e-10, rtol=1e-10, msg=key)


@pytest.mark.parametrize("letter", LETTERS)
def test_packed_documents_equal_separate(letter: str) -> None:
    layer, x = build(letter), inputs()
    doc = torch.tensor([[0] * 5 + [1] * 6, [3] * 7 + [4] * 2 + [5] * 2])
    packed, _ = layer(x, doc_ids=doc)
    for b in range(2):
        outs, start = [], 0
        for d in doc[b].unique_consecutive():
            n = int((doc[b] == d).sum())
            outs.append(layer(x[b : b + 1, start : start + n])[0])
            start += n
        torch.testing.assert_close(packed[b : b + 1], torch.cat(outs, 1), atol=1e-10, rtol=1e-10)
    assert (packed - layer(x)[0]).abs().max() > 1e-3  # the boundary matters


@pytest.mark.parametrize("letter", LETTERS)
def test_reused_document_id_is_another_document(letter: str) -> None:
    """A document whose id an earlier one of the row used (0, 1, 0) is still a new document: its
    conv taps, Omega window and attention window (3 here) must not reach the first one's tokens."""
    layer, x = build(letter), inputs()
    reused = torch.tensor([[0] * 4 + [1] * 1 + [0] * 6] * 2)
    fresh = torch.tensor([[0] * 4 + [1] * 1 + [2] * 6] * 2)
    torch.testing.assert_close(layer(x, doc_ids=reused)[0], layer(x, doc_ids=fresh)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("letter", LETTERS)
@pytest.mark.parametrize("chunk,segment", [(2, 4), (1, 3), (3, 6), (4, 8)], ids=lambda v: str(v))
def test_step_equals_parallel_forward(letter: str, chunk: int, segment: int) -> None:
    """Token-by-token decoding is the sequential form of every layer: the chunk-start weights,
    the partial chunk and (MAC) the partial segment travel in the state, so it must equal the
    chunked parallel forward for any chunk and segment size (MAC: segments hold whole chunks),
    over 11 tokens (no multiple of either)."""
    layer, x = build(letter, chunk_size=chunk, segment_len=segment), inputs()
    y, _ = layer(x)
    state = layer.init_state(2, device=x.device, dtype=x.dtype)
    outs = []
    for t in range(x.size(1)):
        yt, state = layer.step(x[:, t], state)
        outs.append(yt)
    torch.testing.assert_close(torch.stack(outs, 1), y, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("letter", LETTERS)
def test_causal(letter: str) -> None:
    layer, x = build(letter), inputs()
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2, _ = layer(x2)
    torch.testing.assert_close(y2[:, :6], y[:, :6], atol=0, rtol=0)
    assert (y2[:, 6:] - y[:, 6:]).abs().max() > 1e-6


def test_atlas_window1_equals_titans() -> None:
    """ATLAS with c=1, no polynomial map, plain momentum is the Titans layer. With
    c = 1 X builds the same MemorySpec as T, so this checks the config plumbing only; the window
    machinery (c > 1) is checked by the two tests below."""
    cfg = small_config()
    cfg.atlas.omega_window, cfg.atlas.poly_degree, cfg.atlas.optimizer = 1, 0, "momentum"
    cfg.atlas.theta_max = cfg.titans.theta_max  # X has its own step bound; equal here
    torch.manual_seed(0)
    titans = get_layer_spec("T").build(cfg, 0).to(DT)
    atlas = get_layer_spec("X").build(cfg, 0).to(DT)
    atlas.load_state_dict(titans.state_dict())
    x = inputs()
    torch.testing.assert_close(atlas(x)[0], titans(x)[0], atol=1e-12, rtol=1e-12)


def _titans_and_atlas(window: int, seed: int = 0) -> tuple:
    """A T layer and an X layer (Omega window ``window``, no polynomial map, plain momentum) with
    the same weights; X's extra gamma gate rows are forced to gamma = 1 for every token."""
    cfg = small_config()
    cfg.atlas.omega_window, cfg.atlas.poly_degree, cfg.atlas.optimizer = window, 0, "momentum"
    cfg.atlas.theta_max = cfg.titans.theta_max  # X has its own step bound; equal here
    torch.manual_seed(seed)
    titans = get_layer_spec("T").build(cfg, 0).to(DT)
    atlas = get_layer_spec("X").build(cfg, 0).to(DT)
    assert atlas.gate_names == ("theta", "eta", "alpha", "gamma") and titans.gate_names == atlas.gate_names[:3]
    h = cfg.titans.n_heads
    state = {k: v for k, v in titans.state_dict().items() if not k.startswith("gates.")}
    atlas.load_state_dict(state, strict=False)
    with torch.no_grad():
        atlas.gates.weight[: 3 * h] = titans.gates.weight
        atlas.gates.bias[: 3 * h] = titans.gates.bias
        atlas.gates.weight[3 * h :] = 0.0
        atlas.gates.bias[3 * h :] = 40.0  # sigmoid(40) rounds to 1.0 in fp64
    return titans, atlas


@pytest.mark.parametrize("window", [2, 3])
def test_atlas_window_pruned_to_current_token_equals_titans(window: int) -> None:
    """X with c > 1 whose window gates keep only the current token is T, through the whole
    window machinery (gathered key/value windows, carried window tails, document masks, kernel
    with c entries per token).

    gamma is one value per token (gamma_i, the same in every window holding token i), so no gate
    setting can keep token t in its own window and drop it from later ones: the gates are forced to
    gamma = 1 and the projected (B, T, H, c) window gates are then multiplied by the one-hot of the
    newest entry. Also run as two calls (state carried) over packed documents."""
    titans, atlas = _titans_and_atlas(window)
    x = inputs()
    doc = torch.tensor([[0] * 5 + [1] * 6, [3] * 7 + [4] * 1 + [5] * 3])
    y_unpruned, _ = atlas(x, doc_ids=doc)
    assert (y_unpruned - titans(x, doc_ids=doc)[0]).abs().max() > 1e-3  # the window matters

    project = atlas.project
    newest = torch.zeros(window, dtype=DT)
    newest[-1] = 1.0

    def pruned(xx: torch.Tensor, state: dict, doc_ids):  # type: ignore[no-untyped-def]
        got, tails = project(xx, state, doc_ids)
        assert got["gamma"].shape[-1] == window and torch.all((got["gamma"] == 0) | (got["gamma"] == 1))
        return {**got, "gamma": got["gamma"] * newest}, tails

    atlas.project = pruned  # type: ignore[method-assign]
    for d in (None, doc):
        ref, _ = titans(x, doc_ids=d)
        torch.testing.assert_close(atlas(x, doc_ids=d)[0], ref, atol=1e-12, rtol=1e-12)
        y1, s1 = atlas(x[:, :4], doc_ids=None if d is None else d[:, :4], return_state=True)
        y2, _ = atlas(x[:, 4:], state=s1, doc_ids=None if d is None else d[:, 4:])
        torch.testing.assert_close(torch.cat([y1, y2], 1), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cut", [None, 3, 6], ids=lambda c: f"cut{c}")
def test_omega_windows_match_explicit_loop(cut) -> None:  # type: ignore[no-untyped-def]
    """The key/value/gate windows X hands the kernel equal a loop over "the last c tokens of the
    same document": entry j of token t's window is token t - (c-1) + j, with gate gamma of that
    token if it exists and lies in t's document, else gate 0. Covers the first c-1 tokens of a
    sequence, document boundaries inside a window, a one-token document and (``cut``) windows
    that reach into the previous call through the carried tail."""
    c = 3
    titans, atlas = _titans_and_atlas(c)
    h, dh = 2, 8
    with torch.no_grad():  # gates that differ per token, so a shifted window changes them
        atlas.gates.weight[3 * h :] = torch.randn(h, 16, generator=torch.Generator().manual_seed(5), dtype=DT)
        atlas.gates.bias[3 * h :] = 0.0
    x = inputs()
    doc = torch.tensor([[0] * 5 + [1] * 6, [3] * 7 + [4] * 1 + [5] * 3])
    bsz, length = doc.shape

    def windows(layer, xx, d, state):  # type: ignore[no-untyped-def]
        st = layer.init_state(bsz, device=xx.device, dtype=xx.dtype) if state is None else state
        return layer.project(xx, st, d)[0]

    if cut is None:
        got = windows(atlas, x, doc, None)
        tok = windows(titans, x, doc, None)
    else:  # second call continues documents that started in the first
        _, sa = atlas(x[:, :cut], doc_ids=doc[:, :cut], return_state=True)
        _, st = titans(x[:, :cut], doc_ids=doc[:, :cut], return_state=True)
        parts = [windows(atlas, x[:, :cut], doc[:, :cut], None), windows(atlas, x[:, cut:], doc[:, cut:], sa)]
        got = {n: torch.cat([p[n] for p in parts], 1) for n in ("k", "v", "gamma")}
        parts = [windows(titans, x[:, :cut], doc[:, :cut], None), windows(titans, x[:, cut:], doc[:, cut:], st)]
        tok = {n: torch.cat([p[n] for p in parts], 1) for n in ("k", "v")}
    # per-token references from T (same projections and convolution, window 1) and the gate rows
    k_tok, v_tok = tok["k"][:, :, :, 0], tok["v"][:, :, :, 0]  # (B, T, H, dh)
    g_tok = torch.sigmoid(x @ atlas.gates.weight[3 * h :].T + atlas.gates.bias[3 * h :]).detach()  # (B, T, H)
    assert got["k"].shape == (bsz, length, h, c, dh) and got["gamma"].shape == (bsz, length, h, c)
    n_masked = 0
    for b in range(bsz):
        for t in range(length):
            for j in range(c):
                src = t - (c - 1) + j
                if src >= 0 and doc[b, src] == doc[b, t]:
                    torch.testing.assert_close(got["k"][b, t, :, j], k_tok[b, src], atol=1e-14, rtol=0)
                    torch.testing.assert_close(got["v"][b, t, :, j], v_tok[b, src], atol=1e-14, rtol=0)
                    torch.testing.assert_close(got["gamma"][b, t, :, j], g_tok[b, src], atol=1e-14, rtol=0)
                else:
                    assert torch.all(got["gamma"][b, t, :, j] == 0), (b, t, j)
                    n_masked += 1
    # 2 + 1 masked entries (first and second token) at the start of the sequence and of each
    # document, except the one-token document 4 (row 1, t = 7), which has only its first token's 2
    assert n_masked == (3 + 3) + (3 + 2 + 3)


def test_deep_transformer_has_its_own_config() -> None:
    """D reads ``atlas.deep_transformer`` (DeepTransformer defaults: c = 1, dot-product bias, no
    momentum, no decay, plain steps), X reads ``atlas``; a stack holds both with their settings."""
    from hybrid_lm.typed_config import from_dict

    cfg = from_dict(ModelConfig, {"d_model": 16, "layer_pattern": "X-D-", "titans": {"n_heads": 2},
                                  "atlas": {"omega_window": 3, "deep_transformer": {"poly_degree": 1}}})
    x_layer, d_layer = (get_layer_spec(c).build(cfg, 0) for c in "XD")
    xs, ds = x_layer.spec, d_layer.spec
    # X defaults to plain momentum (atlas.optimizer: muon materialises per-token weights)
    assert (xs.omega_window, xs.poly_degree, xs.ns_steps, xs.bias, xs.momentum, xs.decay) == (3, 2, 0, "l2", True, True)
    cfg.atlas.optimizer = "muon"
    assert get_layer_spec("X").build(cfg, 0).spec.ns_steps == cfg.atlas.ns_steps == 5
    assert (ds.omega_window, ds.poly_degree, ds.ns_steps, ds.bias, ds.momentum, ds.decay) == (1, 1, 0, "dot", False, False)
    assert d_layer.gate_names == ("theta",) and x_layer.gate_names == ("theta", "eta", "alpha", "gamma")
    # D keeps the paper's tensor layout by default; X defaults to monomials: C(8 + 2, 2) = 45 features
    assert d_layer.d_key == 1 + 8 and x_layer.d_key == 45
    model = HybridLM(cfg)
    assert [type(b.layer).__name__ for b in model.blocks][::2] == ["NeuralMemory", "NeuralMemory"]
    cfg.atlas.deep_transformer.omega_window = 0
    with pytest.raises(ValueError, match="atlas.deep_transformer.omega_window"):
        get_layer_spec("D").build(cfg, 0)


@pytest.mark.parametrize("chunk", [1, 4], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("form", ["tensor", "monomial"])
def test_linear_deep_transformer_is_unnormalised_kernel_attention(chunk: int, form: str) -> None:
    """D with a linear memory (L_M = 1) is unnormalised kernel attention, in fp64:
    the Hebbian loss -<W phi(k), v> has gradient -v phi(k)^T whatever W is, and with no momentum
    and no decay W_t = W_0 + sum_{i<=t} theta_i v_i phi(k_i)^T, so

        y_t = W_0 phi(q_t) + sum_{i<=t, same document} theta_i v_i sum_p a_p (q_t . k_i)^p

    with a_p = 1/p! at init (degree-2 Taylor series of exp(q.k), the kernel of softmax attention).
    Any chunk size gives the same (the gradients do not depend on the weights). The identity is
    the paper's plain rule, so the gradient soft clamp (on by default) is switched off here."""
    cfg = small_config()
    cfg.titans.memory_depth, cfg.titans.chunk_size, cfg.titans.max_grad_norm = 1, chunk, None
    cfg.atlas.deep_transformer.poly_form = form
    torch.manual_seed(0)
    layer = get_layer_spec("D").build(cfg, 0).to(DT)
    x = inputs()
    doc = torch.tensor([[0] * 5 + [1] * 6, [3] * 7 + [4] * 1 + [5] * 3])
    bsz, length = doc.shape
    state = layer.init_state(bsz, device=x.device, dtype=DT)
    inp, _ = layer.project(x, state, doc)
    y, _ = layer.run_streams(inp, build_streams(doc, state["offset"], length, chunk), state)
    features, layer.features = layer.features, None
    raw, _ = layer.project(x, state, doc)  # q, k before the polynomial map
    layer.features = features
    a = features.coeffs.detach() ** 2
    torch.testing.assert_close(a, torch.tensor([1.0, 1.0, 0.5], dtype=DT), atol=1e-7, rtol=0)
    q, k, v, theta = raw["q"], raw["k"][:, :, :, 0], inp["v"][:, :, :, 0], inp["theta"]
    w0 = layer.w0[0].detach()  # (H, dh, d_key)
    for b in range(bsz):
        for t in range(length):
            same = [i for i in range(t + 1) if doc[b, i] == doc[b, t]]
            s = (q[b, t, :, None, :] * k[b, same].transpose(0, 1)).sum(-1)  # (H, n) q_t . k_i
            kern = a[0] + a[1] * s + a[2] * s**2
            want = torch.einsum("hn,nh,nhd->hd", kern, theta[b, same], v[b, same])
            want = want + (w0 @ features(q[b, t])[..., None])[..., 0]
            torch.testing.assert_close(y[b, t], want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("pattern", ["C-C-", "G-L-", "T-X-D-"])
def test_stack_trains_and_generates(pattern: str) -> None:
    torch.manual_seed(0)
    model = HybridLM(small_config(pattern))
    ids = torch.randint(0, 23, (2, 10))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    w0_grads = [p.grad for n, p in model.named_parameters() if "w0" in n]
    assert w0_grads and all(g.abs().sum() > 0 for g in w0_grads)  # the initial memory is learned
    full = model.generate(ids[:, :6], 4)
    logits = model(full[:, :-1]).logits
    assert torch.equal(full[:, 6:], logits[:, 5:].argmax(-1))  # decode path == parallel path


@pytest.mark.parametrize("window", [1, 3, 4])
@pytest.mark.parametrize("n_persistent", [0, 2])
def test_window_attention_blocked_equals_dense(window: int, n_persistent: int) -> None:
    """The O(T * window) block path of long calls equals one SDPA call with the full mask, with a
    partly valid cache carried in, two documents in a row and persistent keys."""
    from hybrid_lm.models.titans.attention import SlidingWindowAttention

    torch.manual_seed(0)
    attn = SlidingWindowAttention(16, 2, window, n_persistent, 1e4).to(DT)
    bsz, length, c = 2, 13, window - 1
    q = torch.randn(bsz, 2, length, 8, dtype=DT)
    keys, vals = torch.randn(2, bsz, 2, c + length, 8, dtype=DT).unbind(0)
    docs = torch.tensor([[0] * 5 + [1] * (length - 5), [3] * length])
    kdocs = torch.cat([docs[:, :1].expand(bsz, c), docs], dim=1)
    kvalid = torch.ones(bsz, c + length, dtype=torch.bool)
    kvalid[0, 0] = False if c else True
    pers = attn.persistent.expand(bsz, DT) if attn.persistent is not None else None
    dense = attn._dense(q, keys, vals, kdocs, kvalid, docs, pers)
    blocked = attn._blocked(q, keys, vals, kdocs, kvalid, pers)
    torch.testing.assert_close(blocked, dense, rtol=0, atol=1e-12)
