"""Schedule-aware pruning: ASHA must not kill good one-cycle trials for their high-LR dip.

During 1cycle's rising phase accuracy dips the more, the larger the LR - exactly the trials
super-convergence needs. sctune places ASHA's first rung one epoch past the latest LR peak any
trial can have (``space.rung_grace_period``). These tests drive Ray's own ASHA bracket with
per-epoch validation accuracies and compare that placement with a naive first rung at epoch 1.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from sctune.space import load_space, parse_space, rung_grace_period

REPO = Path(__file__).resolve().parent.parent

# Per-epoch val/acc of one-cycle runs on MNIST-1D (mnist1d_cnn, 20 epochs, batch 128, div_factor 4,
# seed 0), recorded with sctune.train.fit; the larger max_lr dips early and finishes best.
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


def survivors(histories: dict[str, list[float]], *, grace: int, max_t: int, rf: float = 2) -> set[str]:
    """Trials ASHA lets finish, results arriving epoch by epoch, trials in the order given."""
    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
    alive = set(histories)
    for epoch in range(1, max_t + 1):
        for name, accs in histories.items():
            if name not in alive:
                continue
            action = bracket.on_result(SimpleNamespace(trial_id=name), epoch, accs[epoch - 1])
            if action == TrialScheduler.STOP:
                alive.discard(name)
    return alive


def test_grace_period_is_past_every_possible_lr_peak():
    spec = load_space(REPO / "search_spaces" / "digits.yaml")
    grace = rung_grace_period(spec, spec.space)
    epochs = spec.base.epochs
    hi = spec.space["cycle_frac"].high
    assert grace > hi / 2 * epochs  # after the peak of the longest cycle
    assert grace <= epochs


def test_explicit_grace_period_wins():
    spec = parse_space({"task": {}, "search": {"grace_period": 2}, "fixed": {"epochs": 10}})
    assert rung_grace_period(spec, spec.space) == 2


def test_grace_period_without_searched_cycle_uses_fixed_cycle_frac():
    spec = parse_space({"task": {}, "fixed": {"epochs": 20, "cycle_frac": 0.5}})
    assert rung_grace_period(spec, spec.space) == 6  # peak at epoch 5


def test_naive_rungs_prune_the_eventual_winner_schedule_aware_rungs_keep_it():
    epochs = 20
    spec = parse_space({"task": {"dataset": "mnist1d", "model": "mnist1d_cnn"}, "fixed": {"epochs": epochs},
                        "space": {"cycle_frac": {"low": 0.75, "high": 0.9}}})
    grace = rung_grace_period(spec, spec.space)
    winner = max(MNIST1D_HISTORIES, key=lambda k: MNIST1D_HISTORIES[k][-1])
    assert winner == "max_lr=0.3"
    naive = survivors(MNIST1D_HISTORIES, grace=1, max_t=epochs)
    aware = survivors(MNIST1D_HISTORIES, grace=grace, max_t=epochs)
    assert winner not in naive  # its dip at epoch 2 (0.510 < 0.633) gets it killed
    assert winner in aware
    # the late rung still prunes: the two trials that never recover from max_lr=2 stop there
    assert "max_lr=2.0" not in aware and "max_lr=2.0,wd=1e-5" not in aware
    saved = sum(epochs - grace for k in MNIST1D_HISTORIES if k not in aware)
    assert saved > 0
