"""SwiGLU MLP, the channel mixer (layer letter ``-``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.models.common.mixer import Layer, State, linear_flops
from hybrid_lm.models.common.registry import register_layer
from hybrid_lm.models.config import ModelConfig


class SwiGLU(Layer):
    """y = W_down(SiLU(W_gate x) * W_up x), no biases (Llama / NemotronH-compatible names)."""

    def __init__(self, d_model: int, hidden_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden_size, bias=False)
        self.up_proj = nn.Linear(d_model, hidden_size, bias=False)
        self.down_proj = nn.Linear(hidden_size, d_model, bias=False)
        self.down_proj.weight._is_residual_projection = True  # type: ignore[attr-defined]

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *,
        state: Optional[State] = None,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None

    def step(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, Optional[State]]:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None

    def flops_per_token(self, seq_len: int) -> float:
        d, h = self.gate_proj.in_features, self.gate_proj.out_features
        return 2 * linear_flops(d, h) + linear_flops(h, d)


@register_layer("-", "mlp", "SwiGLU channel mixer")
def build_mlp(config: ModelConfig, layer_index: int) -> SwiGLU:
    return SwiGLU(config.d_model, config.mlp_hidden_size)
