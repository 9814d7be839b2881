"""Learning-rate schedules, all stepped once per iteration, all built on torch's schedulers.

* ``one_cycle``: Smith's 1cycle (METHOD.md section 3) is exactly torch's ``OneCycleLR`` with
  ``three_phase=True, anneal_strategy="linear"``: min -> max over ``cycle_frac/2`` of the steps,
  max -> min over the next ``cycle_frac/2``, then annihilation min -> min/annihilation_factor. Momentum
  moves opposite to the LR (0.95 -> 0.85 -> 0.95), Adam's beta1 included. ``one_cycle_phases`` says
  where a run's cycle turns (peak, end of cycle / start of annihilation), as data.
* ``piecewise``: the paper's baseline, LR x gamma at fixed fractions of the run (``MultiStepLR``).
* ``clr``: cyclical LR, triangular and its variants (``CyclicLR``, Smith 1506.01186).
* ``range_ramp``: the LR range test's linear (Smith) or exponential sweep (``LambdaLR``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CyclicLR, LambdaLR, LRScheduler, MultiStepLR, OneCycleLR

from .config import BaselineConfig, OneCycleConfig, TrainConfig


def linear_ramp(start: float, end: float, pos: float) -> float:
    """Value at ``pos`` in [0, 1] on a straight line from start to end."""
    return start + (end - start) * pos


def exp_ramp(start: float, end: float, pos: float) -> float:
    """Value at ``pos`` in [0, 1] on a geometric path from start to end (both > 0)."""
    return start * (end / start) ** pos


def _set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group.pop("initial_lr", None)  # a fresh scheduler must take this lr as its base


def range_ramp(optimizer: Optimizer, *, start_lr: float, end_lr: float, num_iter: int,
               step_mode: str = "linear") -> LambdaLR:
    """LR at step i (0-based) goes from start_lr (i = 0) to end_lr (i = num_iter - 1)."""
    if num_iter < 2:
        raise ValueError(f"num_iter must be >= 2 for a ramp, got {num_iter}")
    if step_mode not in ("linear", "exp"):
        raise ValueError(f"step_mode must be 'linear' or 'exp', got {step_mode!r}")
    if step_mode == "exp" and start_lr <= 0:
        raise ValueError(f"step_mode 'exp' needs start_lr > 0, got {start_lr}")
    ramp = linear_ramp if step_mode == "linear" else exp_ramp
    last = num_iter - 1
    _set_lr(optimizer, end_lr)
    # LambdaLR multiplies the base LR (end_lr) by the factor; steps past the end hold end_lr.
    return LambdaLR(optimizer, lambda i: ramp(start_lr, end_lr, min(i, last) / last) / end_lr)


def one_cycle(optimizer: Optimizer, cfg: OneCycleConfig, *, total_steps: int) -> OneCycleLR:
    """Smith's 1cycle: one linear cycle over cfg.cycle_frac of the steps, then annihilation."""
    if total_steps < 3:
        raise ValueError(f"one_cycle needs total_steps >= 3, got {total_steps}")
    if cfg.cycle_frac * total_steps <= 2 + 1e-9:
        # torch's phases end at pct*T - 1 and 2*pct*T - 2: a cycle of <= 2 steps has empty phases
        # (exactly 2 steps divides by zero inside OneCycleLR).
        raise ValueError(f"one_cycle needs cycle_frac x total_steps > 2 steps, got {cfg.cycle_frac} x {total_steps}")
    return OneCycleLR(
        optimizer,
        max_lr=cfg.max_lr,
        total_steps=total_steps,
        pct_start=cfg.cycle_frac / 2,
        anneal_strategy="linear",
        three_phase=True,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.annihilation_factor,
        cycle_momentum=cfg.cycle_momentum,
        base_momentum=cfg.min_momentum,
        max_momentum=cfg.max_momentum,
    )


@dataclass(frozen=True)
class OneCyclePhases:
    """Where a run's 1cycle turns, in epochs of training done (1.8 = four fifths of the way through epoch 2).

    A trial reports at the end of each epoch (epoch e ends at e), so ``first_report_after_peak`` is the first
    report taken after the LR peak: the earliest point at which trials of different max_lr are compared past
    their high-LR dip. (ASHA's rungs are on ``schedule_phase``'s axis instead, by default at
    ``PHASE_CYCLE_END``: see ``plan.asha_rungs``.)
    """

    epochs: int
    cycle_frac: float
    peak: float  # LR at max_lr, momentum at its minimum: cycle_frac / 2 x epochs
    cycle_end: float  # LR back at min_lr (cycle_frac x epochs); annihilation runs from here to `epochs`
    first_report_after_peak: int  # floor(peak) + 1: epoch `peak` itself still reports at the peak

    @property
    def annihilation_start(self) -> float:
        """Three-phase 1cycle starts annihilating where the cycle ends: ``cycle_end``."""
        return self.cycle_end

    def peak_step(self, steps_per_epoch: int) -> float:
        """0-based index of the step trained at max_lr by ``one_cycle``: torch's ``pct_start x T - 1``
        (T = epochs x steps_per_epoch). Not whole when ``cycle_frac / 2 x T`` is not: the LR then peaks just
        below max_lr on the steps either side."""
        return float(self.cycle_frac / 2 * (self.epochs * steps_per_epoch)) - 1

    def cycle_end_step(self, steps_per_epoch: int) -> float:
        """0-based index of the step back at min_lr, where annihilation starts: torch's ``2 x pct_start x T - 2``
        (its down phase ends one step before cycle_frac x T, so the cycle is a symmetric triangle)."""
        return float(2 * (self.cycle_frac / 2) * (self.epochs * steps_per_epoch)) - 2


