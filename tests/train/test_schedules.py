"""LR schedules, every kind: continuous at each phase boundary, the stated values where phases end,
non-increasing after warm-up, and a pure function of the step (a resume gets the same lr)."""
import math
import random

import pytest

from hybrid_lm.train.schedules import ScheduleConfig, build_lr_schedule
from hybrid_lm.typed_config import ConfigError, from_dict

PEAK, STEPS = 1e-3, 1000
KINDS = {
    "cosine": ScheduleConfig(kind="cosine", lr=PEAK, warmup_steps=50, min_lr_ratio=0.1),
    "wsd-1-sqrt": ScheduleConfig(kind="wsd", lr=PEAK, warmup_steps=50, decay_fraction=0.2, decay_shape="1-sqrt",
                                 min_lr_ratio=0.0),
    "wsd-linear": ScheduleConfig(kind="wsd", lr=PEAK, warmup_steps=50, decay_fraction=0.2, decay_shape="linear",
                                 min_lr_ratio=0.0),
    "wsd-cosine": ScheduleConfig(kind="wsd", lr=PEAK, warmup_steps=50, decay_fraction=0.2, decay_shape="cosine",
                                 min_lr_ratio=0.05),
    "infinite": ScheduleConfig(kind="infinite", lr=PEAK, warmup_steps=50, cooldown_steps=100, constant_lr_ratio=0.1,
                               anneal_steps=200, min_lr_ratio=0.01),
    "constant": ScheduleConfig(kind="constant", lr=PEAK, warmup_steps=50),
}


def boundaries(cfg: ScheduleConfig) -> list[int]:
    b = [cfg.warmup_steps, STEPS]
    if cfg.kind == "wsd":
        b.append(STEPS - round(cfg.decay_fraction * STEPS))
    if cfg.kind == "infinite":
        b += [cfg.warmup_steps + cfg.cooldown_steps, STEPS - cfg.anneal_steps]
    return b


@pytest.mark.parametrize("kind", KINDS)
def test_continuous_at_every_phase_boundary(kind):
    cfg = KINDS[kind]
    lr = build_lr_schedule(cfg, STEPS)
    for b in boundaries(cfg):
        # left limit vs value: a jump of even one step's worth of change would be ~1e-3 relative
        for eps in (1e-6, 1e-9):
            assert abs(lr(b) - lr(b - eps)) <= 1e-12 * PEAK + eps * PEAK, (b, lr(b), lr(b - eps))


@pytest.mark.parametrize("kind", KINDS)
def test_warmup_then_monotone_non_increasing(kind):
    cfg = KINDS[kind]
    lr = build_lr_schedule(cfg, STEPS)
    assert lr(0) == 0.0 and lr(cfg.warmup_steps) == pytest.approx(PEAK, rel=1e-12)
    warm = [lr(s) for s in range(cfg.warmup_steps + 1)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    values = [lr(s) for s in range(cfg.warmup_steps, STEPS + 1)]
    assert all(b <= a for a, b in zip(values, values[1:])), "increases after warm-up"


def test_infinite_phase_values():
    lr = build_lr_schedule(KINDS["infinite"], STEPS)
    assert lr(50) == pytest.approx(PEAK, rel=1e-12)  # η(N_w) = η_max
    assert lr(150) == pytest.approx(0.1 * PEAK, rel=1e-12)  # η(N_w + N_cd) = η_const
    assert lr(799) == pytest.approx(0.1 * PEAK, rel=1e-12)
    assert lr(1000) == pytest.approx(0.01 * PEAK, rel=1e-12)  # η(N_a + T_a) = η_min
    assert lr(100) == pytest.approx(0.55 * PEAK, rel=1e-12)  # half-way through the cosine cool-down
    # exponential anneal: log-linear in the step
    assert math.log(lr(900)) == pytest.approx((math.log(lr(800)) + math.log(lr(1000))) / 2, rel=1e-9)


def test_infinite_without_anneal_stays_on_the_plateau():
    cfg = ScheduleConfig(kind="infinite", lr=PEAK, warmup_steps=10, cooldown_steps=20, constant_lr_ratio=0.3)
    lr = build_lr_schedule(cfg, 100)
    assert lr(30) == lr(100) == lr(10**6) == pytest.approx(0.3 * PEAK)


def test_cosine_and_wsd_end_values():
    assert build_lr_schedule(KINDS["cosine"], STEPS)(STEPS) == pytest.approx(0.1 * PEAK, rel=1e-12)
    assert build_lr_schedule(KINDS["cosine"], STEPS)(525) == pytest.approx(0.55 * PEAK, rel=1e-12)
    wsd = build_lr_schedule(KINDS["wsd-linear"], STEPS)
    assert wsd(799) == PEAK and wsd(800) == PEAK and wsd(900) == pytest.approx(0.5 * PEAK)
    assert wsd(STEPS) == pytest.approx(0.0, abs=1e-18)
    sqrt = build_lr_schedule(KINDS["wsd-1-sqrt"], STEPS)
    assert sqrt(850) == pytest.approx((1 - math.sqrt(0.25)) * PEAK)


@pytest.mark.parametrize("kind", KINDS)
def test_pure_function_of_the_step(kind):
    """A schedule rebuilt after a resume gives the same lr at any step, whatever was queried before."""
    rng = random.Random(kind)
    steps = [rng.randrange(0, STEPS + 1) for _ in range(200)]
    first = build_lr_schedule(KINDS[kind], STEPS)
    expected = [first(s) for s in steps]
    resumed = build_lr_schedule(KINDS[kind], STEPS)
    assert [resumed(s) for s in reversed(steps)][::-1] == expected


def test_peak_from_the_optimizer_when_schedule_lr_unset():
    cfg = ScheduleConfig(kind="constant", warmup_steps=0)
    assert build_lr_schedule(cfg, 10, peak_lr=2e-3)(5) == 2e-3
    assert build_lr_schedule(ScheduleConfig(kind="constant", lr=1e-3, warmup_steps=0), 10, peak_lr=2e-3)(5) == 1e-3
    with pytest.raises(ConfigError, match="schedule.lr"):
        build_lr_schedule(cfg, 10)


def test_parses_from_yaml_dict():
    cfg = from_dict(ScheduleConfig, {"kind": "wsd", "lr": 1, "decay_shape": "cosine"})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    with pytest.raises(ConfigError, match="decay_shape"):
        from_dict(ScheduleConfig, {"decay_shape": "sqrt"})


@pytest.mark.parametrize("cfg, steps, field", [
    (ScheduleConfig(lr=PEAK, warmup_steps=20), 10, "schedule.warmup_steps"),
    (ScheduleConfig(kind="infinite", lr=PEAK, warmup_steps=5, cooldown_steps=100), 50, "schedule.cooldown_steps"),
    (ScheduleConfig(kind="wsd", lr=PEAK, warmup_steps=50, decay_fraction=0.9), 100, "schedule.decay_fraction"),
    (ScheduleConfig(kind="infinite", lr=PEAK, warmup_steps=0, cooldown_steps=0, anneal_steps=5, min_lr_ratio=0.0),
     10, "schedule.min_lr_ratio"),
    (ScheduleConfig(lr=-1.0), 100, "schedule.lr"),
])
def test_invalid_schedules_name_the_field(cfg, steps, field):
    with pytest.raises(ConfigError, match=field):
        build_lr_schedule(cfg, steps)
