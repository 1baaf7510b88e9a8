"""Layer-level properties of every memory layer type (T, G, L, C, X, D): state passing, document
isolation, decode == parallel forward, causality, reduction of ATLAS to Titans, stacks."""
from __future__ import annotations

import pytest
import torch

from hybrid_lm.models.common.registry import get_layer_spec
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM

LETTERS = ["T", "G", "L", "C", "X", "D"]
DT = torch.float64


def small_config(pattern: str = "T-") -> ModelConfig:
    cfg = ModelConfig(d_model=16, layer_pattern=pattern, vocab_size=23)
    t = cfg.titans
    t.n_heads, t.chunk_size, t.segment_len, t.window, t.memory_expansion, t.n_persistent = 2, 2, 4, 3, 2, 2
    cfg.atlas.omega_window = 3
    return cfg


def build(letter: str, seed: int = 0):
    torch.manual_seed(seed)
    return get_layer_spec(letter).build(small_config(), 0).to(DT)


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
def test_step_equals_parallel_forward(letter: str) -> None:
    layer, x = build(letter), inputs()
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
    """ATLAS with c=1, no polynomial map, plain momentum is the Titans layer."""
    cfg = small_config()
    cfg.atlas.omega_window, cfg.atlas.poly_degree, cfg.atlas.optimizer = 1, 0, "momentum"
    torch.manual_seed(0)
    titans = get_layer_spec("T").build(cfg, 0).to(DT)
    atlas = get_layer_spec("X").build(cfg, 0).to(DT)
    atlas.load_state_dict(titans.state_dict())
    x = inputs()
    torch.testing.assert_close(atlas(x)[0], titans(x)[0], atol=1e-12, rtol=1e-12)


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
