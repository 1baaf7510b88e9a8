"""Titans layer types for the hybrid pattern: ``T`` (LMM alone), ``G`` (MAG), ``L`` (MAL).

MAC (``C``) lives in ``mac.py``. Each layer is one residual block of the stack; state is one
flat ``dict[str, Tensor]`` with the sub-layer's keys prefixed (``mem.``, ``attn.``).

* MAG (Titans paper section 4): ``o = W_o( RMSNorm_a(SWA(x)) * sigmoid(RMSNorm_b(LMM(x))) )``, the
  paper's gate with normalised branches and an output projection. Persistent memory enters the attention branch only
  (as learned KV); the memory runs over x itself so that segments/documents compose exactly.
* MAL: the memory, then sliding-window attention, as two residual sub-blocks inside one layer:
  ``m = LMM(x); o = m + SWA(RMSNorm(x + m))`` (the stack adds x, giving x + m + SWA(...)).
"""
from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from hybrid_lm.models.common.mixer import Layer, State
from hybrid_lm.models.common.registry import register_layer
from hybrid_lm.models.titans.attention import SlidingWindowAttention
from hybrid_lm.models.titans.config import MemoryUpdateConfig
from hybrid_lm.models.titans.memory import MemorySpec, NeuralMemory

if TYPE_CHECKING:
    from hybrid_lm.models.config import ModelConfig


def memory_spec(config: "ModelConfig", **overrides: object) -> MemorySpec:
    """MemorySpec from the ``titans`` section (ATLAS builders pass their overrides). The section
    was validated with the model config (``TitansConfig.validate``/``validate_for_model``)."""
    t = config.titans
    shared = {f.name: getattr(t, f.name) for f in fields(MemoryUpdateConfig)}
    kw = dict(shared, d_model=config.d_model, n_heads=t.n_heads, head_dim=t.head_dim or config.d_model // t.n_heads)
    kw.update(overrides)
    return MemorySpec(**kw)  # type: ignore[arg-type]


def window_attention(config: "ModelConfig") -> SlidingWindowAttention:
    t = config.titans
    return SlidingWindowAttention(config.d_model, t.n_heads, t.window, t.n_persistent, t.rope_base)


def split_state(state: Optional[State], prefix: str) -> Optional[State]:
    if state is None:
        return None
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def join_state(**parts: Optional[State]) -> State:
    return {f"{name}.{k}": v for name, part in parts.items() if part is not None for k, v in part.items()}


class _MemoryWithAttention(Layer):
    stateful = True

    def __init__(self, config: "ModelConfig") -> None:
        super().__init__()
        self.memory = NeuralMemory(memory_spec(config))
        self.attn = window_attention(config)

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> State:
        return join_state(mem=self.memory.init_state(batch_size, device=device, dtype=dtype),
                          attn=self.attn.init_state(batch_size, device, dtype))

    def step(self, x: torch.Tensor, state: Optional[State]) -> tuple[torch.Tensor, Optional[State]]:
        y, new_state = self.forward(x[:, None], state=state, return_state=True)
        return y[:, 0], new_state

    def reset_parameters(self) -> None:
        self.memory.reset_parameters()
        if self.attn.persistent is not None:
            self.attn.persistent.reset_parameters()


class MemoryAsGate(_MemoryWithAttention):
    def __init__(self, config: "ModelConfig") -> None:
        super().__init__(config)
        d = config.d_model
        self.norm_attn = nn.RMSNorm(d, eps=config.norm_eps)
        self.norm_mem = nn.RMSNorm(d, eps=config.norm_eps)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.out_proj.weight._is_residual_projection = True  # type: ignore[attr-defined]

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, *, state: Optional[State] = None, doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None, return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        """x (B, T, D) -> (B, T, D)."""
        ya, sa = self.attn(x, split_state(state, "attn."), doc_ids)
        ym, sm = self.memory(x, state=split_state(state, "mem."), doc_ids=doc_ids, return_state=return_state)
        y = self.out_proj(self.norm_attn(ya) * torch.sigmoid(self.norm_mem(ym)))
        return y, (join_state(mem=sm, attn=sa) if return_state else None)

    def flops_per_token(self, seq_len: int) -> float:
        d = self.out_proj.in_features
        return self.memory.flops_per_token(seq_len) + self.attn.flops_per_token(seq_len) + 2.0 * d * d


class MemoryAsLayer(_MemoryWithAttention):
    def __init__(self, config: "ModelConfig") -> None:
        super().__init__(config)
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, *, state: Optional[State] = None, doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None, return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[State]]:
        """x (B, T, D) -> (B, T, D)."""
        m, sm = self.memory(x, state=split_state(state, "mem."), doc_ids=doc_ids, return_state=return_state)
        a, sa = self.attn(self.norm(x + m), split_state(state, "attn."), doc_ids)
        return m + a, (join_state(mem=sm, attn=sa) if return_state else None)

    def flops_per_token(self, seq_len: int) -> float:
        return self.memory.flops_per_token(seq_len) + self.attn.flops_per_token(seq_len)


@register_layer("T", "titans_lmm", "Titans neural long-term memory alone (LMM)")
def build_lmm(config: "ModelConfig", layer_index: int) -> NeuralMemory:
    return NeuralMemory(memory_spec(config))


@register_layer("G", "titans_mag", "Titans memory-as-gate: LMM gating sliding-window attention with persistent KV")
def build_mag(config: "ModelConfig", layer_index: int) -> MemoryAsGate:
    return MemoryAsGate(config)


@register_layer("L", "titans_mal", "Titans memory-as-layer: LMM then sliding-window attention")
def build_mal(config: "ModelConfig", layer_index: int) -> MemoryAsLayer:
    return MemoryAsLayer(config)
