"""AdamW with decoupled weight decay on matrices only, and a step that can be skipped.

Parameters split into two groups: matmul weights decay; norms, biases, embeddings (and the tied LM
head, which *is* the embedding) and anything a layer marks ``_no_weight_decay = True`` (Mamba-2's
A_log, D, dt_bias) do not. Decaying those hurts: a norm gain pulled to zero or an SSM decay rate
pulled to 1 is not regularisation.

``SkippableAdamW`` lets the engine veto one update after the gradients exist (NaN/inf loss on any
rank, ``Engine.step(skip=True)``): DeepSpeed's ZeRO optimisers call the inner ``step()``; inside
``with optimizer.skipping(True):`` it returns without touching parameters or moments (not even
Adam's step count), so a skipped step leaves the run exactly where it was. The learning rate is set
from outside each step (a pure function of the step, see train/schedules.py), so there is no
scheduler object whose state could drift.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from hybrid_lm.typed_config import InvalidValue, require_at_least, require_positive


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """peak learning rate (the schedule scales it; ScheduleConfig may override)"""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """decoupled (AdamW) decay on matmul weights only"""
    decay_norms_biases_embeddings: bool = False
    """True puts every parameter in the decay group (GPT-2's original behaviour)"""

    def validate(self) -> None:
        require_positive(self, "lr")
        require_at_least(self, 0, "eps", "weight_decay")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise InvalidValue("betas", f"each must be in [0, 1), got {list(self.betas)}")


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose ``step()`` is a no-op inside ``with optimizer.skipping(True):``."""

    _skipping: bool = False

    @contextmanager
    def skipping(self, skip: bool = True) -> Iterator[None]:
        """Scoped to the one engine step that may call ``step()`` (DeepSpeed calls it from within
        its own step, or not at all when ZeRO drops an update on a non-finite gradient norm)."""
        self._skipping = skip
        try:
            yield
        finally:
            self._skipping = False

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if self._skipping:
            return None
        return super().step(closure)


def _no_decay(name: str, param: nn.Parameter, embedding_ids: set[int]) -> bool:
    return (
        param.ndim < 2
        or getattr(param, "_no_weight_decay", False)
        or id(param) in embedding_ids
        or name.endswith(".bias")
    )


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two AdamW groups (decay / no decay) with stable, name-sorted order so optimizer state
    lines up across runs and ZeRO partitions."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():  # named_parameters already drops tied duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if not cfg.decay_norms_biases_embeddings and _no_decay(name, p, embedding_ids):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> SkippableAdamW:
    # foreach=False: the per-tensor path gives bitwise-identical results whatever the grouping,
    # which the exact-resume guarantee relies on; on the tiny CPU models it costs nothing measurable.
    return SkippableAdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
