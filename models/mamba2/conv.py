"""Depthwise causal conv1d over time with a carried state and document boundaries.

The state is the last ``K - 1`` *pre-conv* inputs (B, C, K-1), so a call continuing a previous
one sees the same taps as a single pass. With documents, a tap from another document is dropped
(mask 1 of spec 01 §1.7): an output at t only sums inputs s with the same segment as t; the
carried state belongs to the row's first document.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hybrid_lm.kernels.ssd.reference import segment_index


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    state: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv, no activation.

    Args:
        x: (B, C, L) channels-first inputs.
        weight: (C, K) depthwise taps (``conv1d.weight[:, 0]``); tap K-1 multiplies the current input.
        bias: (C,) or None.
        state: (B, C, K-1) previous inputs (zeros when None).
        doc_ids: (B, L) document ids or None.
    Returns:
        y (B, C, L) and the new state (B, C, K-1): the last K-1 inputs, zeroed where they belong
        to an earlier document than the last token's, so the next call cannot read them.
    """
    batch, channels, length = x.shape
    k = weight.size(1)
    if state is None:
        state = x.new_zeros(batch, channels, k - 1)
    xp = torch.cat([state.to(x.dtype), x], dim=2)  # (B, C, K-1+L)
    if doc_ids is None:
        y = F.conv1d(xp, weight[:, None, :], bias, groups=channels)
        return y, xp[:, :, xp.size(2) - (k - 1):]
    seg = segment_index(doc_ids)
    segp = torch.cat([seg[:, :1].expand(batch, k - 1), seg], dim=1)  # state taps own the first segment
    y = torch.zeros_like(x)
    for w in range(k):  # K is tiny (4): K masked shifted products, no unfold copy
        same = (segp[:, w:w + length] == seg).to(x.dtype)[:, None, :]
        y = y + weight[:, w, None] * xp[:, :, w:w + length] * same
    if bias is not None:
        y = y + bias[:, None]
    return y, final_conv_state(x, state, doc_ids)


def final_conv_state(x: torch.Tensor, state: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The state after ``x``: its last K-1 inputs (B, C, K-1), earlier documents zeroed.

    x (B, C, L); state (B, C, K-1) before x; doc_ids (B, L) or None. Zeroing an input removes
    exactly its contribution, as the conv is linear in its inputs (the bias is added separately).
    """
    k1 = state.size(2)
    xp = torch.cat([state.to(x.dtype), x], dim=2)
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
