"""Context parallelism: one sequence split over the ranks of a CP group, exact for every family.

The contract shared by every family:

* A CP group of ``size`` ranks cuts each sequence of global length T into slices. ``contiguous``:
  ``size`` slices, rank r holds slice r. ``zigzag`` (causal load balance): ``2 * size`` slices, rank
  r holds slices r and ``2*size - 1 - r``, concatenated in that order. ``ContextParallel.slices()``
  gives the (start, stop) global positions of the local slices, in local order.
* A layer's CP forward gets its local activations ``x`` (B, T_local, D) and the *local* (already
  sliced) ``doc_ids``/``position_ids``; document ids are consistent across ranks because the batch
  was sliced after packing. It returns the local output (B, T_local, D), equal to the matching
  positions of the one-process forward on the whole sequence, with gradients flowing through
  autograd-aware collectives.
* Families register their CP forward by module class (as tensor-parallel plans do):
  ``@register_cp_forward(Mamba2)`` on ``(layer, x, *, doc_ids, position_ids, cp) -> y``. Layers
  without a registered forward and without state across tokens (the SwiGLU MLP) run locally.
  Model code stays free of all of this: the forwards are attached from outside by this package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

Layout = Literal["contiguous", "zigzag"]


@dataclass(frozen=True)
class ContextParallel:
    group: Any
    """the CP process group (``process_groups.ParallelGroups.cp_group``)"""
    rank: int
    size: int
    seq_len: int
    """global sequence length T (divisible by the number of slices)"""
    layout: Layout = "contiguous"

    @property
    def n_slices(self) -> int:
        return self.size if self.layout == "contiguous" else 2 * self.size

    def slice_ids(self, rank: Optional[int] = None) -> list[int]:
        """The global slice indices ``rank`` (default: this rank) holds, in local order."""
        r = self.rank if rank is None else rank
        return [r] if self.layout == "contiguous" else [r, 2 * self.size - 1 - r]

    def slices(self, rank: Optional[int] = None) -> list[tuple[int, int]]:
        """(start, stop) global positions of the local slices, in local order."""
        n = self.seq_len // self.n_slices
        return [(s * n, (s + 1) * n) for s in self.slice_ids(rank)]


CPForward = Callable[..., torch.Tensor]
_FORWARDS: dict[type, CPForward] = {}


def register_cp_forward(module_class: type) -> Callable[[CPForward], CPForward]:
    """Decorator: ``@register_cp_forward(Mamba2)`` on ``(layer, x, *, doc_ids, position_ids, cp) -> y``."""

    def wrap(fn: CPForward) -> CPForward:
        _FORWARDS[module_class] = fn
        return fn

    return wrap


def cp_forward_for(layer: nn.Module) -> Optional[CPForward]:
    """The registered CP forward of ``layer``'s class (or of its nearest registered base class)."""
    for cls in type(layer).__mro__:
        if cls in _FORWARDS:
            return _FORWARDS[cls]
    return None
