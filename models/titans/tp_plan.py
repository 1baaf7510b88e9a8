"""Tensor-parallel plans of the neural memory layers: Titans ``T``/``C``/``G``/``L``, ATLAS ``X``/``D``.

Every memory head is an independent deep memory (its own W_0, gates and update), so the memory is
split by heads like attention: rank r holds memory heads ``[r*H/tp, (r+1)*H/tp)``.

* ``NeuralMemory``: the fused ``qkv`` (``[q, k, v]``) and its depthwise conv (taps and bias) keep
  the local heads of each component; ``gates`` (rows ``[theta, eta, alpha, gamma]`` x heads, with
  bias) likewise per gate; ``w0`` (per-head initial memory weights) keeps the local heads;
  ``gate_proj`` is column- and ``out_proj`` row-parallel (the layer's one all-reduce). The output
  RMSNorm over one head's channels and the polynomial feature coefficients are shared by all
  heads: replicated, their gradients summed over the ranks. The memory's state (weights, momentum,
  conv and Omega tails) holds local heads only.
* ``SlidingWindowAttention`` (the attention of C/G/L): fused ``qkv`` per component, persistent KV
  per head, ``o_proj`` row-parallel.
* MAC (``C``): the memory read ``read_q`` is column-, ``read_out`` row-parallel; its attention and
  memory follow their own plans; the output gate (``norm_attn``, ``norm_mem``, ``out_proj``) acts
  on full-width, already reduced activations and is replicated. MAG (``G``) likewise replicates its
  gate; MAL (``L``) has nothing of its own to split.

Constraint: ``titans.n_heads % tp == 0`` (memory heads and the C/G/L attention heads are the same count).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from hybrid_lm.models.common.tp_plan import (Requirement, Split, TPPlan, local_count, register_tp_plan,
                                             register_tp_requirements)
from hybrid_lm.models.titans.attention import SlidingWindowAttention
from hybrid_lm.models.titans.layers import MemoryAsGate, MemoryAsLayer
from hybrid_lm.models.titans.mac import MemoryAsContext
from hybrid_lm.models.titans.memory import NeuralMemory

if TYPE_CHECKING:
    from hybrid_lm.models.config import ModelConfig


@register_tp_plan(NeuralMemory)
def memory_plan(mem: NeuralMemory, tp: int) -> TPPlan:
    s = mem.spec
    h, hd = s.n_heads, s.n_heads * s.head_dim
    qkv = (hd, hd, hd)
    split = {f"w0.{l}": Split(0, (h,)) for l in range(len(mem.w0))}
    if s.conv_size > 0:
        split.update({"conv_weight": Split(0, qkv), "conv_bias": Split(0, qkv)})
    partial = ("out_norm.weight",) + (("features.coeffs",) if mem.features is not None else ())
    return TPPlan(
        column={"qkv": qkv, "gates": (h,) * mem.n_gates, "gate_proj": (hd,)},
        row=("out_proj",),
        split=split,
        partial_grad=partial,
        local={"": {"spec": dataclasses.replace(s, n_heads=local_count(h, tp))}},
    )


@register_tp_plan(SlidingWindowAttention)
def window_attention_plan(attn: SlidingWindowAttention, tp: int) -> TPPlan:
    d = attn.n_heads * attn.head_dim
    split = {"persistent.kv": Split(1, (attn.n_heads,))} if attn.persistent is not None else {}
    return TPPlan(column={"qkv": (d, d, d)}, row=("o_proj",), split=split,
                  local={"": {"n_heads": local_count(attn.n_heads, tp)}})


@register_tp_plan(MemoryAsContext)
def mac_plan(mac: MemoryAsContext, tp: int) -> TPPlan:
    return TPPlan(column={"read_q": (mac.h * mac.dh,)}, row=("read_out",), local={"": {"h": local_count(mac.h, tp)}})


@register_tp_plan(MemoryAsGate, MemoryAsLayer)
def gate_or_layer_plan(layer: MemoryAsGate | MemoryAsLayer, tp: int) -> TPPlan:
    return TPPlan()  # memory and attention follow their own plans; the rest is replicated


@register_tp_requirements("TCGLXD")
def memory_requirements(config: "ModelConfig") -> list[Requirement]:
    return [Requirement("titans.n_heads", config.titans.n_heads)]
