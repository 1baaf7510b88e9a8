"""Gated RMSNorm of Mamba-2's output (mamba_ssm ``RMSNormGated``), grouped per ngroups.

``norm_before_gate=False`` (default): y = RMSNorm_g(x * SiLU(z)) * weight;
``True``: y = RMSNorm_g(x) * weight * SiLU(z). The statistic is taken over each contiguous block
of ``group_size`` channels, as mamba_ssm's ``rms_norm_ref`` does; computed in fp32
(fp64 for fp64 inputs, so the fp64 tests are exact).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False) -> None:
        super().__init__()
        if hidden_size % group_size:
            raise ValueError(f"group_size {group_size} does not divide hidden_size {hidden_size}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z (..., hidden) -> (..., hidden) in x's dtype."""
        dtype = x.dtype
        work = torch.promote_types(dtype, torch.float32)
        h = x.to(work)
        gate = F.silu(z.to(work))
        if not self.norm_before_gate:
            h = h * gate
        g = h.unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        h = g.flatten(-2) * self.weight.to(work)
        if self.norm_before_gate:
            h = h * gate
        return h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
