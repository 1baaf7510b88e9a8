"""LR schedules: the spec's properties (spec/09 §9.3) for every kind."""
import math

import pytest

from hybrid_lm.train.schedules import ScheduleConfig, build_lr_schedule
from hybrid_lm.typed_config import ConfigError

PEAK, STEPS = 1e-3, 1000
KINDS = {
    "cosine": ScheduleConfig(kind="cosine", warmup_steps=50, min_lr_ratio=0.1),
    "wsd-1-sqrt": ScheduleConfig(kind="wsd", warmup_steps=50, decay_fraction=0.2, decay_shape="1-sqrt", min_lr_ratio=0.0),
    "wsd-linear": ScheduleConfig(kind="wsd", warmup_steps=50, decay_fraction=0.2, decay_shape="linear", min_lr_ratio=0.0),
    "infinite": ScheduleConfig(kind="infinite", warmup_steps=50, cooldown_steps=100, constant_lr_ratio=0.1,
                               anneal_steps=200, min_lr_ratio=0.01),
    "constant": ScheduleConfig(kind="constant", warmup_steps=50),
}


def boundaries(cfg: ScheduleConfig) -> list[int]:
    b = [cfg.warmup_steps]
    if cfg.kind == "wsd":
        b.append(STEPS - round(cfg.decay_fraction * STEPS))
    if cfg.kind == "infinite":
        b += [cfg.warmup_steps + cfg.cooldown_steps, STEPS - cfg.anneal_steps]
    return b


@pytest.mark.parametrize("kind", KINDS, ids=list(KINDS))
def test_continuous_and_monotone_after_warmup(kind):
    cfg = KINDS[kind]
    lr = build_lr_schedule(cfg, STEPS, PEAK)
    assert lr(0) == 0.0 and lr(cfg.warmup_steps) == pytest.approx(PEAK, rel=1e-12)
    values = [lr(s) for s in range(cfg.warmup_steps, STEPS + 1)]
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:])), "increases after warm-up"
    for boundary in boundaries(cfg):
        # the jump across a phase boundary is no larger than the largest step inside a phase
        jump = abs(lr(boundary) - lr(boundary - 1))
        assert jump <= PEAK / cfg.warmup_steps + 1e-12, (boundary, jump)


def test_phase_values_of_the_infinite_schedule():
    cfg = KINDS["infinite"]
    lr = build_lr_schedule(cfg, STEPS, PEAK)
    assert lr(50) == pytest.approx(PEAK)
    assert lr(150) == pytest.approx(0.1 * PEAK, rel=1e-12)
    assert lr(799) == pytest.approx(0.1 * PEAK, rel=1e-12)
    assert lr(1000) == pytest.approx(0.01 * PEAK, rel=1e-12)
    # exponential anneal: log-linear in the step
    assert math.log(lr(900)) == pytest.approx((math.log(lr(800)) + math.log(lr(1000))) / 2, rel=1e-9)


def test_cosine_and_wsd_end_values():
    assert build_lr_schedule(KINDS["cosine"], STEPS, PEAK)(STEPS) == pytest.approx(0.1 * PEAK)
    wsd = build_lr_schedule(KINDS["wsd-linear"], STEPS, PEAK)
    assert wsd(799) == PEAK and wsd(STEPS) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("kind", KINDS, ids=list(KINDS))
def test_pure_function_of_the_step(kind):
    a = build_lr_schedule(KINDS[kind], STEPS, PEAK)
    b = build_lr_schedule(KINDS[kind], STEPS, PEAK)
    assert [a(s) for s in range(0, STEPS, 7)] == [b(s) for s in reversed(range(0, STEPS, 7))][::-1]


def test_invalid_schedules_name_the_field():
    with pytest.raises(ConfigError, match="schedule.warmup_steps"):
        build_lr_schedule(ScheduleConfig(warmup_steps=20), 10, PEAK)
    with pytest.raises(ConfigError, match="schedule.cooldown_steps"):
        build_lr_schedule(ScheduleConfig(kind="infinite", warmup_steps=5, cooldown_steps=100), 50, PEAK)
