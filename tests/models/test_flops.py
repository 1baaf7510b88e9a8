"""``flops_per_token`` of every layer family against torch's FlopCounterMode on small shapes.

The convention (``models/common/mixer.py``): forward matmul FLOPs, 2 per multiply-add; an
attention core counts QK^T and AV over the score entries its mask lets through. What the counter
needs help with, and how each is handled here:

* On CPU FlopCounterMode counts nothing for ``scaled_dot_product_attention`` (it knows only the
  CUDA kernels). The test swaps in the math form (same output), measures its two matmuls, and
  keeps the fraction of score entries that count: those the mask *the layer passed in* lets
  through, in query rows that are not placeholders. So the count follows the layer's own masks
  (causal, window, documents, persistent prefix, the blocked path's (W, 2W) tiles), not a formula
  restated here. Placeholder rows are the all-zero queries the layers insert and drop: the
  blocked path's tail padding and Titans' window - 1 rows standing for its cache slots; like
  masked entries, computing them is waste, not model FLOPs.
* In-place ``baddbmm_`` (the Titans closed form) is not in torch's table: mapped here to 2*m*k*n.
* Mamba-2's depthwise conv is elementwise code (``models/mamba2/conv.py``), invisible to the
  counter: measured as ``F.conv1d`` with the layer's own weights and shapes.

Every count is exact (rel 1e-9). The layers run in eval mode under no_grad.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hybrid_lm.kernels.titans.chunked import chunked_memory_update, update_flops_per_token
from hybrid_lm.kernels.titans.memory_mlp import memory_dims
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.attention.layer import Attention
from hybrid_lm.models.attention.window import causal_context
from hybrid_lm.models.common.mlp import SwiGLU
from hybrid_lm.models.mamba2.layer import Mamba2
from hybrid_lm.models.titans.attention import SlidingWindowAttention, WindowAttentionLayer
from hybrid_lm.typed_config import from_dict

EXACT = 1e-9


def _inplace_mm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
    return 2 * math.prod(a_shape) * b_shape[-1]


_EXTRA = {torch.ops.aten.baddbmm_: _inplace_mm_flops, torch.ops.aten.addmm_: _inplace_mm_flops}


class _Attention:
    """Totals of the swapped-in SDPA: ``computed`` (every score entry) and ``visible`` (the mask's)."""

    def __init__(self) -> None:
        self.computed = 0.0
        self.visible = 0.0


@contextmanager
def _math_sdpa(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Attention]:
    totals = _Attention()

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):  # type: ignore[no-untyped-def]
        if enable_gqa and k.size(-3) != q.size(-3):
            rep = q.size(-3) // k.size(-3)
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        t, s = q.size(-2), k.size(-2)
        allowed = torch.ones(q.shape[:-1] + (s,), dtype=torch.bool, device=q.device)
        if is_causal:
            allowed = allowed & torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            assert attn_mask.dtype == torch.bool, "the layers pass boolean masks"
            allowed = allowed & attn_mask
        real = q.ne(0).any(dim=-1)  # (B, H, T): placeholder rows are all zeros
        with FlopCounterMode(display=False) as inner:
            scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.size(-1) ** -0.5)
            out = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num() @ v
        computed = float(inner.get_total_flops())
        totals.computed += computed
        totals.visible += computed * (allowed & real[..., None]).sum().item() / allowed.numel()
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    yield totals