def one_cycle_phases(cfg: TrainConfig) -> OneCyclePhases:
    """The phase boundaries of ``cfg``'s 1cycle: ``cfg.onecycle.cycle_frac`` of ``cfg.epochs`` in the cycle."""
    cycle_frac, epochs = cfg.onecycle.cycle_frac, cfg.epochs
    peak = cycle_frac / 2 * epochs
    return OneCyclePhases(epochs=epochs, cycle_frac=cycle_frac, peak=peak, cycle_end=cycle_frac * epochs,
                          first_report_after_peak=math.floor(peak) + 1)


def piecewise(optimizer: Optimizer, cfg: BaselineConfig, *, total_steps: int) -> MultiStepLR:
    """The paper's step baseline: lr, then x gamma at each milestone fraction of the run."""
    _set_lr(optimizer, cfg.lr)
    milestones = sorted({max(1, round(f * total_steps)) for f in cfg.milestones_frac})
    return MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)


def clr(optimizer: Optimizer, cfg: BaselineConfig, *, steps_per_epoch: int) -> CyclicLR:
    """Cyclical LR between cfg.lr and cfg.clr_max_lr, stepsize = clr_step_epochs epochs."""
    step = max(1, round(cfg.clr_step_epochs * steps_per_epoch))
    _set_lr(optimizer, cfg.lr)
    return CyclicLR(optimizer, base_lr=cfg.lr, max_lr=cfg.clr_max_lr, step_size_up=step,
                    mode=cfg.clr_mode, gamma=0.99994, cycle_momentum=False)


def constant(optimizer: Optimizer, cfg: BaselineConfig) -> ConstantLR:
    _set_lr(optimizer, cfg.lr)
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


def _one_cycle(optimizer: Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    return one_cycle(optimizer, cfg.onecycle, total_steps=cfg.epochs * steps_per_epoch)


def _piecewise(optimizer: Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    return piecewise(optimizer, cfg.baseline, total_steps=cfg.epochs * steps_per_epoch)


def _clr(optimizer: Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    return clr(optimizer, cfg.baseline, steps_per_epoch=steps_per_epoch)


def _constant(optimizer: Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    return constant(optimizer, cfg.baseline)


# The schedules, by the name ``TrainConfig.schedule`` gives: each builds torch's scheduler for an optimizer,
# the config and the iterations of an epoch. A new schedule is one entry here (its name also goes to
# ``config.SCHEDULE_NAMES``, read without torch to check a space file, and what it reads to
# ``autofill.SCHEDULE_PARAMS``; tests/test_schedules.py checks the three agree).
SCHEDULES: dict[str, Callable[[Optimizer, TrainConfig, int], LRScheduler]] = {
    "onecycle": _one_cycle,
    "piecewise": _piecewise,
    "clr": _clr,
    "constant": _constant,
}


def build_schedule(optimizer: Optimizer, cfg: TrainConfig, *, steps_per_epoch: int) -> LRScheduler:
    """The schedule named by ``cfg.schedule`` (``SCHEDULES``) over ``cfg.epochs * steps_per_epoch`` steps."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    return SCHEDULES[cfg.schedule](optimizer, cfg, steps_per_epoch)


# ``schedule_phase``'s landmarks: the LR peak, the cycle's end (min LR), the run's end (after annihilation)
PHASE_PEAK, PHASE_CYCLE_END, PHASE_RUN_END = 1.0, 2.0, 3.0


def schedule_phase(cfg: TrainConfig, progress: float) -> float:
    """Where a run is in its own schedule, phase-normalised: 0 start, 1 LR peak, 2 end of the cycle,
    3 end of the run (annihilation); linear in iterations within each part.

    Two one-cycle runs at the same phase are at the same point of their schedules whatever their
    ``cycle_frac``: pruning compares trials at equal phase (``time_attr`` of sctune's ASHA). Schedules
    other than one-cycle have no cycle; their phase is ``3 x progress``.
    """
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule != "onecycle":
        return PHASE_RUN_END * p
    c = cfg.onecycle.cycle_frac
    if p <= c:
        return PHASE_CYCLE_END * p / c
    return PHASE_CYCLE_END + (PHASE_RUN_END - PHASE_CYCLE_END) * (p - c) / (1.0 - c)


def current_momentum(optimizer: Optimizer) -> float:
    """Momentum (SGD) or beta1 (Adam/AdamW) of the first param group; NaN when it has neither."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return float(group["betas"][0])
    return float(group.get("momentum", math.nan))
