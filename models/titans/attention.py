"""Sliding-window causal attention with persistent memory, for MAG and MAL (and MAC's pieces).

Separate from ``models/attention`` because of persistent memory, per-document RoPE and a cache of
exactly ``window - 1`` keys. Short calls (decoding, T <= 2 * window) use one SDPA call with an
explicit mask; longer calls go block by block through ``models/attention/window.py`` with the
persistent keys as an always-visible prefix, so memory stays O(T * window) at long context.

* Persistent memory (Titans paper section 4): ``n_persistent`` learned key/value pairs per head, prepended to
  every query's context and always visible, without RoPE (they have no position). This is
  lucidrains' cheaper variant of prepending learned tokens to the sequence.
* RoPE on queries/keys with positions counted from each document start (the carried counter
  continues the row's first document). The persistent keys carry no rotation, so positions
  must restart per document for a packed row to equal its documents run alone; they are
  derived from doc_ids, so ``position_ids`` are not read.
* Cache (the state): the last ``window - 1`` rotated keys/values with a validity mask, so a call
  continuing a previous one (or decoding one token) sees exactly the same context.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.kernels.ssd.reference import segment_index
from hybrid_lm.models.attention.rope import apply_rope, rope_cos_sin
from hybrid_lm.models.attention.window import blocked_window_attention, causal_context
from hybrid_lm.models.common.mixer import Layer, State, linear_flops


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """The project's RoPE (``models/attention/rope.py``). x (B, H, T, d) with even d; positions
    (B, T) -> (B, H, T, d). Angles in fp64, as this family has always computed them: there is no
    HF class to match here, and fp32 angles are off by ~1e-3 rad at position 16K."""
    cos, sin = rope_cos_sin(positions, x.size(-1), base, x.dtype, angle_dtype=torch.float64)
    return apply_rope(x, cos, sin)


def doc_positions(start: torch.Tensor, doc_ids: Optional[torch.Tensor], seq_len: int) -> torch.Tensor:
    """Position of each token in its document: start (B,) carried counter -> (B, T) int64."""
    t = torch.arange(seq_len, device=start.device)[None]
    if doc_ids is None:
        return start[:, None] + t
    change = torch.zeros_like(doc_ids, dtype=torch.bool)
    change[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_start = torch.where(change, t, torch.zeros_like(t)).cummax(dim=1).values
    return torch.where(doc_start == 0, start[:, None] + t, t - doc_start)


class PersistentKV(nn.Module):
    """n learned key/value pairs per head: (2, H, n, d)."""

    def __init__(self, n_heads: int, head_dim: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.kv = nn.Parameter(torch.empty(2, n_heads, n, head_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.kv, std=0.02)

    def expand(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> keys, values (B, H, n, d)."""
        kv = self.kv.to(dtype)
        return kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)


