"""Re-layout of packed rows into per-document streams aligned to a period (chunk or segment).

The chunked memory must give for a packed row exactly what it gives for each document alone,
and a call that continues a partially processed chunk must keep the chunk grid of the previous
call. Both are solved by one gather: every document of every row becomes its own stream; the
first document of a row is front-padded by the row's carried offset into the period (so that its
tokens land on the same chunk slots as in one uninterrupted pass), later documents start at
slot 0 from the initial state. Padding slots are marked invalid and are no-ops in the kernels.

The per-row split needs the document starts on the host (one device sync per call when doc_ids
are given); without doc_ids each row is one stream and the index is built on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hybrid_lm.kernels.ssd.reference import segment_index


@dataclass
class Streams:
    index: torch.Tensor
    """(N, L) int64 index into the flattened (B*T) tokens; B*T marks a padding slot"""
    valid: torch.Tensor
    """(N, L) bool, False on padding slots"""
    row: torch.Tensor
    """(N,) int64 row each stream comes from"""
    inherits: torch.Tensor
    """(N,) bool, True for the first document of a row (it continues the carried state)"""
    last: torch.Tensor
    """(B,) int64 stream holding each row's last document"""
    end: torch.Tensor
    """(N,) int64 slot one past each stream's last token (offset + document length)"""
    n_tokens: int
    """B*T"""

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, L, ...), zeros on padding slots."""
        flat = x.reshape(self.n_tokens, *x.shape[2:])
        flat = torch.cat([flat, flat.new_zeros((1,) + flat.shape[1:])], dim=0)
        return flat[self.index]

    def scatter(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        """(N, L, ...) -> (B, T, ...); padding slots are dropped."""
        out = y.new_zeros((self.n_tokens + 1,) + y.shape[2:])
        out = out.index_put((self.index.reshape(-1),), y.reshape(-1, *y.shape[2:]))
        return out[: self.n_tokens].reshape(batch, self.n_tokens // batch, *y.shape[2:])


def build_streams(doc_ids: Optional[torch.Tensor], offsets: torch.Tensor, seq_len: int, period: int) -> Streams:
    """doc_ids: (B, T) or None; offsets: (B,) int64 slots of the current period already used."""
    batch = offsets.numel()
    device = offsets.device
    n_tokens = batch * seq_len
    if doc_ids is None:
        rows = torch.arange(batch, device=device)
        starts = torch.zeros(batch, dtype=torch.long, device=device)
        lengths = torch.full((batch,), seq_len, dtype=torch.long, device=device)
        offs = offsets.long()
        inherits = torch.ones(batch, dtype=torch.bool, device=device)
        last = rows
        max_end = int(seq_len + offs.max().item()) if batch else seq_len
    else:
        change = torch.ones_like(doc_ids, dtype=torch.bool)
        change[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        r_idx, t_idx = change.nonzero(as_tuple=True)  # row-major order: streams grouped by row
        rows, starts = r_idx, t_idx
        nxt = torch.cat([t_idx[1:], t_idx.new_zeros(1)])
        same_row = torch.cat([r_idx[1:] == r_idx[:-1], r_idx.new_zeros(1, dtype=torch.bool)])
        ends = torch.where(same_row, nxt, torch.full_like(nxt, seq_len))
        lengths = ends - starts
        inherits = starts == 0
        offs = torch.where(inherits, offsets.long()[rows], torch.zeros_like(starts))
        last = torch.nonzero(~same_row, as_tuple=True)[0]
        max_end = int((offs + lengths).max().item())
    padded = -(-max_end // period) * period
    slot = torch.arange(padded, device=device)[None, :]
    pos = slot - offs[:, None]
    valid = (pos >= 0) & (pos < lengths[:, None])
    index = torch.where(valid, rows[:, None] * seq_len + starts[:, None] + pos, torch.full_like(pos, n_tokens))
    return Streams(index, valid, rows, inherits, last, offs + lengths, n_tokens)


def causal_windows(
    x: torch.Tensor, prefix: torch.Tensor, prefix_valid: torch.Tensor, doc_ids: Optional[torch.Tensor], size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last ``size`` tokens up to each position, restricted to the position's document.

    x: (B, T, C); prefix: (B, size-1, C) the tail of the previous call; prefix_valid: (B, size-1)
    bool (False where that tail was empty or belonged to an earlier document).
    Returns windows (B, T, size, C) oldest first, mask (B, T, size) bool, and the new
    (prefix, prefix_valid) for the next call. The carried prefix belongs to the row's first document.
    """
    batch, seq_len, _ = x.shape
    xp = torch.cat([prefix.to(x.dtype), x], dim=1)
    valid = torch.cat([prefix_valid, prefix_valid.new_ones(batch, seq_len)], dim=1)
    if doc_ids is None:
        docs = torch.zeros(batch, seq_len + size - 1, dtype=torch.long, device=x.device)
    else:
        seg = segment_index(doc_ids)  # segments, not raw ids: a reused id is still another document
        docs = torch.cat([seg[:, :1].expand(batch, size - 1), seg], dim=1)
    windows = xp.unfold(1, size, 1).permute(0, 1, 3, 2)  # (B, T, size, C)
    mask = valid.unfold(1, size, 1) & (docs.unfold(1, size, 1) == docs[:, size - 1 :, None])
    keep = size - 1
    new_valid = valid[:, valid.size(1) - keep :] & (docs[:, docs.size(1) - keep :] == docs[:, -1:])
    new_prefix = xp[:, xp.size(1) - keep :] * new_valid[..., None].to(x.dtype)
    return windows, mask, new_prefix, new_valid
