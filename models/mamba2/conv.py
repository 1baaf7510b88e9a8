"""Depthwise causal conv1d over time with a carried state and document boundaries.

The state is the last ``K - 1`` *pre-conv* inputs (B, C, K-1), so a call continuing a previous
one sees the same taps as a single pass. With documents, a tap from another document is dropped
(mask 1 of kernels/ssd/README.md, Documents): an output at t only sums inputs s with the same segment as t; the
carried state belongs to the row's first document.
"""
from __future__ import annotations

from typing import Optional

import torch

from hybrid_lm.kernels.ssd.reference import segment_index


class _ShiftedTaps(torch.autograd.Function):
    """y[t] = sum_j w[:, j] * m_j[t] * xp[t + j] over the K taps, xp = [state; x], in place.

    Written as a Function so that neither the (K-1+L, C) concatenation nor the per-tap shifted
    slices of autograd (each of whose backward allocates and zero-fills a full-size buffer)
    exist: forward and backward are K in-place multiply-adds on slices of x and of the gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, state, masks):  # type: ignore[no-untyped-def]
        # x (B, L, C); weight (C, K); state (B, K-1, C), channels-last; masks (K-1, B, L, 1) or None
        k = weight.size(1)
        y = x * weight[:, k - 1]
        for j in range(k - 1):
            _accumulate(y, x, state, None if masks is None else masks[j], weight[:, j], k - 1 - j, j)
        ctx.save_for_backward(x, weight, state, masks)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, weight, state, masks = ctx.saved_tensors
        k, length = weight.size(1), x.size(1)
        grad = grad.contiguous()
        grad_x = grad * weight[:, k - 1]
        grad_w = torch.empty_like(weight)
        grad_w[:, k - 1] = _dot_over_time(grad, x)
        grad_state = torch.zeros_like(state)
        for j in range(k - 1):
            shift, mask = k - 1 - j, None if masks is None else masks[j]
            g_taps = grad if mask is None else grad * mask  # the gradient each input receives via tap j
            total = torch.zeros_like(weight[:, j])
            if length > shift:
                grad_x[:, : length - shift].addcmul_(g_taps[:, shift:], weight[:, j])
                total += _dot_over_time(g_taps[:, shift:], x[:, : length - shift])
            n = min(shift, length)
            grad_state[:, j : j + n].addcmul_(g_taps[:, :n], weight[:, j])
            total += _dot_over_time(g_taps[:, :n], state[:, j : j + n])
            grad_w[:, j] = total
        return grad_x, grad_w, grad_state, None


def _dot_over_time(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over batch and time of a * b: (B, L, C) x2 -> (C,). einsum would run C tiny bmm's here."""
    return (a * b).sum(dim=(0, 1))


def _accumulate(y: torch.Tensor, x: torch.Tensor, state: torch.Tensor, mask: Optional[torch.Tensor],
                w: torch.Tensor, shift: int, j: int) -> None:
    """y[t] += w * m[t] * input(t - shift): from x for t >= shift, from state slot t + j before."""
    length = x.size(1)
    if length > shift:
        src = x[:, : length - shift] if mask is None else x[:, : length - shift] * mask[:, shift:]
        y[:, shift:].addcmul_(src, w)
    n = min(shift, length)
    src = state[:, j : j + n] if mask is None else state[:, j : j + n] * mask[:, :n]
    y[:, :n].addcmul_(src, w)


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
    masks = None
    if doc_ids is not None:
        # tap j at t reads input t - (K-1-j); it counts only inside t's document, and the carried
        # state belongs to the row's first document
        seg = segment_index(doc_ids)
        segp = torch.cat([seg[:, :1].expand(batch, k - 1), seg], dim=1)
        masks = torch.stack([segp[:, j : j + length] == seg for j in range(k - 1)]).to(x.dtype)[..., None]
    y = _ShiftedTaps.apply(x, weight.to(x.dtype), state.to(x.dtype).transpose(1, 2).contiguous(), masks)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, final_conv_state(x, state, doc_ids)


def final_conv_state(x: torch.Tensor, state: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The state after ``x``: its last K-1 inputs (B, C, K-1), earlier documents zeroed.

    x (B, L, C); state (B, C, K-1) before x; doc_ids (B, L) or None. Zeroing an input removes
    exactly its contribution, as the conv is linear in its inputs (the bias is added separately).
    """
    k1 = state.size(2)
    # only the last K-1 inputs matter: concatenating the whole call would copy (L, C) for nothing
    xp = torch.cat([state.to(x.dtype), x[:, max(x.size(1) - k1, 0):].transpose(1, 2)], dim=2)
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