class SlidingWindowAttention(nn.Module):
    """Causal attention over the last ``window`` tokens of the same document, plus persistent KV."""

    def __init__(self, d_model: int, n_heads: int, window: int, n_persistent: int, rope_base: float) -> None:
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"attention needs n_heads | d_model and an even head dim, got {d_model}/{n_heads}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.n_heads, self.head_dim, self.window, self.rope_base = n_heads, d_model // n_heads, window, rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj.weight._is_residual_projection = True  # type: ignore[attr-defined]
        self.persistent = PersistentKV(n_heads, self.head_dim, n_persistent) if n_persistent > 0 else None

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> State:
        c = self.window - 1
        return {
            "k": torch.zeros(batch, self.n_heads, c, self.head_dim, device=device, dtype=dtype),
            "v": torch.zeros(batch, self.n_heads, c, self.head_dim, device=device, dtype=dtype),
            "valid": torch.zeros(batch, c, dtype=torch.bool, device=device),
            "pos": torch.zeros(batch, dtype=torch.long, device=device),
        }

    def forward(self, x: torch.Tensor, state: Optional[State], doc_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, State]:
        """x (B, T, D) -> (B, T, D) and the new cache."""
        bsz, seq_len, _ = x.shape
        h, dh, c = self.n_heads, self.head_dim, self.window - 1
        if state is None:
            state = self.init_state(bsz, x.device, x.dtype)
        q, k, v = self.qkv(x).view(bsz, seq_len, 3, h, dh).permute(2, 0, 3, 1, 4)  # (B, H, T, dh) each
        pos = doc_positions(state["pos"], doc_ids, seq_len)
        q, k = rope(q, pos, self.rope_base), rope(k, pos, self.rope_base)
        keys = torch.cat([state["k"].to(x.dtype), k], dim=2)
        vals = torch.cat([state["v"].to(x.dtype), v], dim=2)
        # segments, not raw ids: a document that reuses an earlier one's id is still another document
        # (the carried cache belongs to segment 0, the row's first document)
        docs = torch.zeros(bsz, seq_len, dtype=torch.long, device=x.device) if doc_ids is None else segment_index(doc_ids)
        kdocs = torch.cat([docs[:, :1].expand(bsz, c), docs], dim=1)
        kvalid = torch.cat([state["valid"], state["valid"].new_ones(bsz, seq_len)], dim=1)
        pers = self.persistent.expand(bsz, x.dtype) if self.persistent is not None else None
        if c + seq_len > 2 * self.window:
            out = self._blocked(q, keys, vals, kdocs, kvalid, pers)
        else:
            out = self._dense(q, keys, vals, kdocs, kvalid, docs, pers)
        y = self.o_proj(out.transpose(1, 2).reshape(bsz, seq_len, -1))  # -1: the local heads under TP
        n_keys = keys.size(2)
        keep_valid = kvalid[:, kvalid.size(1) - c :] & (kdocs[:, kdocs.size(1) - c :] == docs[:, -1:])
        new_state = {
            "k": keys[:, :, n_keys - c :], "v": vals[:, :, n_keys - c :],
            "valid": keep_valid, "pos": pos[:, -1] + 1,
        }
        return y, new_state

    def _dense(
        self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, kdocs: torch.Tensor, kvalid: torch.Tensor,
        docs: torch.Tensor, pers: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """One SDPA call with an explicit (T, c + T) mask: cheapest for short calls and decoding."""
        seq_len, c = q.size(2), keys.size(2) - q.size(2)
        qi = torch.arange(seq_len, device=q.device)[:, None] + c  # query index in key coordinates
        ki = torch.arange(c + seq_len, device=q.device)[None, :]
        mask = (ki <= qi) & (qi - ki < self.window)
        mask = mask[None] & kvalid[:, None, :] & (kdocs[:, None, :] == docs[:, :, None])  # (B, T, c+T)
        if pers is not None:
            keys, vals = torch.cat([pers[0], keys], dim=2), torch.cat([pers[1], vals], dim=2)
            mask = torch.cat([mask.new_ones(mask.size(0), seq_len, pers[0].size(2)), mask], dim=2)
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask[:, None])

    def _blocked(
        self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, kdocs: torch.Tensor, kvalid: torch.Tensor,
        pers: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Long calls block by block (O(T * window) memory, not a (T, c + T) mask and score matrix).

        The c cached keys become positions -c..-1 of one sequence with dummy queries (dropped);
        a cached slot that is not valid gets a segment of its own, so no real query sees it.
        """
        bsz, _, seq_len, dh = q.shape
        c = keys.size(2) - seq_len
        lonely = torch.iinfo(torch.long).min + torch.arange(c + seq_len, device=q.device)[None]
        seg = torch.where(kvalid, kdocs, lonely)
        q_all = torch.cat([q.new_zeros(bsz, q.size(1), c, dh), q], dim=2)
        return blocked_window_attention(q_all, keys, vals, seg, self.window, prefix=pers)[:, :, c:]

    def flops_per_token(self, seq_len: int) -> float:
        d = self.n_heads * self.head_dim
        # the persistent keys are visible to every query on top of its causal window
        ctx = causal_context(seq_len, self.window) + (self.persistent.n if self.persistent is not None else 0)
        return linear_flops(d, 3 * d) + linear_flops(d, d) + 4.0 * d * ctx


class WindowAttentionLayer(Layer):
    """The attention above as a stand-alone ``Layer`` (not registered: the ``A`` letter belongs to
    models/attention). Used as the memory-free baseline in the learning test and the benchmark."""

    stateful = True

    def __init__(self, attn: SlidingWindowAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, *, state: Optional[State] = None, doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None, return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        y, s = self.attn(x, state, doc_ids)
        return y, (s if return_state else None)

    def step(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, Optional[State]]:
        y, s = self.attn(x[:, None], state, None)
        return y[:, 0], s

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> State:
        return self.attn.init_state(batch_size, device, dtype)

    def flops_per_token(self, seq_len: int) -> float:
        return self.attn.flops_per_token(seq_len)
