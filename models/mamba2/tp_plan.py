"""Tensor-parallel plan of the Mamba-2 mixer (letter ``M``), the layout of Megatron's MambaMixer.

Split by SSM heads and groups: rank r holds heads ``[r*H/tp, (r+1)*H/tp)`` and groups
``[r*G/tp, (r+1)*G/tp)``, which are exactly the groups its heads read (head h reads group
``h // (H/G)``). So:

* ``in_proj`` (fused ``[z, x, B, C, dt]``) is column-parallel per component: each rank keeps its
  heads' z and x rows, its groups' B and C rows and its heads' dt rows;
* the depthwise ``conv1d`` over ``[x, B, C]`` keeps the same channels (per component);
* ``dt_bias``, ``A_log``, ``D`` keep the local heads;
* the gated RMSNorm is grouped per ``d_inner / ngroups`` channels, a group never straddles two
  ranks, so each rank normalises its own channels with no communication;
* ``out_proj`` is row-parallel (the layer's one all-reduce).

Constraints (Megatron's asserts): ``nheads % tp == 0`` and ``ngroups % tp == 0``. The common
``ngroups = 1`` therefore allows no tensor parallelism of this layer; replicating B/C over the ranks
of a group (with their gradients reduced over those ranks) is not implemented.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hybrid_lm.models.common.tp_plan import (Requirement, Split, TPPlan, local_count, register_tp_plan,
                                             register_tp_requirements)
from hybrid_lm.models.mamba2.layer import Mamba2

if TYPE_CHECKING:
    from hybrid_lm.models.config import ModelConfig


@register_tp_plan(Mamba2)
def mamba2_plan(m: Mamba2, tp: int) -> TPPlan:
    gn = m.ngroups * m.d_state
    xbc = (m.d_inner, gn, gn)
    heads = Split(0, (m.nheads,))
    d_inner, ngroups = local_count(m.d_inner, tp), local_count(m.ngroups, tp)
    conv_dim = d_inner + 2 * ngroups * m.d_state
    return TPPlan(
        column={"in_proj": (m.d_inner, *xbc, m.nheads)},
        row=("out_proj",),
        split={"conv1d.weight": Split(0, xbc), "conv1d.bias": Split(0, xbc), "dt_bias": heads, "A_log": heads,
               "D": heads, "norm.weight": Split(0, (m.d_inner,))},
        local={"": {"d_inner": d_inner, "nheads": local_count(m.nheads, tp), "ngroups": ngroups, "conv_dim": conv_dim},
               "conv1d": {"in_channels": conv_dim, "out_channels": conv_dim, "groups": conv_dim}},
    )


@register_tp_requirements("M")
def mamba2_requirements(config: "ModelConfig") -> list[Requirement]:
    m = config.mamba2
    nheads = m.expand * config.d_model // m.headdim
    return [Requirement("mamba2.headdim", nheads, f"SSM heads = expand*d_model/headdim = "
                                                  f"{m.expand}*{config.d_model}/{m.headdim}"),
            Requirement("mamba2.ngroups", m.ngroups)]
