"""The engine interface: all that the training loop and the checkpoint manager ask of a parallel engine.

    engine = parallelize(model, cfg.parallel, optim=cfg.optim, ...)   # train/parallelize.py picks one
    batches = [next(it) for _ in range(engine.micro_batches)]
    stats = engine.forward_backward(batches)          # every micro-batch of one optimizer step
    ...  all-reduce the stats, decide NaN / spike skips on every rank alike ...
    engine.set_lr(lr)
    norm = engine.step(skip=decision, grad_norm=log_due)
    engine.save(tmp_dir) / engine.load(ckpt_dir)       # inside checkpoint/manager.py's atomic layout

Implementations: ``ZeroEngine`` (train/zero_engine.py: DeepSpeed data parallel, ZeRO 0-3) and
``PipelineEngine`` (train/pipeline_engine.py: DeepSpeed's PipelineModule/PipelineEngine, ZeRO 0-1).

Why this shape:

* ``forward_backward`` takes all micro-batches of a step at once: a pipeline schedule interleaves
  them across stages (1F1B), so "one micro-batch, then the next" is not something every engine
  can do. Gradient accumulation is therefore the engine's business; the loop never counts
  micro-steps for anyone.
* The update is a separate ``step(skip)``: the skip decision needs the loss all-reduced over every
  rank after the backward passes and before any parameter moves, and it is an argument, not a flag
  left on the optimizer for someone else to find.
* ``StepStats`` are this rank's share: summed over all ranks they are the step's global numbers.
  A pipeline computes the loss on its last stage only, so only that stage reports losses and
  tokens; every rank still joins the loop's one all-reduce, so every rank takes the same decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

Batch = dict[str, torch.Tensor]

#: the batch keys a model call takes besides ``input_ids`` (data contract, data/README.md)
MODEL_KWARGS = ("labels", "doc_ids", "position_ids")


@dataclass
class StepStats:
    """One rank's share of an optimizer step (see the module docstring)."""

    loss_sum: float = 0.0
    """sum of the finite micro-batch losses this rank computed"""
    nonfinite: int = 0
    """micro-batch losses this rank computed that were NaN/inf"""
    losses: int = 0
    """micro-batch losses this rank computed, finite or not"""
    tokens: int = 0
    """input tokens of the micro-batches whose loss this rank computed"""

    def add(self, loss: float, tokens: int) -> None:
        if math.isfinite(loss):
            self.loss_sum += loss
        else:
            self.nonfinite += 1
        self.losses += 1
        self.tokens += tokens


@runtime_checkable
class Engine(Protocol):
    module: nn.Module
    """the model for evaluation: called like ``HybridLM`` (``module(input_ids, labels=..., doc_ids=...,
    position_ids=...)`` -> ``ModelOutput``), collectively on every rank of the run"""
    device: torch.device
    micro_batches: int
    """micro-batches this rank consumes per optimizer step"""
    data_rank: int
    """this rank's shard of the data (ranks of one pipeline read the same shard)"""
    data_size: int
    """number of data shards: the data-parallel degree"""
    checkpoint_layout: dict[str, Any]
    """what a resume must match besides the world size, recorded in COMPLETE.json (empty when
    nothing beyond the world size matters)"""

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next ``step``."""

    def forward_backward(self, batches: Sequence[Batch], *, nan_loss: bool = False) -> StepStats:
        """Forward and backward over ``batches`` (``micro_batches`` of them), accumulating the
        gradients of their mean loss; nothing is updated. ``nan_loss`` replaces every loss with NaN
        (``train.debug_nan_steps``, a testing aid) while keeping the graph."""

    def step(self, skip: bool, *, grad_norm: bool = False) -> Optional[float]:
        """Clip and apply the accumulated gradients, or with ``skip`` drop them leaving parameters
        and optimizer state exactly as they were; either way the gradients are zeroed. Returns the
        global gradient norm before clipping when ``grad_norm`` (None otherwise)."""

    def save(self, directory: Path) -> None:
        """Collective: write model and optimizer state under ``directory``."""

    def load(self, directory: Path) -> None:
        """Collective: restore what ``save`` wrote (CheckpointError when it cannot)."""


def to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(input_ids, the model keyword arguments present in ``batch``) on ``device``."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    kwargs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_KWARGS if batch.get(k) is not None}
    return ids, kwargs