def measured_per_token(layer: torch.nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> float:
    """Forward FLOPs per token of ``layer(x)``, x (B, T, D), with attention counted over its mask."""
    with _math_sdpa(monkeypatch) as attn, FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter, torch.no_grad():
        layer(x)
    # the outer counter saw the math SDPA's matmuls in full; keep only their visible part
    total = counter.get_total_flops() - attn.computed + attn.visible
    return total / (x.size(0) * x.size(1))


def _config(pattern: str, **sections: dict) -> ModelConfig:
    data: dict = {"vocab_size": 64, "d_model": 32, "layer_pattern": pattern,
                  "attention": {"n_heads": 4, "n_kv_heads": 2}, "mlp": {"hidden_size": 48},
                  "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 16},
                  "titans": {"n_heads": 2, "chunk_size": 4, "window": 8, "segment_len": 8}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return from_dict(ModelConfig, data, "model")


def _layer(pattern: str, **sections: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return HybridLM(_config(pattern, **sections)).eval().blocks[0].layer


def _conv_per_token(layer: Mamba2, seq_len: int) -> float:
    conv = layer.conv1d
    with FlopCounterMode(display=False) as counter:
        # causal: left padding, T outputs
        x = F.pad(torch.randn(1, conv.in_channels, seq_len), (conv.kernel_size[0] - 1, 0))
        F.conv1d(x, conv.weight, conv.bias, groups=conv.groups)
    return counter.get_total_flops() / seq_len


def test_swiglu(monkeypatch):
    layer = SwiGLU(32, 48)
    assert layer.flops_per_token(64) == pytest.approx(measured_per_token(layer, torch.randn(2, 64, 32), monkeypatch), rel=EXACT)


@pytest.mark.parametrize("window,seq_len", [(None, 64), (None, 1), (8, 64), (16, 24), (512, 4096)],
                         ids=["causal", "one-token", "blocked-window", "dense-window", "T4096-W512"])
def test_attention(monkeypatch, window, seq_len):
    """Full causal (is_causal path), a window on the blocked (T > 2W) and dense-mask paths, and the
    long-context case whose window count was half the true one (W/2 keys per query instead of
    W - W(W-1)/2T). Small head dims keep the attention core a large share of the total."""
    torch.manual_seed(0)
    d = 16 if seq_len > 1000 else 32
    layer = Attention(d, n_heads=4, n_kv_heads=2, window=window).eval()
    measured = measured_per_token(layer, torch.randn(1, seq_len, d), monkeypatch)
    assert layer.flops_per_token(seq_len) == pytest.approx(measured, rel=EXACT)


def test_attention_with_documents_counts_no_more_than_its_mask(monkeypatch):
    """Packed documents hide keys of other documents: the formula (which assumes one document per
    row) is then an upper bound of what the mask lets through, never below it."""
    layer = Attention(32, n_heads=4, n_kv_heads=2).eval()
    x = torch.randn(1, 64, 32)
    doc_ids = torch.cat([torch.zeros(1, 40, dtype=torch.long), torch.ones(1, 24, dtype=torch.long)], dim=1)
    with _math_sdpa(monkeypatch) as attn, FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x, doc_ids=doc_ids)
    per_token = (counter.get_total_flops() - attn.computed + attn.visible) / 64
    assert per_token < layer.flops_per_token(64)


def test_mamba2(monkeypatch):
    """In/out projections and the chunked scan as computed (full Q x Q blocks), plus the conv."""
    torch.manual_seed(0)
    layer = Mamba2(32, d_state=8, headdim=8, chunk_size=16).eval()
    x = torch.randn(1, 64, 32)
    measured = measured_per_token(layer, x, monkeypatch) + _conv_per_token(layer, 64)
    assert layer.flops_per_token(64) == pytest.approx(measured, rel=EXACT)


@pytest.mark.parametrize("window,seq_len", [(16, 17), (16, 32), (16, 40), (8, 121)],
                         ids=["dense", "blocked-T2W", "blocked-padded", "blocked-long"])
def test_titans_window_attention(monkeypatch, window, seq_len):
    """T <= W + 1: one SDPA call whose mask hides the empty cache; longer: block by block. At
    T = 2W the old count (min(W, T/2) keys) was 30% high on the core: a query sees 0.77 W keys."""
    torch.manual_seed(0)
    layer = WindowAttentionLayer(SlidingWindowAttention(16, 2, window=window, n_persistent=4, rope_base=1e4)).eval()
    measured = measured_per_token(layer, torch.randn(1, seq_len, 16), monkeypatch)
    assert layer.flops_per_token(seq_len) == pytest.approx(measured, rel=EXACT)


TITANS_CASES = {
    "T": ("T", {}),
    "T-depth3-chunk8": ("T", {"titans": {"memory_depth": 3, "chunk_size": 8}}),
    "T-linear": ("T", {"titans": {"memory_depth": 1}}),
    "X-muon": ("X", {"atlas": {"optimizer": "muon", "poly_degree": 0, "ns_steps": 2, "omega_window": 2}}),
    "X-momentum-poly": ("X", {"atlas": {"optimizer": "momentum"}}),
    "D": ("D", {}),
    "D-window3": ("D", {"atlas": {"deep_transformer": {"omega_window": 3, "poly_degree": 0}}}),
}


@pytest.mark.parametrize("case", list(TITANS_CASES))
def test_memory_layers(monkeypatch, case):
    """The memory alone (both kernel paths: closed form for momentum, materialised for Muon)."""
    pattern, sections = TITANS_CASES[case]
    layer = _layer(pattern, **sections)
    measured = measured_per_token(layer, torch.randn(1, 64, 32), monkeypatch)
    assert layer.flops_per_token(64) == pytest.approx(measured, rel=EXACT)


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("ns_steps", [0, 2], ids=["closed-form", "muon"])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no-clamp", "clamp"])
def test_memory_kernel(window, ns_steps, max_grad_norm):
    """The kernel alone, on every path the layers can take (the clamp's default lives in the config)."""
    n, length, d, b = 3, 16, 8, 4
    dims = memory_dims(d, d, 2, 2)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(n, o, i, generator=g) / i**0.5 for o, i in dims]
    s = [torch.zeros_like(t) for t in w]
    k, v = torch.randn(n, length, window, d, generator=g), torch.randn(n, length, window, d, generator=g)
    gamma, q = torch.rand(n, length, window, generator=g), torch.randn(n, length, d, generator=g)
    theta, eta, alpha = (torch.rand(n, length, generator=g) for _ in range(3))
    valid = torch.ones(n, length, dtype=torch.bool)
    with FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
        chunked_memory_update(w, s, w, k, v, gamma, q, theta, eta, alpha, valid, b, residual=True,
                              ns_steps=ns_steps, max_grad_norm=max_grad_norm)
    measured = counter.get_total_flops() / (n * length)
    formula = update_flops_per_token(dims, b, window, ns_steps, clamp=max_grad_norm is not None)
    assert formula == pytest.approx(measured, rel=EXACT)


@pytest.mark.parametrize("pattern", ["G", "L", "C"])
def test_titans_composite_layers(monkeypatch, pattern):
    """MAG, MAL (memory + windowed attention) and MAC (segment attention over [persistent,
    memory read, segment], causal in both halves), over three segments/windows."""
    layer = _layer(pattern, titans={"window": 8})
    measured = measured_per_token(layer, torch.randn(1, 24, 32), monkeypatch)
    assert layer.flops_per_token(24) == pytest.approx(measured, rel=EXACT)


def test_whole_stack_is_its_layers_plus_the_head(monkeypatch):
    torch.manual_seed(0)
    model = HybridLM(_config("A-M-T-", attention={"n_heads": 4, "n_kv_heads": 2, "window": 8})).eval()
    tokens = torch.randint(0, 64, (1, 32))
    with _math_sdpa(monkeypatch) as attn, FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter, torch.no_grad():
        model(tokens)
    measured = (counter.get_total_flops() - attn.computed + attn.visible) / 32
    measured += _conv_per_token(model.blocks[2].layer, 32)
    assert model.flops_per_token(32) == pytest.approx(measured, rel=EXACT)


def _mean_keys_by_enumeration(seq_len: int, window: Optional[int]) -> float:
    return sum(min(t + 1, window or seq_len) for t in range(seq_len)) / seq_len


@pytest.mark.parametrize("seq_len,window", [(1, None), (7, None), (4096, 512), (5, 8), (8, 8), (9, 8)])
def test_causal_context_is_the_mean_of_visible_keys(seq_len, window):
    assert causal_context(seq_len, window) == pytest.approx(_mean_keys_by_enumeration(seq_len, window), rel=EXACT)
