"""Depthwise causal conv1d over time with a carried state and document boundaries.

The state is the last ``K - 1`` *pre-conv* inputs (B, C, K-1), so a call continuing a previous
one sees the same taps as a single pass. With documents, a tap from another document is dropped
(mask 1 of spec 01 §1.7): an output at t only sums inputs s with the same segment as t; the
carried state belongs to the row's first document.
"""
from __future__ import annotations

from typing import Optional

import torch

from hybrid_lm.kernels.ssd.reference import segment_index


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    state: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv, no activation, channels-last.

    The layer's activations are (B, L, C); convolving in that layout as K shifted multiply-adds
    avoids the two transposes around ``F.conv1d`` and, above all, a SiLU backward over mismatched
    layouts, which together cost more than the SSD scan on CPU (bench_mamba2, T = 4096).

    Args:
        x: (B, L, C) inputs.
        weight: (C, K) depthwise taps (``conv1d.weight[:, 0]``); tap K-1 multiplies the current input.
        bias: (C,) or None.
        state: (B, C, K-1) previous inputs (zeros when None).
        doc_ids: (B, L) document ids or None.
    Returns:
        y (B, L, C) and the new state (B, C, K-1): the last K-1 inputs, zeroed where they belong
        to an earlier document than the last token's, so the next call cannot read them.
    """
    batch, length, channels = x.shape
    k = weight.size(1)
    if state is None:
        state = x.new_zeros(batch, channels, k - 1)
    xp = torch.cat([state.to(x.dtype).transpose(1, 2), x], dim=1)  # (B, K-1+L, C)
    w = weight.to(x.dtype)
    if doc_ids is None:
        y = xp[:, k - 1:] * w[:, k - 1]
        for tap in range(k - 1):
            y = y + xp[:, tap:tap + length] * w[:, tap]
    else:
        seg = segment_index(doc_ids)
        segp = torch.cat([seg[:, :1].expand(batch, k - 1), seg], dim=1)  # state taps own the first segment
        y = xp[:, k - 1:] * w[:, k - 1]
        for tap in range(k - 1):
            same = (segp[:, tap:tap + length] == seg).to(x.dtype)[:, :, None]
            y = y + xp[:, tap:tap + length] * same * w[:, tap]
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, final_conv_state(x, state, doc_ids)


def final_conv_state(x: torch.Tensor, state: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The state after ``x``: its last K-1 inputs (B, C, K-1), earlier documents zeroed.

    x (B, L, C); state (B, C, K-1) before x; doc_ids (B, L) or None. Zeroing an input removes
    exactly its contribution, as the conv is linear in its inputs (the bias is added separately).
    """
    k1 = state.size(2)
    xp = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=2)
    tail = xp[:, :, xp.size(2) - k1:]
    if doc_ids is None:
        return tail
    seg = segment_index(doc_ids)
    segp = torch.cat([seg[:, :1].expand(seg.size(0), k1), seg], dim=1)
    keep = (segp[:, segp.size(1) - k1:] == seg[:, -1:]).to(x.dtype)[:, None, :]
    return tail * keep


def conv_step(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: x (B, C), state (B, C, K-1) -> y (B, C), new state (B, C, K-1)."""
    window = torch.cat([state.to(x.dtype), x[:, :, None]], dim=2)  # (B, C, K)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return y, window[:, :, 1:]
