"""Context-parallel forward of attention (``A``, ``models/attention/layer.py``), two schemes.

``allgather`` (default; the scheme of Llama 3 pretraining): each rank projects and rotates its own
slice, all-gathers K/V (kv-heads only, so GQA sends H/KV times less) and runs its local queries
against the keys they can see, masked by *global* positions (causal, sliding window) and by the
global document segments. Per rank and layer, forward (backward moves the same in a reduce-scatter):

    bytes = (N - 1) / N * B * T * (2 * KV * d * e + 8)

with N the CP size, T the global length, e the activation element size and 8 the int64 doc ids.
Any head count works; each local slice [a, b) attends only to keys from the earliest one its
queries may see (the window's start, the start of the document at a) up to b, so scores per head
are (T/N) x (T/N + min(W, document length)) with packed documents or a window, at most (T/N) x T.

``ulysses`` (DeepSpeed-Ulysses): an all-to-all turns (all heads, T/N tokens) into (H/N heads, all
T tokens), the layer's own attention core runs on the whole sequence for those heads (fast
``is_causal`` and blocked-window paths included), a second all-to-all turns the output back.
Needs H % N == 0; kv-heads are split too when KV % N == 0, else repeated to H first. Each rank
attends over the whole sequence for its H/N heads: flash-attn varlen on CUDA half precision (as
the layer), else query blocks of T/N tokens against their own key ranges, so no (T, T) mask is
built, but the blocks' masks and scores add up to T x (T/N + document) per head. Forward:

    bytes = (N - 1) / N * B * (T/N) * d * e * (2 * H + 2 * KV') + (N - 1) / N * B * T * 8

(q and output: H heads each; k, v: KV' = KV if KV % N == 0 else H). It is independent of N in
total, and cheaper than the all-gather once H + KV' < N * KV; the all-gather has no head limit.

Both layouts work: the slices a rank holds come from ``ContextParallel.slices()``; keys are put
back in global order before masking, so zig-zag needs nothing special. ``position_ids`` are the
local slices of the global document positions (RoPE); None means the global ``arange(T)``, as
the one-process layer assumes. No KV cache: CP is for training forward/backward.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from hybrid_lm.kernels.ssd.reference import segment_index
from hybrid_lm.models.attention.flash import flash_attention, flash_usable
from hybrid_lm.models.attention.layer import Attention
from hybrid_lm.models.attention.rope import apply_rope, rope_cos_sin
from hybrid_lm.models.attention.window import blocked_window_attention
from hybrid_lm.train.context_parallel import ContextParallel, register_cp_forward
from hybrid_lm.train.context_parallel.collectives import all_to_all, gather, gather_no_grad

SCHEMES = ("allgather", "ulysses")


def local_positions(cp: ContextParallel, rank: Optional[int] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    """Global positions (T_local,) of ``rank``'s tokens, in its local order."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in cp.slices(rank)])


def rank_order_positions(cp: ContextParallel, device: Optional[torch.device] = None) -> torch.Tensor:
    """Global positions (T,) of the tokens gathered in group-rank order (rank 0's slices, rank 1's, ...)."""
    return torch.cat([local_positions(cp, r, device) for r in range(cp.size)])


def global_segments(doc_ids: Optional[torch.Tensor], cp: ContextParallel, batch: int,
                    device: torch.device) -> Optional[torch.Tensor]:
    """Local doc ids (B, T_local) -> the global segment index (B, T) in global order, or None.

    Segments are computed on the whole row, so a document that crosses a slice boundary stays one
    segment and two documents that reuse an id ([0, 0, 1, 1, 0, 0]) stay two, as on one process.
    """
    if doc_ids is None:
        return None
    gathered = gather_no_grad(doc_ids, cp.group)  # (N, B, T_local), rank order
    docs = torch.empty(batch, cp.seq_len, dtype=doc_ids.dtype, device=device)
    docs[:, rank_order_positions(cp, device)] = gathered.permute(1, 0, 2).reshape(batch, -1)
    return segment_index(docs)


