"""Tests for sctune.core.loss_bounds (the loss-based LR finders) on synthetic loss curves of known shape."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sctune.core.loss_bounds import (
    longest_decreasing,
    smooth,
    suggest_divergence,
    suggest_steepest,
    suggest_valley,
)

LR = np.linspace(0.0, 3.0, 61)  # Smith's linear sweep 0 -> 3.0; grid step 0.05


# ------------------------------------------------------------------------------------------------ smooth
def test_smooth_is_centered_mean_with_partial_edges():
    out = smooth([0.0, 0.0, 3.0, 0.0, 0.0], window=3)
    np.testing.assert_allclose(out, [0.0, 1.0, 1.0, 1.0, 0.0])
    # min_periods=1: the first point of a window-5 mean averages points 0..2 only
    np.testing.assert_allclose(smooth([3.0, 0.0, 0.0, 6.0], window=5)[:2], [1.0, 2.25])


def test_smooth_rejects_bad_window():
    with pytest.raises(ValueError, match="window"):
        smooth([1.0, 2.0], window=0)


# ------------------------------------------------------------------------------------------------ loss methods
X = np.linspace(-4.0, 1.0, 101)  # log10(lr), 0.05-decade grid (an exponential sweep)
LR_EXP = 10.0 ** X
# U-shape vs log-lr: sigmoid descent steepest at log10(lr) = -2 (symmetric, so smoothing keeps it there),
# minimum near -0.5, then a quadratic climb to ~11.5 at LR 10.
LOSS_U = 2.3 - 2.0 / (1.0 + np.exp(-3.0 * (X + 2.0))) + 5.0 * np.maximum(0.0, X + 0.5) ** 2


def test_steepest_on_u_shaped_loss():
    b = suggest_steepest(LR_EXP, LOSS_U)
    assert b.status == "ok" and b.method == "steepest"
    assert b.max_lr == pytest.approx(0.01, rel=1e-9)
    assert b.min_lr == pytest.approx(0.0025, rel=1e-9)
    assert b.peak_acc is None and b.verdict is None


def test_steepest_on_a_noisy_linear_sweep():
    # Smith's linear sweep crowds the points at high LR in log10(lr); a point-to-point gradient of the noisy
    # loss then finds its "steepest" slope in the noise near LR 2.5. The true steepest point is LR 0.1.
    lr = np.linspace(0.0, 3.0, 301)[1:]
    x = np.log10(lr)
    loss = 2.3 - 2.0 / (1.0 + np.exp(-3.0 * (x + 1.0))) + 8.0 * np.maximum(0.0, x) ** 2
    noisy = loss + np.random.default_rng(0).normal(0.0, 0.05, lr.size)
    assert lr[np.argmin(np.gradient(smooth(noisy), x))] > 1.0  # the naive rule fails on this curve
    b = suggest_steepest(lr, noisy)
    assert b.status == "ok"
    assert abs(math.log10(b.max_lr) - (-1.0)) < 0.25


def test_valley_on_u_shaped_loss():
    low = int(np.argmin(smooth(LOSS_U)))
    assert 60 <= low <= 72  # the smoothed minimum sits near log10(lr) = -0.5 (index 69 here)
    b = suggest_valley(LR_EXP, LOSS_U)
    # the loss descends strictly from the first point to its minimum, so the valley is [0, low]
    assert b.max_lr == pytest.approx(LR_EXP[round(2 / 3 * low)], rel=1e-9)
    steep = suggest_steepest(LR_EXP, LOSS_U).max_lr
    assert steep < b.max_lr < LR_EXP[low]
    # frac 0.3 of 69 points = 20.7 -> the nearest grid point in log10(lr) is 21
    assert suggest_valley(LR_EXP, LOSS_U, frac=0.3).max_lr == pytest.approx(LR_EXP[round(0.3 * low)], rel=1e-9)


def test_valley_fraction_is_taken_in_log_lr():
    lr = np.linspace(0.0, 3.0, 301)[1:]  # linear sweep: 0.01 .. 3.0
    x = np.log10(lr)
    loss = 2.3 - 2.0 / (1.0 + np.exp(-3.0 * (x + 1.0))) + 8.0 * np.maximum(0.0, x) ** 2
    low = int(np.argmin(smooth(loss)))
    target = x[0] + 2 / 3 * (x[low] - x[0])  # 2/3 of the decades from LR 0.01 to the minimum near LR 1
    b = suggest_valley(lr, loss)
    assert abs(math.log10(b.max_lr) - target) < 0.025  # within a grid step (0.01 LR ~ 0.02 decade there)
    assert b.max_lr < 0.4  # 2/3 of the points would be LR ~0.67


def test_longest_decreasing_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.normal(size=25)
        start, end = longest_decreasing(s)
        best = [1] * len(s)
        for i in range(len(s)):
            for j in range(i):
                if s[j] > s[i]:
                    best[i] = max(best[i], best[j] + 1)
        assert best[end] == max(best)
        # a decreasing subsequence of that maximal length runs from `start` to `end`
        from_start = [0] * len(s)
        from_start[start] = 1
        for i in range(start + 1, end + 1):
            prior = [from_start[j] for j in range(start, i) if from_start[j] and s[j] > s[i]]
            from_start[i] = max(prior) + 1 if prior else 0
        assert from_start[end] == max(best)


def test_divergence_on_u_shaped_loss():
    b = suggest_divergence(LR_EXP, LOSS_U)
    assert b.status == "ok"
    # raw loss crosses 4x its minimum (~0.32) near log10(lr) = -0.06; the smoothed one a little earlier
    assert 0.5 * 10 ** -0.3 <= b.max_lr <= 0.5 * 10 ** -0.05
    assert b.min_lr == pytest.approx(b.max_lr / 4)
    assert suggest_divergence(LR_EXP, LOSS_U, backoff=1.0).max_lr == pytest.approx(2 * b.max_lr)


def test_divergence_at_nan_and_never():
    loss = np.linspace(2.3, 0.3, LR.size)
    k = 40
    loss_nan = loss.copy()
    loss_nan[k:] = np.inf
    b = suggest_divergence(LR, loss_nan)
    assert b.status == "ok" and b.max_lr == pytest.approx(0.5 * LR[k - 1])
    never = suggest_divergence(LR, loss)
    assert never.status == "ok" and never.max_lr == pytest.approx(0.5 * LR[-1])
    assert "lower bound" in never.message
    loss_late = loss.copy()
    loss_late[-1] = np.nan  # diverges at the very last row: same curve, one point shorter, not a lower bound
    late = suggest_divergence(LR, loss_late)
    assert late.max_lr == pytest.approx(0.5 * LR[-2]) and "lower bound" not in late.message
    assert never.confidence == pytest.approx(0.5 * late.confidence, rel=0.01)


@pytest.mark.parametrize("fn", [suggest_steepest, suggest_valley, suggest_divergence])
def test_loss_methods_degenerate_curves(fn):
    flat = fn(LR_EXP, np.full_like(LR_EXP, 2.3))
    assert flat.status == "flat" and flat.max_lr is None
    early = LOSS_U.copy()
    early[5:] = np.nan
    assert fn(LR_EXP, early).status == "diverged_at_start"
    assert fn(LR_EXP[:6], LOSS_U[:6]).status == "too_few_points"


@pytest.mark.parametrize("fn", [suggest_steepest, suggest_valley])
def test_rising_loss_is_diverged_at_start(fn):
    b = fn(LR_EXP, 1.0 + LR_EXP)
    assert b.status == "diverged_at_start" and b.max_lr is None


def test_divergence_right_at_start():
    loss = np.where(X < -3.8, 1.0, 10.0)  # 4x its best by row 5 of 101
    assert suggest_divergence(LR_EXP, loss).status == "diverged_at_start"


def test_input_validation():
    with pytest.raises(ValueError, match="window"):
        suggest_valley(LR_EXP, LOSS_U, window=0)
    with pytest.raises(ValueError, match="61 and 60"):
        suggest_steepest(LR, np.ones(60))
