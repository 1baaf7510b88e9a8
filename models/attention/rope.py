"""Rotary position embedding in HF Llama's rotate-half convention; the one RoPE of the project
(attention ``A`` and the sliding-window attention inside Titans C/G/L both use it).

The frequency vector is ``base ** (-arange(0, d, 2) / d)`` and each angle is applied to channel
pairs (i, i + d/2), exactly as ``transformers`` Llama does, so exported weights give equal logits.
Angles are computed in fp32 by default (as HF does; ``angle_dtype`` can ask for fp64) and the
rotation is applied in the activations' dtype.
"""
from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype,
                 angle_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) int -> cos, sin (B, 1, T, head_dim) in ``dtype``, angles in ``angle_dtype``."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).to(angle_dtype) / head_dim
    inv_freq = 1.0 / (base ** exponent)
    freqs = positions.to(angle_dtype)[..., None] * inv_freq  # (B, T, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d), cos/sin (B, 1, T, d) -> rotated x (B, H, T, d)."""
    return x * cos + rotate_half(x) * sin
