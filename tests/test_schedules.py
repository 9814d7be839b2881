"""sctune.core.schedules: exact LR/momentum values of every schedule, as seen by the optimizer at each step."""

import itertools
import math

import pytest
import torch
from torch.optim.lr_scheduler import ConstantLR, CyclicLR, LambdaLR, MultiStepLR, OneCycleLR

from sctune.core.config import BaselineConfig, OneCycleConfig, TrainConfig
from sctune.core.schedules import (
    build_schedule,
    clr,
    constant,
    current_momentum,
    exp_ramp,
    linear_ramp,
    one_cycle,
    one_cycle_phases,
    piecewise,
    range_ramp,
)


def _sgd(lr=0.1, momentum=0.9):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=momentum)


def _adamw(lr=0.1):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr, betas=(0.9, 0.999))


def _trace(opt, sched, n):
    """(lr, momentum) *used* by each of n steps: read before optimizer.step, as train.run_steps does."""
    lrs, moms = [], []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(current_momentum(opt))
        opt.step()
        sched.step()
    return lrs, moms


# -- primitives ---------------------------------------------------------------------------------

def test_ramp_primitives():
    assert linear_ramp(0.0, 3.0, 0.0) == 0.0
    assert linear_ramp(0.0, 3.0, 0.5) == 1.5
    assert linear_ramp(1.0, 3.0, 1.0) == 3.0
    assert exp_ramp(1e-4, 1.0, 0.0) == pytest.approx(1e-4, rel=1e-12)
    assert exp_ramp(1e-4, 1.0, 0.5) == pytest.approx(1e-2, rel=1e-12)
    assert exp_ramp(1e-4, 1.0, 1.0) == pytest.approx(1.0, rel=1e-12)


# -- one cycle ----------------------------------------------------------------------------------

CYCLE = OneCycleConfig(max_lr=1.0, div_factor=4.0, cycle_frac=0.9, annihilation_factor=1000.0,
                       max_momentum=0.95, min_momentum=0.85)


def test_one_cycle_phase_boundaries_exact():
    opt = _sgd()
    sched = one_cycle(opt, CYCLE, total_steps=100)
    assert isinstance(sched, OneCycleLR)
    lrs, moms = _trace(opt, sched, 100)
    # torch's three-phase end_steps: pct*T - 1 = 44, 2*pct*T - 2 = 88, T - 1 = 99.
    assert lrs[0] == pytest.approx(0.25, rel=1e-9)
    assert lrs[44] == pytest.approx(1.0, rel=1e-9)
    assert max(lrs) == pytest.approx(1.0, rel=1e-9) and lrs.index(max(lrs)) in (43, 44, 45)
    assert lrs[88] == pytest.approx(0.25, rel=1e-9)
    assert lrs[99] == pytest.approx(0.25 / 1000, rel=1e-9)
    assert moms[0] == pytest.approx(0.95, rel=1e-9)
    assert moms[44] == pytest.approx(0.85, rel=1e-9)
    assert moms[88] == pytest.approx(0.95, rel=1e-9)
    assert all(m == pytest.approx(0.95, rel=1e-9) for m in moms[88:])  # held during annihilation
    assert min(lrs) > 0


def test_one_cycle_is_symmetric_linear_triangle_then_annihilation():
    opt = _sgd()
    lrs, moms = _trace(opt, one_cycle(opt, CYCLE, total_steps=100), 100)
    # The paper's cycle is a symmetric triangle: as many steps up as down.
    for k in range(45):
        assert lrs[44 - k] == pytest.approx(lrs[44 + k], rel=1e-9, abs=1e-12)
        assert moms[44 - k] == pytest.approx(moms[44 + k], rel=1e-9)
    # Linear: constant increments within each phase.
    up = [b - a for a, b in zip(lrs[:44], lrs[1:45], strict=True)]
    down = [b - a for a, b in zip(lrs[44:88], lrs[45:89], strict=True)]
    ann = [b - a for a, b in zip(lrs[88:99], lrs[89:100], strict=True)]
    assert all(d == pytest.approx(0.75 / 44, rel=1e-6) for d in up)
    assert all(d == pytest.approx(-0.75 / 44, rel=1e-6) for d in down)
    assert all(d == pytest.approx((0.25e-3 - 0.25) / 11, rel=1e-6) for d in ann)
    # Momentum moves opposite to the LR during the cycle.
    for i in range(88):
        dl, dm = lrs[i + 1] - lrs[i], moms[i + 1] - moms[i]
        assert dl * dm < 0
    # The cycle covers cycle_frac of the run (89 of 100 steps within [min, max]).
    assert sum(lr >= 0.25 - 1e-9 for lr in lrs) == 89


