"""Learning-rate schedules as pure functions of the step.

    lr_at = build_lr_schedule(cfg.schedule, total_steps=cfg.train.steps)
    lr = lr_at(step)

A pure function of the step means there is no scheduler object whose state could drift: a resumed
run recomputes exactly the learning rate the uninterrupted run had at that step. The functions
also accept fractional steps, which is how the tests check continuity at phase boundaries.

Kinds (peak ``lr``, warm-up ``N_w`` steps linear from 0):

* ``cosine``: cosine decay from the peak to ``min_lr_ratio * lr`` at the last step.
* ``wsd``: stable at the peak, then a decay over the last ``decay_fraction`` of the steps to
  ``min_lr_ratio * lr`` with a linear, cosine or 1-sqrt shape (warmup-stable-decay).
* ``infinite`` ("Beyond Cosine Decay", arXiv 2503.02844): cosine cool-down to
  ``constant_lr_ratio * lr`` over ``cooldown_steps``, constant (the "infinite" phase; continual
  pretraining adds data here without re-warming), then an exponential anneal to
  ``min_lr_ratio * lr`` over the last ``anneal_steps`` (0 = never anneal, so a branch of the run
  can anneal while the main run continues at the plateau).
* ``constant``: the peak after warm-up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, NoReturn, Optional

from hybrid_lm.typed_config import (ConfigError, InvalidValue, require_at_least, require_positive,
                                  validate_section)


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "infinite", "constant"] = "cosine"
    """shape of the schedule"""
    lr: Optional[float] = None
    """peak learning rate; None: the trainer passes the optimizer's ``optim.lr`` as ``peak_lr``"""
    warmup_steps: int = 20
    """linear warm-up from 0 to the peak over this many steps"""
    min_lr_ratio: float = 0.1
    """final lr as a fraction of the peak (cosine, wsd, and the target of infinite's anneal)"""
    decay_fraction: float = 0.2
    """wsd: fraction of all steps spent in the final decay"""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    """wsd: shape of the final decay"""
    cooldown_steps: int = 100
    """infinite: steps of the cosine cool-down from the peak to the constant lr"""
    constant_lr_ratio: float = 0.25
    """infinite: the constant plateau as a fraction of the peak"""
    anneal_steps: int = 0
    """infinite: steps of the exponential anneal that ends the run (0 = stay on the plateau)"""

    def validate(self) -> None:
        """Values impossible for any run; ``build_lr_schedule`` adds the checks against its length."""
        require_positive(self, "lr")
        require_at_least(self, 0, "warmup_steps", "cooldown_steps", "anneal_steps")
        for name in ("min_lr_ratio", "decay_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidValue(name, f"must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.constant_lr_ratio <= 1.0:
            raise InvalidValue("constant_lr_ratio", f"must be in (0, 1], got {self.constant_lr_ratio}")


def _validate(cfg: ScheduleConfig, total_steps: int, peak: Optional[float]) -> float:
    def fail(name: str, message: str) -> NoReturn:
        raise ConfigError(f"schedule.{name}: {message}")

    validate_section(cfg, "schedule")
    if peak is None:
        fail("lr", "no peak learning rate (set schedule.lr, or pass the optimizer's lr as peak_lr)")
    if not peak > 0:
        fail("lr", f"must be > 0, got {peak}")
    if total_steps < 1:
        raise ConfigError(f"train.steps: must be >= 1, got {total_steps}")
    if cfg.warmup_steps > total_steps:
        fail("warmup_steps", f"{cfg.warmup_steps} exceeds the run's {total_steps} steps")
    if cfg.kind == "wsd":
        if cfg.warmup_steps + round(cfg.decay_fraction * total_steps) > total_steps:
            fail("decay_fraction", f"warm-up ({cfg.warmup_steps}) plus the decay "
                 f"({round(cfg.decay_fraction * total_steps)}) exceeds the run's {total_steps} steps")
    if cfg.kind == "infinite":
        if cfg.anneal_steps > 0 and not 0.0 < cfg.min_lr_ratio <= cfg.constant_lr_ratio:
            # an exponential decay cannot reach 0, and must go down from the plateau
            fail("min_lr_ratio", f"the anneal needs 0 < min_lr_ratio <= constant_lr_ratio, got {cfg.min_lr_ratio}")
        used = cfg.warmup_steps + cfg.cooldown_steps + cfg.anneal_steps
        if used > total_steps:
            fail("cooldown_steps", f"warmup + cooldown + anneal = {used} exceeds the run's {total_steps} steps")
    return peak


def _decay(shape: str, progress: float) -> float:
    """1 -> 0 as progress goes 0 -> 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)


def build_lr_schedule(cfg: ScheduleConfig, total_steps: int, peak_lr: Optional[float] = None) -> Callable[[int], float]:
    """The absolute learning rate at each step 0..total_steps; ConfigError names a bad field.

    The peak is ``cfg.lr`` when set, else ``peak_lr`` (the optimizer's lr, for configs that keep
    the peak in ``optim.lr``). Steps past ``total_steps`` hold the final value.
    """
    peak = _validate(cfg, total_steps, cfg.lr if cfg.lr is not None else peak_lr)
    warmup = cfg.warmup_steps
    min_lr = cfg.min_lr_ratio * peak

    def warm(step: float) -> float:
        return peak * step / warmup

    if cfg.kind == "constant":
        return lambda step: warm(step) if step < warmup else peak

    if cfg.kind == "cosine":
        span = max(total_steps - warmup, 1)

        def cosine(step: float) -> float:
            if step < warmup:
                return warm(step)
            return min_lr + (peak - min_lr) * _decay("cosine", min((step - warmup) / span, 1.0))

        return cosine

    if cfg.kind == "wsd":
        decay_steps = round(cfg.decay_fraction * total_steps)
        decay_start = total_steps - decay_steps

        def wsd(step: float) -> float:
            if step < warmup:
                return warm(step)
            if step < decay_start or decay_steps == 0:
                return peak
            return min_lr + (peak - min_lr) * _decay(cfg.decay_shape, min((step - decay_start) / decay_steps, 1.0))

        return wsd

    const_lr = cfg.constant_lr_ratio * peak
    cooldown_end = warmup + cfg.cooldown_steps
    anneal_start = total_steps - cfg.anneal_steps

    def infinite(step: float) -> float:
        if step < warmup:
            return warm(step)
        if step < cooldown_end:
            return const_lr + (peak - const_lr) * _decay("cosine", (step - warmup) / cfg.cooldown_steps)
        if cfg.anneal_steps == 0 or step < anneal_start:
            return const_lr
        progress = min((step - anneal_start) / cfg.anneal_steps, 1.0)
        return const_lr * (min_lr / const_lr) ** progress

    return infinite
