"""Per-loop LoRA on the shared block, attached from outside the layer code.

``apply_loop_lora(blocks, loops, rank, targets, loop)`` swaps each targeted ``nn.Linear`` of the
shared blocks for a ``LoopLoRALinear`` that keeps the same ``weight``/``bias`` parameters (so
checkpoint names, the optimizer's view of the shared weights and the layers' own code do not
change) and adds ``lora_A`` (L, r, in) and ``lora_B`` (L, out, r). The stack tells every adapter
which loop runs through one shared ``LoopIndex``; within a loop all tokens use the same factors, so
the adapter is one extra pair of small matmuls (the paper's batched layout).

    y = x W^T + b + (x A_l^T) B_l^T,    l = the current loop

Standard LoRA init (A random, B zero) makes the relaxed model start as the strictly tied one; the
converter (``convert.py``) overwrites both with the SVD of each loop's residual instead.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LoopIndex:
    """Which loop the stack is running; one instance shared by the stack and its adapters.

    A plain object, not a buffer: it is control flow, never saved or moved between devices."""

    def __init__(self) -> None:
        self.value = 0


class LoopLoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, loops: int, rank: int, loop: LoopIndex) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.loop = loop
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(loops, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(loops, self.out_features, rank, **factory))
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """A as nn.Linear's Kaiming-uniform init, B zero (LoRA's init: the adapter starts at 0)."""
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.loop.value
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A[i]), self.lora_B[i])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loops={self.lora_A.shape[0]}, rank={self.lora_A.shape[1]}"


def lora_target_paths(block: nn.Module, targets: Sequence[str]) -> list[str]:
    """Paths (inside ``block``) of the linears whose path matches one of ``targets``."""
    return [name for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, t) for t in targets)]


def apply_loop_lora(blocks: Sequence[nn.Module], *, loops: int, rank: int, targets: Sequence[str],
                    loop: LoopIndex) -> int:
    """Wrap the targeted linears of every block in place; returns how many were wrapped.

    Raises ValueError when ``targets`` matches no linear at all (a typo would otherwise train a
    strictly tied model while the config says relaxed)."""
    wrapped = 0
    for block in blocks:
        for path in lora_target_paths(block, targets):
            parent_path, _, attr = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            base = getattr(parent, attr)
            if isinstance(base, LoopLoRALinear):
                continue
            setattr(parent, attr, LoopLoRALinear(base, loops, rank, loop))
            wrapped += 1
    if wrapped == 0:
        raise ValueError(f"model.recursion.lora_targets: {list(targets)} matches no linear layer of the "
                         f"shared block (paths look like 'layer.q_proj', 'layer.out_proj')")
    return wrapped