def test_one_cycle_short_run_ends_annihilated_and_refuses_extra_steps():
    opt = _sgd()
    sched = one_cycle(opt, CYCLE, total_steps=10)
    lrs, _ = _trace(opt, sched, 10)
    assert lrs[0] == pytest.approx(0.25, rel=1e-9) and lrs[9] == pytest.approx(0.25e-3, rel=1e-9)
    assert min(lrs) > 0 and max(lrs) <= 1.0
    # torch extrapolates past the last step (the group LR is now negative, never used): a further
    # step is refused rather than training on it.
    with pytest.raises(ValueError):
        sched.step()


def test_one_cycle_cycles_adam_beta1_only():
    opt = _adamw()
    sched = one_cycle(opt, CYCLE, total_steps=100)
    lrs, moms = _trace(opt, sched, 100)
    assert lrs[44] == pytest.approx(1.0, rel=1e-9)
    assert moms[0] == pytest.approx(0.95) and moms[44] == pytest.approx(0.85) and moms[99] == pytest.approx(0.95)
    assert opt.param_groups[0]["betas"][1] == 0.999


def test_one_cycle_no_momentum_cycling():
    opt = _sgd(momentum=0.9)
    sched = one_cycle(opt, CYCLE.replace(cycle_momentum=False), total_steps=50)
    _, moms = _trace(opt, sched, 50)
    assert all(m == 0.9 for m in moms)


def test_one_cycle_needs_three_steps():
    with pytest.raises(ValueError, match="total_steps"):
        one_cycle(_sgd(), CYCLE, total_steps=2)


@pytest.mark.parametrize(("total", "cycle_frac"), [(4, 0.5), (20, 0.1), (200, 0.01), (10, 0.15)])
def test_one_cycle_degenerate_cycle_refused(total, cycle_frac):
    # a 2-step cycle used to crash inside OneCycleLR with ZeroDivisionError
    with pytest.raises(ValueError, match="cycle_frac"):
        one_cycle(_sgd(), CYCLE.replace(cycle_frac=cycle_frac), total_steps=total)


def test_one_cycle_shortest_valid_cycle():
    opt = _sgd()
    lrs, _ = _trace(opt, one_cycle(opt, CYCLE.replace(cycle_frac=0.5), total_steps=5), 5)
    assert lrs[0] == pytest.approx(0.25) and lrs[-1] == pytest.approx(0.25e-3)
    assert all(0 < lr <= 1.0 for lr in lrs)


@pytest.mark.parametrize(("epochs", "cycle_frac", "peak", "cycle_end", "first_report"), [
    (4, 0.9, 1.8, 3.6, 2),  # digits: peak inside epoch 2, whose report is already past it
    (5, 0.8, 2.0, 4.0, 3),  # peak exactly at the end of epoch 2: that report is *at* the peak, not after
    (30, 0.9, 13.5, 27.0, 14),
    (1, 1.0, 0.5, 1.0, 1),  # no annihilation; the only report comes after the peak
    (2, 1.0, 1.0, 2.0, 2),
])
def test_one_cycle_phases_exact(epochs, cycle_frac, peak, cycle_end, first_report):
    cfg = TrainConfig(epochs=epochs).with_flat(cycle_frac=cycle_frac)
    ph = one_cycle_phases(cfg)
    assert (ph.epochs, ph.cycle_frac) == (epochs, cycle_frac)
    assert ph.peak == peak and ph.cycle_end == cycle_end and ph.annihilation_start == cycle_end
    assert ph.first_report_after_peak == first_report <= epochs


