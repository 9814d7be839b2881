"""Schedule-aware pruning: ASHA compares one-cycle trials only where they are in the same phase.

During 1cycle's rising phase accuracy dips the more, the larger the LR - exactly the trials
super-convergence needs - and trials with different ``cycle_frac`` are in different phases at the same
epoch. sctune's trials report ``phase`` (0 start, 1 LR peak, 2 end of the cycle, 3 end of the run) and
ASHA's first rung sits at the end of every trial's cycle (``plan.asha_rungs``). These tests drive Ray's
own ASHA bracket with recorded per-epoch validation accuracies.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from sctune.core.config import TrainConfig
from sctune.core.schedules import build_schedule, schedule_phase
from sctune.core.train import tail_mean
from sctune.service.plan import asha_rungs
from sctune.service.space import load_space, parse_space

REPO = Path(__file__).resolve().parent.parent

# Per-epoch val/acc of one-cycle runs on MNIST-1D (mnist1d_cnn, 20 epochs, batch 128, div_factor 4,
# seed 0), recorded with sctune.core.train.fit; the larger max_lr dips early and finishes best.
MNIST1D_HISTORIES = {
    "max_lr=0.05": [0.358, 0.633, 0.678, 0.690, 0.677, 0.797, 0.892, 0.897, 0.880, 0.897, 0.897, 0.918, 0.925,
                    0.938, 0.935, 0.927, 0.920, 0.933, 0.940, 0.943],
    "max_lr=0.05,wd=1e-5": [0.358, 0.630, 0.668, 0.715, 0.717, 0.777, 0.880, 0.898, 0.877, 0.895, 0.917, 0.922,
                            0.922, 0.937, 0.938, 0.923, 0.930, 0.928, 0.932, 0.940],
    "max_lr=0.3": [0.565, 0.510, 0.758, 0.803, 0.860, 0.815, 0.870, 0.918, 0.902, 0.918, 0.910, 0.932, 0.905,
                   0.917, 0.925, 0.928, 0.940, 0.950, 0.950, 0.955],
    "max_lr=1.0": [0.283, 0.467, 0.513, 0.742, 0.695, 0.723, 0.743, 0.840, 0.863, 0.847, 0.880, 0.878, 0.897,
                   0.922, 0.908, 0.923, 0.925, 0.915, 0.948, 0.940],
    "max_lr=2.0": [0.327, 0.307, 0.158, 0.310, 0.285, 0.302, 0.292, 0.100, 0.100, 0.103, 0.100, 0.100, 0.098,
                   0.100, 0.098, 0.103, 0.098, 0.098, 0.100, 0.102],
    "max_lr=2.0,wd=1e-5": [0.318, 0.327, 0.397, 0.465, 0.402, 0.322, 0.493, 0.428, 0.540, 0.533, 0.465, 0.548,
                           0.503, 0.547, 0.607, 0.602, 0.600, 0.640, 0.678, 0.720],
}


# Per-epoch val/acc with precise BatchNorm (sctune.core.train.fit as the trials run it: statistics recomputed
# before every evaluation) of ten points of the shipped MNIST-1D space (mnist1d_cnn, 20 epochs, batch 128,
# div_factor 4, seed 0, 600 validation signals), recorded with sctune.core.train.fit on 2026-11-29.
MNIST1D_PRECISE_BN = {  # name: (cycle_frac, per-epoch val/acc)
    "max_lr=1.1,cycle_frac=0.9,wd=0.0001": (0.9, [0.4083, 0.5467, 0.605, 0.5333, 0.595, 0.725, 0.7167, 0.69, 0.72, 0.665, 0.8017, 0.8167, 0.81, 0.8683, 0.87, 0.89, 0.8967, 0.895, 0.93, 0.9383]),
    "max_lr=0.3,cycle_frac=0.75,wd=0.0001,dropout=0.1": (0.75, [0.5367, 0.7167, 0.8483, 0.8717, 0.9067, 0.8733, 0.9167, 0.9333, 0.92, 0.935, 0.9333, 0.9317, 0.94, 0.9367, 0.94, 0.9417, 0.935, 0.945, 0.95, 0.9567]),
    "max_lr=0.5,cycle_frac=0.95,wd=0.0001,dropout=0.2": (0.95, [0.4533, 0.61, 0.7483, 0.8333, 0.8417, 0.87, 0.7967, 0.9233, 0.9167, 0.9217, 0.9283, 0.95, 0.9467, 0.9117, 0.9467, 0.945, 0.9483, 0.9483, 0.965, 0.9533]),
    "max_lr=0.15,cycle_frac=0.8,wd=1e-05": (0.8, [0.53, 0.715, 0.8017, 0.835, 0.8617, 0.8783, 0.915, 0.9233, 0.9217, 0.94, 0.945, 0.94, 0.935, 0.9517, 0.9467, 0.9433, 0.9417, 0.945, 0.9483, 0.9517]),
    "max_lr=2,cycle_frac=0.9,wd=1e-05": (0.9, [0.3167, 0.3667, 0.445, 0.5333, 0.3733, 0.4517, 0.56, 0.58, 0.4183, 0.4583, 0.425, 0.505, 0.4617, 0.485, 0.265, 0.2883, 0.3083, 0.2533, 0.3367, 0.305]),
    "max_lr=3,cycle_frac=0.95,wd=0.0001": (0.95, [0.2733, 0.2083, 0.2517, 0.2633, 0.1617, 0.1667, 0.17, 0.1, 0.1, 0.0983, 0.1033, 0.0983, 0.1, 0.0983, 0.1, 0.1, 0.1, 0.1033, 0.1017, 0.0983]),
    "max_lr=0.6,cycle_frac=0.75,wd=0.001": (0.75, [0.5117, 0.6767, 0.785, 0.8467, 0.8067, 0.9033, 0.8917, 0.915, 0.8583, 0.8917, 0.8983, 0.9033, 0.91, 0.9333, 0.945, 0.9433, 0.9567, 0.9583, 0.9633, 0.9617]),
    "max_lr=0.11,cycle_frac=0.95,wd=1e-06": (0.95, [0.4817, 0.6517, 0.77, 0.845, 0.8583, 0.8633, 0.9017, 0.9267, 0.9383, 0.9433, 0.9483, 0.9433, 0.935, 0.9483, 0.945, 0.955, 0.9533, 0.9483, 0.9533, 0.955]),
    "max_lr=1,cycle_frac=0.8,wd=0.001,dropout=0.3": (0.8, [0.3767, 0.4783, 0.54, 0.62, 0.6317, 0.72, 0.67, 0.6017, 0.7383, 0.7167, 0.68, 0.705, 0.7217, 0.61, 0.735, 0.7817, 0.81, 0.8267, 0.875, 0.8817]),
    "max_lr=0.4,cycle_frac=0.85,wd=3e-05,dropout=0.15": (0.85, [0.53, 0.7233, 0.785, 0.8283, 0.875, 0.8833, 0.8917, 0.9283, 0.9217, 0.935, 0.9383, 0.9433, 0.935, 0.9467, 0.945, 0.93, 0.945, 0.9483, 0.95, 0.9533]),
}


def survivors(histories: dict[str, list[float]], *, grace: float, max_t: float, rf: float = 2,
              time=lambda name, epoch: epoch, order: list[str] | None = None) -> tuple[set[str], int]:
    """Trials ASHA lets finish, results arriving epoch by epoch in ``order``; and the epochs run in all."""
    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
    alive, ran = set(histories), {}
    epochs = len(next(iter(histories.values())))
    for epoch in range(1, epochs + 1):
        for name in order or histories:
            if name not in alive:
                continue
            ran[name] = epoch
            action = bracket.on_result(SimpleNamespace(trial_id=name), time(name, epoch), histories[name][epoch - 1])
            if action == TrialScheduler.STOP:
                alive.discard(name)
    return alive, sum(ran.values())


def test_rungs_sit_at_the_end_of_every_cycle_by_default():
    spec = load_space(REPO / "search_spaces" / "digits.yaml")
    assert asha_rungs(spec) == {"time_attr": "phase", "grace_period": 2.0, "max_t": 3.0}


def test_explicit_grace_period_restores_epoch_rungs():
    spec = parse_space({"task": {}, "search": {"grace_period": 2}, "fixed": {"epochs": 10}})
    assert asha_rungs(spec) == {"time_attr": "epoch", "grace_period": 2, "max_t": 10}


@pytest.mark.parametrize("cycle_frac", [0.75, 0.9, 0.95])
def test_phase_follows_the_real_one_cycle_schedule(cycle_frac):
    """Phase 1 is the LR peak, 2 the cycle's end (LR back at min), in torch's OneCycleLR as sctune builds it."""
    cfg = TrainConfig().with_flat(epochs=20, cycle_frac=cycle_frac, max_lr=1.0, div_factor=4.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    spe = 10
    sched = build_schedule(opt, cfg, steps_per_epoch=spe)
    total = cfg.epochs * spe
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # torch ends its phases a step or two before pct x total (OneCycleLR: pct*T - 1, 2*pct*T - 2): allow 2.5
    # steps of the steepest slope (the cycle's, or the annihilation's when that is short)
    tol = 2.5 * max(0.75 / (cycle_frac * total / 2), 0.25 / ((1 - cycle_frac) * total))
    for step, lr in enumerate(lrs):
        phase = schedule_phase(cfg, step / total)
        if phase <= 1:
            expected = 0.25 + 0.75 * phase
        elif phase <= 2:
            expected = 1.0 - 0.75 * (phase - 1)
        else:
            continue  # annihilation: below min_lr, checked below
        assert lr == pytest.approx(expected, abs=tol), (step, phase)
    after = [lr for step, lr in enumerate(lrs) if schedule_phase(cfg, step / total) > 2]
    assert all(lr <= 0.25 + 1e-9 for lr in after)
    assert schedule_phase(cfg, 1.0) == 3.0
    # equal phase = equal place in the schedule, whatever the cycle length: cycle end at epoch 15 vs 19
    assert schedule_phase(cfg, cycle_frac) == pytest.approx(2.0)


PHASES = {name: [schedule_phase(TrainConfig().with_flat(epochs=20, cycle_frac=cf), e / 20) for e in range(21)]
          for name, (cf, _) in MNIST1D_PRECISE_BN.items()}


def _phase_time(name: str, epoch: int) -> float:
    return PHASES[name][epoch]


def test_end_of_cycle_rungs_keep_the_eventual_winner_and_still_save_compute():
    histories = {k: v for k, (_, v) in MNIST1D_PRECISE_BN.items()}
    # the eventual winner by the selection score (mean of the last 3 evaluations)
    winner = max(histories, key=lambda k: tail_mean(histories[k], 3))
    assert winner == "max_lr=0.6,cycle_frac=0.75,wd=0.001"  # 7th of 10 at its LR peak, first only at the end
    full = 20 * len(histories)
    names = list(histories)
    peak_losses = 0
    for seed in range(50):  # ASHA is asynchronous: the order results arrive in decides the cut-offs
        order = random.Random(seed).sample(names, len(names))
        alive, ran = survivors(histories, grace=2.0, max_t=3.0, time=_phase_time, order=order)
        assert winner in alive, order
        assert ran < full  # it still prunes: the runs that never recover from max_lr 2-3 stop at their cycle end
        assert not {"max_lr=2,cycle_frac=0.9,wd=1e-05", "max_lr=3,cycle_frac=0.95,wd=0.0001"} & alive
        # comparing at the LR peak instead (same phase, but mid-cycle) loses the winner in some orders
        alive_peak, _ = survivors(histories, grace=1.0, max_t=3.0, time=_phase_time, order=order)
        peak_losses += winner not in alive_peak
    assert peak_losses > 0


def test_naive_epoch_rungs_prune_the_eventual_winner():
    # recorded with running BatchNorm statistics, all at cycle_frac 0.9: a first rung at epoch 1 kills the
    # winner (max_lr 0.3 dips at epoch 2: 0.510 < 0.633); the end-of-cycle rung keeps it
    winner = max(MNIST1D_HISTORIES, key=lambda k: MNIST1D_HISTORIES[k][-1])
    assert winner == "max_lr=0.3"
    assert winner not in survivors(MNIST1D_HISTORIES, grace=1, max_t=20)[0]
    cfg = TrainConfig().with_flat(epochs=20, cycle_frac=0.9)
    alive, ran = survivors(MNIST1D_HISTORIES, grace=2.0, max_t=3.0, time=lambda n, e: schedule_phase(cfg, e / 20))
    assert winner in alive and "max_lr=2.0" not in alive and ran < 20 * len(MNIST1D_HISTORIES)