def _qkv(layer: Attention, x: torch.Tensor, position_ids: Optional[torch.Tensor], qpos: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local q (B, H, Tl, d), rotated k and v (B, KV, Tl, d), as the layer computes them."""
    batch, t, _ = x.shape
    q = layer.q_proj(x).view(batch, t, layer.n_heads, layer.head_dim).transpose(1, 2)
    k = layer.k_proj(x).view(batch, t, layer.n_kv_heads, layer.head_dim).transpose(1, 2)
    v = layer.v_proj(x).view(batch, t, layer.n_kv_heads, layer.head_dim).transpose(1, 2)
    if position_ids is None:
        position_ids = qpos[None].expand(batch, -1)
    cos, sin = rope_cos_sin(position_ids, layer.head_dim, layer.rope_base, q.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _check(layer: Attention, x: torch.Tensor, cp: ContextParallel) -> None:
    if x.size(1) * cp.size != cp.seq_len:
        raise ValueError(f"context parallel attention: local length {x.size(1)} x {cp.size} ranks != "
                         f"sequence length {cp.seq_len}")


@register_cp_forward(Attention)
def allgather_attention(layer: Attention, x: torch.Tensor, *, doc_ids: Optional[torch.Tensor],
                        position_ids: Optional[torch.Tensor], cp: ContextParallel) -> torch.Tensor:
    """Local queries against the all-gathered K/V. x (B, T_local, D) -> (B, T_local, D)."""
    _check(layer, x, cp)
    batch, t, _ = x.shape
    q, k, v = _qkv(layer, x, position_ids, local_positions(cp, device=x.device))
    order = torch.argsort(rank_order_positions(cp, x.device))  # rank order -> global order

    def whole(t_: torch.Tensor) -> torch.Tensor:  # (B, KV, Tl, d) -> (B, KV, T, d) in global order
        g = gather(t_, cp.group)  # (N, B, KV, Tl, d)
        return g.permute(1, 2, 0, 3, 4).flatten(2, 3)[:, :, order]

    keys, values = whole(k), whole(v)
    seg = global_segments(doc_ids, cp, batch, x.device)
    outs, offset = [], 0
    for a, b in cp.slices():
        outs.append(_attend_range(q[:, :, offset:offset + b - a], keys, values, a, seg, layer.window))
        offset += b - a
    out = torch.cat(outs, dim=2)
    return layer.o_proj(out.transpose(1, 2).reshape(batch, t, -1))


def _attend_range(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                  seg: Optional[torch.Tensor], window: Optional[int]) -> torch.Tensor:
    """Queries at global positions [start, start + n) against the keys they may see.

    q (B, h, n, d); keys/values (B, kv, T, d) in global order; seg (B, T) global segment index or
    None -> (B, h, n, d). Only keys from the earliest one any query can see (the window's start, the
    start of the first query's document in any row) up to the last query are used, so the mask and
    scores are (n, n + min(window, document)) rather than (n, T) for packed documents."""
    n = q.size(2)
    stop = start + n
    lo = max(0, start - window + 1) if window is not None else 0
    if seg is not None:  # seg is non-decreasing: the positions before the first query's document
        lo = max(lo, int((seg < seg[:, start:start + 1]).sum(dim=1).min()))
    qpos, kpos = torch.arange(start, stop, device=q.device), torch.arange(lo, stop, device=q.device)
    allowed = kpos[None, :] <= qpos[:, None]  # (n, K)
    if window is not None:
        allowed = allowed & (qpos[:, None] - kpos[None, :] < window)
    mask = allowed[None]
    if seg is not None:
        mask = mask & (seg[:, start:stop, None] == seg[:, None, lo:stop])  # (B, n, K)
    return F.scaled_dot_product_attention(q, keys[:, :, lo:stop], values[:, :, lo:stop], attn_mask=mask[:, None],
                                          enable_gqa=q.size(1) != keys.size(1))


def _core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Optional[torch.Tensor],
          window: Optional[int], backend: str, block: int) -> torch.Tensor:
    """The cache-free attention of ``Attention.forward`` on a whole sequence: flash-attn varlen on
    CUDA half precision, SDPA ``is_causal`` without documents and window, the blocked window path
    for long windowed rows, else query blocks of ``block`` tokens against their own key ranges
    (``_attend_range``: no (T, T) mask). q (B, h, T, d), k/v (B, kv, T, d), seg (B, T) or None ->
    (B, h, T, d)."""
    batch, _, t, _ = q.shape
    if flash_usable(q, backend, False):  # pragma: no cover - CUDA only
        return flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seg, window).transpose(1, 2)
    if seg is None and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))
    if window is not None and t > 2 * window:
        zeros = torch.zeros(batch, t, dtype=torch.long, device=q.device)
        return blocked_window_attention(q, k, v, zeros if seg is None else seg, window)
    return torch.cat([_attend_range(q[:, :, a:a + block], k, v, a, seg, window) for a in range(0, t, block)], dim=2)


def ulysses_attention(layer: Attention, x: torch.Tensor, *, doc_ids: Optional[torch.Tensor],
                      position_ids: Optional[torch.Tensor], cp: ContextParallel) -> torch.Tensor:
    """Sequence <-> heads all-to-all around the whole-sequence core. x (B, T_local, D) -> (B, T_local, D)."""
    _check(layer, x, cp)
    n = cp.size
    if layer.n_heads % n:
        raise ValueError(f"ulysses attention: n_heads={layer.n_heads} is not divisible by context_parallel={n}")
    batch, t, _ = x.shape
    q, k, v = _qkv(layer, x, position_ids, local_positions(cp, device=x.device))
    if layer.n_kv_heads % n:
        group = layer.n_heads // layer.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    order = torch.argsort(rank_order_positions(cp, x.device))
    inverse = torch.argsort(order)

    def to_heads(t_: torch.Tensor) -> torch.Tensor:  # (B, h, Tl, d) -> (B, h/N, T, d), global order
        b, h, tl, d = t_.shape
        chunks = t_.view(b, n, h // n, tl, d).transpose(0, 1)  # row j: the heads rank j will own
        got = all_to_all(chunks, cp.group)  # row j: my heads over rank j's tokens
        return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * tl, d)[:, :, order]

    seg = global_segments(doc_ids, cp, batch, x.device)
    out = _core(to_heads(q), to_heads(k), to_heads(v), seg, layer.window, layer.backend, t)  # (B, H/N, T, d)
    b, hn, _, d = out.shape
    rows = out[:, :, inverse].view(b, hn, n, t, d).permute(2, 0, 1, 3, 4)  # row j: rank j's tokens
    back = all_to_all(rows, cp.group)  # row j: head chunk j over my tokens
    out = back.permute(1, 0, 2, 3, 4).reshape(b, n * hn, t, d)
    return layer.o_proj(out.transpose(1, 2).reshape(batch, t, -1))


def attention_forward(scheme: str) -> Callable[..., torch.Tensor]:
    """The CP forward for ``parallel.context_parallel_attention``."""
    if scheme not in SCHEMES:
        raise ValueError(f"context parallel attention scheme must be one of {SCHEMES}, got {scheme!r}")
    return allgather_attention if scheme == "allgather" else ulysses_attention
