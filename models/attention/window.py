"""Sliding-window attention in blocks: O(T * W) memory instead of a (T, T) mask.

With a window of W tokens, a query in block b = t // W (blocks of W queries) can only see keys
in blocks b - 1 and b. So each query block attends to its own block and the previous one through
a (W, 2W) mask, and a long sequence costs T/W small attentions rather than one T x T mask and
score matrix (the dense SDPA path on CPU materialises both). Used by ``layer.py`` for cache-free
windowed calls with T > 2W; the result equals the dense-mask path (tests compare them).

``causal_context`` is the FLOP count's view of the same mask: how many keys a query sees on
average, which both attention layers (``layer.py``, ``models/titans/attention.py``) multiply by
the per-key cost in ``flops_per_token``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def causal_context(seq_len: int, window: Optional[int] = None) -> float:
    """Mean number of keys a query sees in causal attention over ``seq_len`` tokens, with an
    optional sliding ``window``: (1/T) sum_{t=1..T} min(t, W).

    (T + 1) / 2 without a window; W - W(W - 1) / (2T) once T >= W, i.e. almost the whole window,
    not half of it: only the first W queries see fewer than W keys. Masked-out score entries are
    not counted (flash kernels skip those blocks; the blocked CPU path computes (W, 2W) tiles).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    w = min(window or seq_len, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def blocked_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor, window: int,
    prefix: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Causal sliding-window attention with documents, block by block.

    Args:
        q: (B, H, T, d) rotated queries.
        k, v: (B, KV, T, d) rotated keys and values; KV divides H (grouped-query heads).
        seg: (B, T) non-decreasing segment index; a query sees keys of its own segment only.
        window: W; a query at t sees keys t - W + 1 .. t.
        prefix: optional keys and values (B, KV, P, d) that every query sees whatever its segment
            and position (Titans' persistent memory); P extra columns per block, not a (T, T) mask.
    Returns:
        (B, H, T, d).
    """
    batch, heads, length, dim = q.shape
    kv_heads = k.size(1)
    w = window
    pad = (-length) % w
    nblocks = (length + pad) // w
    if pad:
        # Padded keys lie in the future of every real query, so causality already hides them;
        # the padded queries only see themselves (segment -1) and are dropped.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        seg = F.pad(seg, (0, pad), value=-1)

    def with_previous(t: torch.Tensor, fill: float) -> torch.Tensor:
        """(..., nb * W, *rest) blocks -> (..., nb, 2W, *rest): previous block then own block."""
        blocks = t.unflatten(-2 if t.dim() == 4 else -1, (nblocks, w))
        if t.dim() == 4:  # keys/values (B, KV, nb, W, d); block -1 is padding
            prev = torch.cat([torch.full_like(blocks[:, :, :1], fill), blocks[:, :, :-1]], dim=2)
            return torch.cat([prev, blocks], dim=3)
        prev = torch.cat([torch.full_like(blocks[:, :1], fill), blocks[:, :-1]], dim=1)
        return torch.cat([prev, blocks], dim=2)

    keys, values = with_previous(k, 0.0), with_previous(v, 0.0)  # (B, KV, nb, 2W, d)
    key_seg = with_previous(seg, -2)  # (B, nb, 2W); -2 marks keys before the sequence
    q_seg = seg.view(batch, nblocks, w)
    q_idx = torch.arange(w, device=q.device)[:, None]
    k_idx = torch.arange(-w, w, device=q.device)[None, :]
    allowed = (k_idx <= q_idx) & (q_idx - k_idx < w)  # (W, 2W)
    mask = allowed & (q_seg[..., :, None] == key_seg[..., None, :])  # (B, nb, W, 2W)
    if prefix is not None:
        pk, pv = (t[:, :, None].expand(-1, -1, nblocks, -1, -1) for t in prefix)
        keys, values = torch.cat([pk, keys], dim=3), torch.cat([pv, values], dim=3)
        mask = torch.cat([mask.new_ones(batch, nblocks, w, pk.size(3)), mask], dim=3)

    # Fold the blocks into the batch: SDPA's grouped-query support wants heads at dim 1.
    qb = q.view(batch, heads, nblocks, w, dim).transpose(1, 2).reshape(batch * nblocks, heads, w, dim)
    n_keys = keys.size(3)
    kb = keys.transpose(1, 2).reshape(batch * nblocks, kv_heads, n_keys, dim)
    vb = values.transpose(1, 2).reshape(batch * nblocks, kv_heads, n_keys, dim)
    out = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=mask.reshape(batch * nblocks, 1, w, n_keys), enable_gqa=heads != kv_heads
    )
    out = out.view(batch, nblocks, heads, w, dim).transpose(1, 2).reshape(batch, heads, nblocks * w, dim)
    return out[:, :, :length]
