"""Tensor-parallel plan of causal GQA attention (letter ``A``), Megatron's split by heads.

q/k/v are column-parallel by heads: rank r holds query heads ``[r*H/tp, (r+1)*H/tp)`` and key/value
heads ``[r*KV/tp, (r+1)*KV/tp)``, which are exactly the KV heads those query heads read (query head
i reads KV head ``i // (H/KV)``), so attention runs locally with no communication. ``o_proj`` is
row-parallel: one all-reduce per layer in the forward pass.

Constraints: ``n_heads % tp == 0`` and ``n_kv_heads % tp == 0``. A KV head count below the degree
(Megatron then replicates each KV head over ``tp / KV`` ranks and reduces their gradients over
those ranks only) is refused at config load for now.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hybrid_lm.models.attention.layer import Attention
from hybrid_lm.models.common.tp_plan import Requirement, TPPlan, local_count, register_tp_plan, register_tp_requirements

if TYPE_CHECKING:
    from hybrid_lm.models.config import ModelConfig


@register_tp_plan(Attention)
def attention_plan(attn: Attention, tp: int) -> TPPlan:
    q, kv = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    return TPPlan(
        column={"q_proj": (q,), "k_proj": (kv,), "v_proj": (kv,)},
        row=("o_proj",),
        local={"": {"n_heads": local_count(attn.n_heads, tp), "n_kv_heads": local_count(attn.n_kv_heads, tp)}},
    )


@register_tp_requirements("A")
def attention_requirements(config: "ModelConfig") -> list[Requirement]:
    a = config.attention
    kv = a.n_kv_heads or a.n_heads
    return [Requirement("attention.n_heads", a.n_heads),
            Requirement("attention.n_kv_heads", kv, "" if a.n_kv_heads else "= n_heads")]
