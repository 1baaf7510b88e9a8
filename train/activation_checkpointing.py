"""Activation checkpointing per layer family, applied to a built model from outside the model code.

    parallel.activation_checkpointing: full                     # every block
    parallel.activation_checkpointing: selective                # only the letters named:
    parallel.activation_checkpointing_layers: "MCX"             #   Mamba-2, Titans MAC and ATLAS blocks

A checkpointed block keeps only its input during the forward pass and runs its forward again
during the backward pass to rebuild what the backward needs (``torch.utils.checkpoint``,
non-reentrant, as torchtitan's ``apply_ac``). What a block saves otherwise is roughly its layer's
intermediate activations: a few (B, T, d) tensors for ``-``/``A``, the (B, T, expand·d) SSM inputs
for ``M``, per-chunk memory weights for the Titans/ATLAS letters; the recompute costs one more
forward of the block (about +1/3 of the step's FLOPs for ``full``). ``selective`` spends that only
on the families whose activations dominate, which for a memory-heavy stack are the memory letters.

The swap changes the block's class to a subclass whose ``forward`` wraps the original one, so
parameter names, state dicts and checkpoints are those of the plain model, and the layers run
unchanged (tensor-parallel collectives inside a block are simply repeated in the recompute).
Results are exact: the recompute runs the same operations on the same inputs with the RNG state
of the first run restored, so losses and gradients equal those without checkpointing bit for bit
(``tests/train/test_activation_checkpointing.py``). Under ``torch.no_grad`` (evals, generation) a
block runs plainly: there is no backward to save for.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybrid_lm.models.common.registry import layer_specs
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import Block
from hybrid_lm.typed_config import ConfigError

Mode = Literal["none", "full", "selective"]


class CheckpointedBlock(Block):
    """A ``Block`` whose forward is recomputed in the backward pass instead of keeping its activations."""

    def forward(self, x: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Optional[Any]]:  # type: ignore[override]
        if not torch.is_grad_enabled():
            return super().forward(x, **kwargs)
        return checkpoint(super().forward, x, use_reentrant=False, **kwargs)


def check_layers(mode: Mode, layers: str) -> None:
    """ConfigError for a ``layers`` string that does not fit ``mode`` (run by ``ParallelConfig``)."""
    if mode != "selective":
        if layers:
            raise ConfigError(f"parallel.activation_checkpointing_layers: {layers!r} is only read with "
                              f"parallel.activation_checkpointing=selective (got {mode})")
        return
    if not layers:
        raise ConfigError("parallel.activation_checkpointing_layers: selective checkpointing needs the layer "
                          "letters to checkpoint, e.g. \"M\" or \"CX\"")
    known = layer_specs()
    for letter in layers:
        if letter not in known:
            raise ConfigError(f"parallel.activation_checkpointing_layers: {letter!r} is not a layer letter "
                              f"(known: {''.join(sorted(known))})")


def check_activation_checkpointing(model: ModelConfig, mode: Mode, layers: str) -> None:
    """ConfigError when selective checkpointing names a letter the layer pattern does not use
    (a typo would otherwise silently checkpoint nothing); run at config load."""
    if mode != "selective":
        return
    for letter in layers:
        if letter not in model.block_pattern:
            raise ConfigError(f"parallel.activation_checkpointing_layers: {letter!r} does not occur in "
                              f"model.layer_pattern {model.layer_pattern!r}")


def apply_activation_checkpointing(model: nn.Module, mode: Mode, layers: str = "") -> int:
    """Checkpoint the blocks of ``model`` that ``mode``/``layers`` select; returns how many.

    ``model`` is a ``HybridLM`` or anything holding its ``Block`` modules (a pipeline stage's
    layers). ``full``: every block; ``selective``: the blocks whose letter is in ``layers``;
    ``none``: nothing. Idempotent."""
    if mode == "none":
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Block) and (mode == "full" or module.letter in layers):
            if type(module) is Block:
                module.__class__ = CheckpointedBlock
            count += 1
    return count
