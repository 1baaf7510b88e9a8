"""Causal grouped-query attention with RoPE, sliding window, packed documents and a KV cache.

Layer letter ``A``. Parameter names follow HF Llama (``q_proj, k_proj, v_proj, o_proj``) so the
export is a rename (see ``hf_mapping.py``).

Masking: a query sees a key iff the key is not in the future, lies within the window
(``t_q - t_k < window``) and belongs to the same document. Without documents, window or cache
the fast ``is_causal`` SDPA path runs (O(T) memory on the flash/efficient kernels); a cache-free
windowed call longer than 2W runs block by block (``window.py``, O(T * W)); otherwise an
explicit boolean mask (T, S + T) is built, which is fine for decoding (T = 1) and moderate
lengths, and is O(T^2) for long full-attention rows with documents unless flash-attn is used.

Cache (the layer's state): rotated keys and values ``k, v (B, KV, S, d)``, ``valid (B, S)`` (a
cached key is visible to the next call's first document only when it belongs to the document
the previous call ended in) and ``pos (B,)``, the RoPE position of the next token. With a window
the cache keeps only the last ``window - 1`` keys. Because RoPE scores depend only on position
differences, positions need not restart per document for packed rows to match separate runs;
``position_ids`` are still honoured so that exported models see the same positions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.kernels.ssd.reference import segment_index
from hybrid_lm.models.attention.flash import flash_attention, flash_usable
from hybrid_lm.models.attention.rope import apply_rope, rope_cos_sin
from hybrid_lm.models.attention.window import blocked_window_attention, causal_context
from hybrid_lm.models.common.mixer import Layer, State, linear_flops


class Attention(Layer):
    stateful = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        rope_base: float = 10000.0,
        window: Optional[int] = None,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.rope_base = rope_base
        self.window = window
        self.backend = backend
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.o_proj.weight._is_residual_projection = True  # type: ignore[attr-defined]

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> State:
        """An empty cache: k, v (B, KV, 0, d), valid (B, 0), pos (B,) zeros."""
        kv = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {
            "k": kv,
            "v": kv.clone(),
            "valid": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            "pos": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def _mask(self, seg: torch.Tensor, cached_valid: torch.Tensor) -> torch.Tensor:
        """Boolean visibility (B, 1, T, S + T) from segment ids seg (B, T) and valid (B, S)."""
        batch, t = seg.shape
        s = cached_valid.size(1)
        q_idx = torch.arange(t, device=seg.device)[:, None]
        k_idx = torch.arange(-s, t, device=seg.device)[None, :]
        allowed = k_idx <= q_idx  # (T, S + T)
        if self.window is not None:
            allowed = allowed & (q_idx - k_idx < self.window)
        first = (seg == seg[:, :1])[:, :, None]  # queries of the first document may read the cache
        same_new = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
        same = torch.cat([first & cached_valid[:, None, :], same_new], dim=2)
        return (allowed[None] & same)[:, None]

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *,
        state: Optional[State] = None,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        """x (B, T, D) -> y (B, T, D); state is the KV cache described in the module docstring."""
        batch, t, _ = x.shape
        if doc_ids is not None:
            # A document starts wherever the id changes (mixer.py); comparing raw ids would merge
            # two separate documents that happen to share an id, e.g. [0, 0, 1, 1, 0, 0].
            doc_ids = segment_index(doc_ids)
        if state is None and return_state:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        q = self.q_proj(x).view(batch, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if position_ids is None:
            start = state["pos"] if state is not None else torch.zeros(batch, dtype=torch.long, device=x.device)
            position_ids = start[:, None] + torch.arange(t, device=x.device)[None]
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_base, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        has_cache = state is not None and state["k"].size(2) > 0
        if flash_usable(q, self.backend, has_cache):
            out = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), doc_ids, self.window)
            out = out.reshape(batch, t, -1)
        else:
            keys, values = k, v
            if has_cache:
                keys = torch.cat([state["k"], k], dim=2)
                values = torch.cat([state["v"], v], dim=2)
            gqa = self.n_heads != self.n_kv_heads
            seg = doc_ids if doc_ids is not None else torch.zeros(batch, t, dtype=torch.long, device=x.device)
            if not has_cache and doc_ids is None and self.window is None:
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
            elif not has_cache and self.window is not None and t > 2 * self.window:
                out = blocked_window_attention(q, k, v, seg, self.window)  # O(T * W), not (T, T)
            else:
                cached_valid = state["valid"] if has_cache else torch.zeros(batch, 0, dtype=torch.bool, device=x.device)
                mask = self._mask(seg, cached_valid)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
            out = out.transpose(1, 2).reshape(batch, t, -1)
        y = self.o_proj(out)

        if not return_state:
            return y, None
        return y, self._update_cache(state, k, v, doc_ids, position_ids)

    def _update_cache(
        self, state: State, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor], position_ids: torch.Tensor
    ) -> State:
        """Append this call's keys; only keys of the row's last document stay visible."""
        batch, t = position_ids.shape
        if doc_ids is None:
            new_valid = torch.ones(batch, t, dtype=torch.bool, device=k.device)
            old_valid = state["valid"]
        else:
            new_valid = doc_ids == doc_ids[:, -1:]
            old_valid = state["valid"] & (doc_ids[:, :1] == doc_ids[:, -1:])
        keys = torch.cat([state["k"], k], dim=2)
        values = torch.cat([state["v"], v], dim=2)
        valid = torch.cat([old_valid, new_valid], dim=1)
        if self.window is not None and self.window > 1:
            keep = self.window - 1  # the next query sees itself plus window - 1 previous keys
            keys, values, valid = keys[:, :, -keep:], values[:, :, -keep:], valid[:, -keep:]
        elif self.window == 1:
            keys, values, valid = keys[:, :, :0], values[:, :, :0], valid[:, :0]
        return {"k": keys, "v": values, "valid": valid, "pos": position_ids[:, -1] + 1}

    def step(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, Optional[State]]:
        """Decode one token: x (B, D) -> y (B, D) and the cache with its key/value appended."""
        if state is None:
            state = self.init_state(x.size(0), device=x.device, dtype=x.dtype)
        y, new_state = self.forward(x[:, None, :], state=state, return_state=True)
        return y[:, 0], new_state

    def flops_per_token(self, seq_len: int) -> float:
        """q/k/v/o matmuls plus QK^T and AV over the keys each query sees (``causal_context``:
        the causal mask's entries only, about W per query with a window W << T, (T + 1) / 2 without)."""
        d = self.q_proj.in_features
        hq, hkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        proj = linear_flops(d, hq) + 2 * linear_flops(d, hkv) + linear_flops(hq, d)
        return proj + 2 * 2.0 * hq * causal_context(seq_len, self.window)

    def reset_parameters(self) -> None:
        """Nothing beyond the stack's normal(0, std) init; kept explicit for the interface."""
        return None

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, window={self.window}"


