"""Causal GQA attention with RoPE, sliding window, documents and KV cache: layer letter ``A``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from hybrid_lm.models.attention.layer import Attention
from hybrid_lm.models.common.registry import register_layer

if TYPE_CHECKING:  # models.config imports the Titans package, which uses this package's window kernel
    from hybrid_lm.models.config import ModelConfig


@register_layer("A", "attention", "causal GQA attention with RoPE (optional sliding window)")
def build_attention(config: ModelConfig, layer_index: int) -> Attention:
    a = config.attention
    return Attention(
        config.d_model,
        a.n_heads,
        n_kv_heads=a.n_kv_heads,
        head_dim=a.head_dim,
        rope_base=a.rope_base,
        window=a.window,
        bias=a.bias,
        backend=a.backend,
    )


__all__ = ["Attention", "build_attention"]