def test_one_cycle_phase_steps_are_where_torch_turns():
    # CYCLE over 4 epochs of 25 steps: the T = 100 run of test_one_cycle_phase_boundaries_exact
    ph = one_cycle_phases(TrainConfig(epochs=4, onecycle=CYCLE))
    assert ph.peak_step(25) == 44.0 and ph.cycle_end_step(25) == 88.0
    opt = _sgd()
    lrs, moms = _trace(opt, one_cycle(opt, CYCLE, total_steps=100), 100)
    assert lrs[44] == pytest.approx(CYCLE.max_lr, rel=1e-12) and moms[44] == pytest.approx(CYCLE.min_momentum)
    assert lrs[88] == pytest.approx(CYCLE.min_lr, rel=1e-12) and all(lr < CYCLE.min_lr for lr in lrs[89:])
    # the step trained at max_lr is in epoch 2 (steps 25..49), the epoch `first_report_after_peak` names
    assert 44 // 25 + 1 == ph.first_report_after_peak == 2
    # a cycle whose turns fall between steps: torch's end steps are the same fractional values
    odd = one_cycle_phases(TrainConfig(epochs=3, onecycle=CYCLE))
    sched = one_cycle(_sgd(), CYCLE, total_steps=3 * 7)
    assert [p["end_step"] for p in sched._schedule_phases[:2]] == [odd.peak_step(7), odd.cycle_end_step(7)]
    assert odd.peak_step(7) == pytest.approx(8.45) and odd.cycle_end_step(7) == pytest.approx(16.9)


# -- piecewise ----------------------------------------------------------------------------------

def test_piecewise_milestones_and_gamma():
    opt = _sgd(lr=123.0)  # the schedule must override the optimizer's LR with cfg.lr
    cfg = BaselineConfig(lr=0.35, milestones_frac=(0.625, 0.875), gamma=0.1)  # the paper: 50k/70k of 80k
    sched = piecewise(opt, cfg, total_steps=80)
    assert isinstance(sched, MultiStepLR)
    lrs, _ = _trace(opt, sched, 80)
    assert lrs[0] == 0.35 and lrs[49] == 0.35
    assert lrs[50] == pytest.approx(0.035, rel=1e-12) and lrs[69] == pytest.approx(0.035, rel=1e-12)
    assert lrs[70] == pytest.approx(0.0035, rel=1e-12) and lrs[79] == pytest.approx(0.0035, rel=1e-12)
    assert len(set(lrs)) == 3


# -- CLR ----------------------------------------------------------------------------------------

def _clr_lrs(mode, n, *, spe=5, step_epochs=2.0):
    opt = _sgd(lr=7.0)
    cfg = BaselineConfig(lr=0.1, clr_max_lr=1.0, clr_step_epochs=step_epochs, clr_mode=mode)
    sched = clr(opt, cfg, steps_per_epoch=spe)
    assert isinstance(sched, CyclicLR)
    return _trace(opt, sched, n)


def test_clr_triangular_values():
    lrs, moms = _clr_lrs("triangular", 41)  # stepsize = 2 epochs * 5 = 10 iterations
    assert lrs[0] == pytest.approx(0.1, rel=1e-12)
    assert lrs[5] == pytest.approx(0.55, rel=1e-12)
    assert lrs[10] == pytest.approx(1.0, rel=1e-12)
    assert lrs[15] == pytest.approx(0.55, rel=1e-12)
    assert lrs[20] == pytest.approx(0.1, rel=1e-12)
    assert lrs[30] == pytest.approx(1.0, rel=1e-12)  # second cycle, same amplitude
    assert lrs[40] == pytest.approx(0.1, rel=1e-12)
    for it, lr in enumerate(lrs):  # Smith's formula (METHOD.md section 1)
        cycle = math.floor(1 + it / 20)
        x = abs(it / 10 - 2 * cycle + 1)
        assert lr == pytest.approx(0.1 + 0.9 * max(0.0, 1 - x), rel=1e-12)
    assert all(m == 0.9 for m in moms)  # momentum fixed under CLR


def test_clr_triangular2_halves_amplitude():
    lrs, _ = _clr_lrs("triangular2", 61)
    assert lrs[10] == pytest.approx(1.0, rel=1e-12)
    assert lrs[20] == pytest.approx(0.1, rel=1e-12)
    assert lrs[30] == pytest.approx(0.1 + 0.9 / 2, rel=1e-12)
    assert lrs[50] == pytest.approx(0.1 + 0.9 / 4, rel=1e-12)


def test_clr_stepsize_rounds_epochs():
    lrs, _ = _clr_lrs("triangular", 8, spe=3, step_epochs=1.5)  # round(4.5) = 4 (banker's) iterations
    assert lrs[4] == pytest.approx(1.0, rel=1e-12)


# -- range ramps --------------------------------------------------------------------------------

def test_range_ramp_linear_from_zero():
    opt = _sgd(lr=5.0)
    sched = range_ramp(opt, start_lr=0.0, end_lr=3.0, num_iter=301)
    assert isinstance(sched, LambdaLR)
    lrs, _ = _trace(opt, sched, 305)
    assert lrs[0] == 0.0
    for i in range(301):
        assert lrs[i] == pytest.approx(0.01 * i, rel=1e-12, abs=1e-15)
    assert lrs[300] == pytest.approx(3.0, rel=1e-12)
    assert lrs[301:] == [lrs[300]] * 4  # held at end_lr past the end


