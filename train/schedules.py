"""Learning-rate schedules as pure functions of the step (spec/09-lr-schedules.md).

    lr_at = build_lr_schedule(cfg.schedule, total_steps=cfg.train.steps, peak_lr=cfg.optim.lr)
    lr = lr_at(step)

A pure function of the step means there is no scheduler object whose state could drift: a resumed
run recomputes exactly the learning rate the uninterrupted run had at that step.

Kinds:

* ``cosine``: linear warm-up to the peak, cosine decay to ``min_lr_ratio * peak`` at the last step.
* ``wsd``: warm-up, stable at the peak, then a decay over the last ``decay_fraction`` of the steps
  to ``min_lr_ratio * peak`` with a linear, cosine or 1-sqrt shape.
* ``infinite``: warm-up, cosine cool-down to ``constant_lr_ratio * peak`` over ``cooldown_steps``,
  constant (the "infinite" phase; continual pretraining adds data here without re-warming), then
  an exponential anneal to ``min_lr_ratio * peak`` over the last ``anneal_steps`` (0 = never anneal).
* ``constant``: warm-up then the peak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

from hybrid_lm.typed_config import ConfigError


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "infinite", "constant"] = "cosine"
    """shape of the schedule; the peak is ``optim.lr``"""
    warmup_steps: int = 20
    """linear warm-up from 0 over this many steps"""
    min_lr_ratio: float = 0.1
    """final lr as a fraction of the peak (cosine, wsd, infinite's anneal target)"""
    decay_fraction: float = 0.2
    """wsd: fraction of all steps spent in the final decay"""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    """wsd: shape of the final decay"""
    cooldown_steps: int = 100
    """infinite: steps of the cosine cool-down from the peak to the constant lr"""
    constant_lr_ratio: float = 0.25
    """infinite: the constant plateau as a fraction of the peak"""
    anneal_steps: int = 0
    """infinite: steps of the exponential anneal at the end of the run (0 = stay constant)"""


def _validate(cfg: ScheduleConfig, total_steps: int) -> None:
    def fail(name: str, message: str) -> None:
        raise ConfigError(f"schedule.{name}: {message}")

    if cfg.warmup_steps < 0:
        fail("warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    if cfg.warmup_steps > total_steps:
        fail("warmup_steps", f"{cfg.warmup_steps} exceeds the run's {total_steps} steps")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        fail("min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.kind == "wsd" and not 0.0 <= cfg.decay_fraction <= 1.0:
        fail("decay_fraction", f"must be in [0, 1], got {cfg.decay_fraction}")
    if cfg.kind == "infinite":
        if not 0.0 < cfg.constant_lr_ratio <= 1.0:
            fail("constant_lr_ratio", f"must be in (0, 1], got {cfg.constant_lr_ratio}")
        if cfg.anneal_steps > 0 and cfg.min_lr_ratio <= 0:
            fail("min_lr_ratio", "the exponential anneal needs a positive target")
        if cfg.warmup_steps + cfg.cooldown_steps + cfg.anneal_steps > total_steps:
            fail("cooldown_steps", f"warmup + cooldown + anneal = "
                 f"{cfg.warmup_steps + cfg.cooldown_steps + cfg.anneal_steps} exceeds the run's {total_steps} steps")


def _decay(shape: str, progress: float) -> float:
    """1 -> 0 as progress goes 0 -> 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)


def build_lr_schedule(cfg: ScheduleConfig, total_steps: int, peak_lr: float) -> Callable[[int], float]:
    """The absolute learning rate at each step 0..total_steps (validated; ConfigError names the field)."""
    _validate(cfg, total_steps)
    warmup = cfg.warmup_steps
    min_lr = cfg.min_lr_ratio * peak_lr

    def warm(step: int) -> float:
        return peak_lr * step / warmup

    if cfg.kind == "constant":
        return lambda step: warm(step) if step < warmup else peak_lr

    if cfg.kind == "cosine":
        span = max(total_steps - warmup, 1)

        def cosine(step: int) -> float:
            if step < warmup:
                return warm(step)
            progress = min((step - warmup) / span, 1.0)
            return min_lr + (peak_lr - min_lr) * _decay("cosine", progress)

        return cosine

    if cfg.kind == "wsd":
        decay_steps = round(cfg.decay_fraction * total_steps)
        decay_start = max(total_steps - decay_steps, warmup)

        def wsd(step: int) -> float:
            if step < warmup:
                return warm(step)
            if step < decay_start or decay_steps == 0:
                return peak_lr
            progress = min((step - decay_start) / decay_steps, 1.0)
            return min_lr + (peak_lr - min_lr) * _decay(cfg.decay_shape, progress)

        return wsd

    const_lr = cfg.constant_lr_ratio * peak_lr
    cooldown_end = warmup + cfg.cooldown_steps
    anneal_start = total_steps - cfg.anneal_steps

    def infinite(step: int) -> float:
        if step < warmup:
            return warm(step)
        if step < cooldown_end:
            return const_lr + (peak_lr - const_lr) * _decay("cosine", (step - warmup) / cfg.cooldown_steps)
        if cfg.anneal_steps == 0 or step < anneal_start:
            return const_lr
        progress = min((step - anneal_start) / cfg.anneal_steps, 1.0)
        return const_lr * (min_lr / const_lr) ** progress

    return infinite
