"""Convert a pretrained (non-looped) model into a (relaxed) recursive one (Bae et al., the paper's
shared-block initialisations and SVD-initialised LoRA).

The source pattern must be U copies of one *unit* (its shortest period: ``A-`` for a Llama-like
stack, ``M-M-A-`` for a hybrid repeating that group); a unit plays the part of the paper's "layer".
With L loops the shared block is K = U / L units, and loop l of shared unit j stands for source unit
``l * K + j`` (the paper's CYCLE tying, ``((l-1) mod K) + 1``). The shared block is initialised by

* ``stepwise``: unit j <- source unit ``j * L`` (fixed start: units 0, L, 2L, ...),
* ``average``: unit j <- the mean of the L source units tied to it (norms averaged too: Norm-avg),
* ``lower``: unit j <- source unit j (the first K units),

and each loop's LoRA by the truncated SVD of the residual between the source unit's weight and the
shared weight, ``R = U S V^T -> B = U_r S_r, A = V_r^T``: the best rank-r correction, exact at full
rank. Only linear maps get LoRA; everything else in the block (norms, Mamba-2's A_log/dt_bias/D and
conv, memory gates' biases) is shared as initialised, so a full-rank conversion reproduces the source
exactly only when those agree across the tied units (as they do in a freshly initialised stack).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.recursive.config import RecursionConfig

InitMethod = Literal["stepwise", "average", "lower"]
METHODS: tuple[str, ...] = ("stepwise", "average", "lower")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def pattern_unit(pattern: str) -> str:
    """The shortest string whose repetition is ``pattern``."""
    n = len(pattern)
    for size in range(1, n + 1):
        if n % size == 0 and pattern[:size] * (n // size) == pattern:
            return pattern[:size]
    return pattern


def shared_block_pattern(pattern: str, loops: int) -> str:
    """The pattern of the shared block that ``loops`` loops of reproduce ``pattern``'s depth."""
    unit = pattern_unit(pattern)
    units = len(pattern) // len(unit)
    if loops < 2 or units % loops:
        raise ValueError(f"--loops {loops}: the pattern {pattern!r} is {units} x {unit!r}, so the loop count must be "
                         f">= 2 and divide {units}")
    return unit * (units // loops)


def source_units(method: InitMethod, shared_unit: int, loops: int, k_units: int) -> list[int]:
    """The source units whose weights initialise shared unit ``shared_unit`` (their mean for ``average``)."""
    if method == "stepwise":
        return [shared_unit * loops]
    if method == "lower":
        return [shared_unit]
    if method == "average":
        return [loop * k_units + shared_unit for loop in range(loops)]
    raise ValueError(f"unknown init method {method!r} (choose from {', '.join(METHODS)})")


def svd_lora(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with B @ A the best rank-``rank`` approximation of ``residual`` (out, in);
    zero-padded where the rank exceeds min(out, in). Computed in fp64."""
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    keep = min(rank, s.numel())
    a = torch.zeros(rank, residual.shape[1], dtype=torch.float64)
    b = torch.zeros(residual.shape[0], rank, dtype=torch.float64)
    a[:keep] = vh[:keep]
    b[:, :keep] = u[:, :keep] * s[:keep]
    return a.to(residual.dtype), b.to(residual.dtype)


def convert_to_recursive(config: ModelConfig, state_dict: dict[str, torch.Tensor], *, loops: int,
                         method: InitMethod = "average", lora_rank: int = 0,
                         lora_targets: tuple[str, ...] | list[str] = ("*",)) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The recursive model's config and weights (our parameter names) from a plain model's."""
    if config.recursion.loops != 1:
        raise ValueError(f"the source is already recursive (model.recursion.loops={config.recursion.loops})")
    if method not in METHODS:
        raise ValueError(f"unknown init method {method!r} (choose from {', '.join(METHODS)})")
    source_pattern = config.block_pattern
    block = shared_block_pattern(source_pattern, loops)
    unit = len(pattern_unit(source_pattern))
    k_units = len(block) // unit
    target_config = dataclasses.replace(
        config, layer_pattern=block,
        recursion=RecursionConfig(loops=loops, lora_rank=lora_rank, lora_targets=list(lora_targets)))
    with torch.device("meta"):
        template = HybridLM(target_config).state_dict()

    def source(unit_index: int, offset: int, rest: str) -> torch.Tensor:
        return state_dict[f"blocks.{unit_index * unit + offset}.{rest}"]

    out: dict[str, torch.Tensor] = {}
    for key in template:
        match = _BLOCK_KEY.match(key)
        if match is None:
            out[key] = state_dict[key].clone()
            continue
        b, rest = int(match.group(1)), match.group(2)
        j, offset = divmod(b, unit)
        if rest.endswith((".lora_A", ".lora_B")):
            continue  # from the shared weights below
        tied = source_units(method, j, loops, k_units)
        out[key] = torch.stack([source(u, offset, rest).double() for u in tied]).mean(0).to(state_dict[
            f"blocks.{tied[0] * unit + offset}.{rest}"].dtype)
    if lora_rank:
        for key in template:
            if not key.endswith(".lora_A"):
                continue
            match = _BLOCK_KEY.match(key)
            assert match is not None
            b, rest = int(match.group(1)), match.group(2)[: -len(".lora_A")]
            j, offset = divmod(b, unit)
            shared = out[f"blocks.{b}.{rest}.weight"]
            pairs = [svd_lora(source(loop * k_units + j, offset, f"{rest}.weight") - shared, lora_rank)
                     for loop in range(loops)]
            out[f"blocks.{b}.{rest}.lora_A"] = torch.stack([a for a, _ in pairs])
            out[f"blocks.{b}.{rest}.lora_B"] = torch.stack([b_ for _, b_ in pairs])
    return target_config, out


def parameter_counts(model: HybridLM) -> dict[str, int]:
    """Unique parameters (what is stored and optimised), and the unrolled count (what a non-looped
    model of the same depth would hold): the block counted once per loop, LoRA once."""
    unique = model.num_params()
    lora = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B")))
    block = sum(p.numel() for n, p in model.blocks.named_parameters()) - lora
    return {"unique": unique, "unrolled": unique + (model.loops - 1) * block, "lora": lora, "shared_block": block}