def test_range_ramp_exp_exact():
    opt = _sgd()
    sched = range_ramp(opt, start_lr=1e-5, end_lr=10.0, num_iter=13, step_mode="exp")
    lrs, _ = _trace(opt, sched, 13)
    assert lrs[0] == pytest.approx(1e-5, rel=1e-12)
    assert lrs[6] == pytest.approx(math.sqrt(1e-5 * 10.0), rel=1e-12)
    assert lrs[12] == pytest.approx(10.0, rel=1e-12)
    ratios = [b / a for a, b in itertools.pairwise(lrs)]
    assert all(r == pytest.approx(1e6 ** (1 / 12), rel=1e-10) for r in ratios)


def test_range_ramp_replaces_a_previous_schedulers_base():
    opt = _sgd()
    one_cycle(opt, CYCLE, total_steps=20)  # leaves initial_lr in the groups
    sched = range_ramp(opt, start_lr=0.0, end_lr=2.0, num_iter=11)
    lrs, _ = _trace(opt, sched, 11)
    assert lrs[5] == pytest.approx(1.0, rel=1e-12) and lrs[10] == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"start_lr": 0.0, "end_lr": 1.0, "num_iter": 1}, "num_iter"),
        ({"start_lr": 0.0, "end_lr": 1.0, "num_iter": 10, "step_mode": "exp"}, "start_lr"),
        ({"start_lr": 0.0, "end_lr": 1.0, "num_iter": 10, "step_mode": "cos"}, "step_mode"),
    ],
)
def test_range_ramp_guards(kw, match):
    with pytest.raises(ValueError, match=match):
        range_ramp(_sgd(), **kw)


# -- constant, dispatch, momentum ---------------------------------------------------------------

def test_constant():
    opt = _sgd(lr=9.0)
    lrs, _ = _trace(opt, constant(opt, BaselineConfig(lr=0.3)), 10)
    assert lrs == [0.3] * 10


@pytest.mark.parametrize(
    ("schedule", "cls"),
    [("onecycle", OneCycleLR), ("piecewise", MultiStepLR), ("clr", CyclicLR), ("constant", ConstantLR)],
)
def test_build_schedule_dispatch(schedule, cls):
    cfg = TrainConfig.from_dict({"schedule": schedule, "epochs": 4,
                                 "onecycle": {"max_lr": 2.0}, "baseline": {"lr": 0.2}})
    opt = _sgd()
    sched = build_schedule(opt, cfg, steps_per_epoch=10)
    assert type(sched) is cls
    lrs, _ = _trace(opt, sched, 40)
    if schedule == "onecycle":
        assert sched.total_steps == 40
        # the default div_factor 10 (one-cycle's max/10) and annihilation x1000
        assert lrs[0] == pytest.approx(0.2, rel=1e-9) and lrs[17] == pytest.approx(2.0, rel=1e-9)
        assert lrs[39] == pytest.approx(0.2 / 1000, rel=1e-9)
    elif schedule == "piecewise":
        assert lrs[0] == 0.2 and lrs[-1] == pytest.approx(0.002, rel=1e-12)
    elif schedule == "clr":
        assert lrs[0] == pytest.approx(0.2) and max(lrs) <= 1.0 + 1e-12
        assert lrs[20] == pytest.approx(0.2 + 0.8 * 0.5, rel=1e-9)  # stepsize 4 epochs = 40 iterations
    else:
        assert lrs == [0.2] * 40


def test_current_momentum():
    assert current_momentum(_sgd(momentum=0.7)) == 0.7
    assert current_momentum(_adamw()) == 0.9
    assert math.isnan(current_momentum(torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))])))


def test_a_schedule_is_named_alike_in_the_table_the_config_and_autofill():
    """schedules.SCHEDULES is where a schedule is built; the config checks names without torch and autofill
    knows what each reads: a schedule added to one and not the others fails here."""
    from types import SimpleNamespace

    from sctune.core.config import SCHEDULE_NAMES
    from sctune.core.schedules import SCHEDULES
    from sctune.service.autofill import SCHEDULE_PARAMS

    assert set(SCHEDULES) == set(SCHEDULE_NAMES) == set(SCHEDULE_PARAMS)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule(_sgd(), SimpleNamespace(schedule="cosine"), steps_per_epoch=10)
