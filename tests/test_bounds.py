"""Tests for sctune.bounds on synthetic range-test curves of known shape."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from sctune.bounds import (
    LRBounds,
    SuperConvergenceVerdict,
    _longest_decreasing,
    aggregate_bounds,
    bounds_from_frame,
    smith_bounds,
    smooth,
    suggest_divergence,
    suggest_steepest,
    suggest_valley,
    super_convergence_verdict,
)

LR = np.linspace(0.0, 3.0, 61)  # Smith's linear sweep 0 -> 3.0; grid step 0.05
STEP = 0.05


def triangle(lr: np.ndarray, peak: float, slope: float = 2.0, low: float = 0.1, top: float = 0.9) -> np.ndarray:
    """Accuracy that rises and falls symmetrically around `peak` (so smoothing cannot move the peak)."""
    return np.clip(top - slope * np.abs(lr - peak), low, None)


def rise_fall(lr: np.ndarray, peak: float) -> np.ndarray:
    """Asymmetric: linear rise 0.1 -> 0.9 up to `peak`, then a slower fall."""
    return np.where(lr <= peak, 0.1 + 0.8 * lr / peak, 0.9 - 0.35 * (lr - peak))


# ------------------------------------------------------------------------------------------------ smooth
def test_smooth_is_centered_mean_with_partial_edges():
    out = smooth([0.0, 0.0, 3.0, 0.0, 0.0], window=3)
    np.testing.assert_allclose(out, [0.0, 1.0, 1.0, 1.0, 0.0])
    # min_periods=1: the first point of a window-5 mean averages points 0..2 only
    np.testing.assert_allclose(smooth([3.0, 0.0, 0.0, 6.0], window=5)[:2], [1.0, 2.25])


def test_smooth_rejects_bad_window():
    with pytest.raises(ValueError, match="window"):
        smooth([1.0, 2.0], window=0)


# ------------------------------------------------------------------------------------------------ Smith
@pytest.mark.parametrize("peak", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divisor", [3.0, 4.0])
def test_symmetric_peak_is_exact(peak, divisor):
    b = smith_bounds(LR, triangle(LR, peak), divisor=divisor)
    assert b.status == "ok" and b.ok
    assert b.max_lr == pytest.approx(peak, abs=1e-9)
    assert b.min_lr == pytest.approx(peak / divisor, abs=1e-9)
    assert b.peak_acc == pytest.approx((0.7 + 0.8 + 0.9 + 0.8 + 0.7) / 5)  # window-5 mean at the tip
    assert b.method == "smith" and b.divisor == divisor


@pytest.mark.parametrize("peak", [0.5, 1.0, 2.0])
def test_asymmetric_peak_within_one_grid_step(peak):
    b = smith_bounds(LR, rise_fall(LR, peak))
    assert b.status == "ok"
    # the rise is 1.6/peak per unit LR and the fall 0.35: a centered window-5 mean moves the tip toward the
    # gentler (falling) side by at most window // 2 = 2 grid steps, and by <= 1 step when the rise is <= 1.6
    assert peak <= b.max_lr <= peak + (2 if peak < 1.0 else 1) * STEP + 1e-9
    assert b.min_lr == pytest.approx(b.max_lr / 4.0)
    assert not b.verdict.possible and not b.verdict.reaches_end
    assert 0.0 < b.confidence <= 1.0
    # without smoothing the kink is found exactly
    assert smith_bounds(LR, rise_fall(LR, peak), window=1).max_lr == pytest.approx(peak)


def test_super_convergence_plateau():
    lr = np.linspace(0.0, 3.0, 301)  # grid 0.01 so the 0 -> 0.08 rise is resolved
    acc = np.where(lr < 0.08, 0.1 + 0.8 * lr / 0.08, 0.9)  # high from ~0.09 all the way to 3.0
    b = smith_bounds(lr, acc)
    v = b.verdict
    assert b.status == "ok"
    assert v.possible and v.reaches_end
    assert v.plateau_high_lr == pytest.approx(3.0)
    assert 0.08 <= v.plateau_low_lr <= 0.10
    assert v.width_decades == pytest.approx(math.log10(3.0 / v.plateau_low_lr))
    assert v.width_decades == pytest.approx(math.log10(3.0 / 0.08), abs=0.02)  # raw points: 0.08 -> 3.0
    assert "likely" in v.message and "raise end_lr" in b.message
    assert b.max_lr == pytest.approx(3.0)  # ties resolve to the last point: "before it falls"


def test_narrow_peak_is_not_super_convergence():
    b = smith_bounds(LR, triangle(LR, 1.0, slope=2.0))
    v = b.verdict
    assert not v.possible and not v.reaches_end
    assert v.plateau_low_lr < 1.0 < v.plateau_high_lr
    assert v.width_decades < 0.1
    assert "unlikely" in v.message


def test_verdict_threshold_and_lr_zero_excluded():
    lr = np.concatenate([[0.0], np.logspace(-2, 1, 31)])  # 0.1-decade grid after an LR-0 point
    acc_s = np.where((lr >= 0.1 - 1e-12) & (lr <= 1.0 + 1e-12), 0.9, 0.1)
    acc_s[0] = 0.9  # high at LR 0 must not stretch the band to log10(0)
    v = super_convergence_verdict(lr, acc_s, threshold_decades=1.0)
    assert v.plateau_low_lr == pytest.approx(0.1) and v.plateau_high_lr == pytest.approx(1.0)
    assert v.width_decades == pytest.approx(1.0) and v.possible
    assert not super_convergence_verdict(lr, acc_s, threshold_decades=1.01).possible
    # a wider tolerance admits the 0.1 floor, so the band covers everything with lr > 0 and reaches the end
    wide = super_convergence_verdict(lr, acc_s, tolerance=0.85)
    assert wide.reaches_end and wide.width_decades == pytest.approx(3.0)


def test_verdict_needs_positive_lr():
    with pytest.raises(ValueError, match="lr > 0"):
        super_convergence_verdict([0.0, 0.0], [0.5, 0.6])


# ------------------------------------------------------------------------------------------------ statuses
def test_flat_curve_yields_no_bounds():
    acc = 0.1 + 0.005 * np.sin(LR * 7)
    b = smith_bounds(LR, acc)
    assert b.status == "flat" and not b.ok
    assert b.min_lr is None and b.max_lr is None and b.verdict is None and b.confidence == 0.0
    assert "nothing was learned" in b.message


def test_already_trained_model_is_flat():
    acc = 0.95 - 0.01 * LR  # starts at its peak and never falls by sc_tolerance: pretrained, range 0.03
    b = smith_bounds(LR, acc)
    assert b.status == "flat" and b.max_lr is None


def test_too_few_points():
    b = smith_bounds(LR[:5], triangle(LR[:5], 0.1))
    assert b.status == "too_few_points" and b.max_lr is None
    assert "num_iter" in b.message


def test_unevaluated_steps_are_dropped():
    acc = triangle(LR, 1.0, slope=0.4)  # broad enough to be resolved by evaluations 0.25 LR apart
    sparse = np.full_like(acc, np.nan)
    sparse[::10] = acc[::10]  # 7 evaluations < min_points 8
    assert smith_bounds(LR, sparse).status == "too_few_points"
    sparse[::5] = acc[::5]  # 13 evaluations, LR 0.25 apart; the tip at 1.0 is on the grid
    b = smith_bounds(LR, sparse)
    assert b.status == "ok" and b.max_lr == pytest.approx(1.0)


def test_peak_at_start_is_diverged_at_start():
    b = smith_bounds(LR, 0.8 - 0.2 * LR)
    assert b.status == "diverged_at_start" and b.max_lr is None
    assert "start_lr" in b.message


def test_early_nan_loss_is_diverged_at_start():
    loss = np.full_like(LR, 1.0)
    loss[4:] = np.nan  # cut at row 4 of 61, within the first 10%
    b = smith_bounds(LR, triangle(LR, 1.0), loss=loss)
    assert b.status == "diverged_at_start" and b.max_lr is None
    assert "non-finite" in b.message


def test_nan_loss_cuts_the_curve():
    acc = rise_fall(LR, 1.0)
    k = 40  # LR 2.0: the loss goes NaN here
    acc[k:] = 0.95  # garbage after divergence, above the real peak: must be ignored
    loss = np.linspace(2.3, 0.5, LR.size)
    loss[k:] = np.nan
    loss[k + 3] = 1.0  # a finite value after the first NaN does not resume the curve
    uncut = smith_bounds(LR, acc)
    cut = smith_bounds(LR, acc, loss=loss)
    assert uncut.max_lr > LR[k]  # without the cut the garbage wins
    assert cut.status == "ok"
    assert cut.max_lr < LR[k]
    assert abs(cut.max_lr - 1.0) <= STEP + 1e-9
    assert "non-finite" in cut.message


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_curve(seed):
    base = np.where(LR <= 1.0, 0.1 + 0.3 * LR, 0.4 - 0.1 * (LR - 1.0))  # small signal: range 0.3
    assert smith_bounds(LR, base).status == "ok"
    noisy = base + np.random.default_rng(seed).normal(0.0, 0.2, LR.size)  # noise std 2/3 of the signal range
    b = smith_bounds(LR, noisy)
    assert b.status == "noisy" and b.max_lr is None
    assert "noisy" in b.message


def test_confidence_decreases_with_noise_and_increases_with_points_and_fall():
    clean = smith_bounds(LR, triangle(LR, 1.0))
    mild = smith_bounds(LR, triangle(LR, 1.0) + np.random.default_rng(0).normal(0.0, 0.02, LR.size))
    assert mild.status == "ok"
    assert mild.confidence < clean.confidence
    lr_fine = np.linspace(0.0, 3.0, 241)
    fine = smith_bounds(lr_fine, triangle(lr_fine, 1.0), window=17)  # same smoothing width in LR units
    assert fine.confidence > clean.confidence
    half = np.where(LR <= 1.0, triangle(LR, 1.0), np.maximum(triangle(LR, 1.0), 0.5))
    half_fall = smith_bounds(LR, half)  # rises from 0.1 but falls only to 0.5: half the range
    assert half_fall.status == "ok" and half_fall.max_lr == pytest.approx(1.0)
    assert half_fall.confidence < clean.confidence
    for b in (clean, mild, fine, half_fall):
        assert 0.0 < b.confidence <= 1.0


def test_input_validation():
    with pytest.raises(ValueError, match="61 and 60"):
        smith_bounds(LR, triangle(LR, 1.0)[:-1])
    with pytest.raises(ValueError, match="strictly increasing"):
        smith_bounds(LR[::-1], triangle(LR, 1.0))
    with pytest.raises(ValueError, match="divisor"):
        smith_bounds(LR, triangle(LR, 1.0), divisor=0.5)
    with pytest.raises(ValueError, match="61 and 60"):
        suggest_steepest(LR, np.ones(60))


# ------------------------------------------------------------------------------------------------ results
def test_to_dict_is_json_and_round_trips():
    b = smith_bounds(LR, triangle(LR, 1.0))
    d = b.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["verdict"]["possible"] is False
    assert LRBounds.from_dict(json.loads(text)) == b
    nan_peak = LRBounds(min_lr=None, max_lr=None, status="flat", confidence=0.0, method="smith", divisor=4.0,
                        peak_acc=float("nan"), verdict=None, message="x")
    assert nan_peak.to_dict()["peak_acc"] is None
    assert isinstance(b.verdict, SuperConvergenceVerdict)


def test_lrbounds_rejects_bounds_without_ok():
    with pytest.raises(ValueError, match="exactly when status is 'ok'"):
        LRBounds(min_lr=0.1, max_lr=0.4, status="noisy", confidence=0.5, method="smith", divisor=4.0,
                 peak_acc=None, verdict=None, message="")
    with pytest.raises(ValueError, match="confidence"):
        LRBounds(min_lr=0.1, max_lr=0.4, status="ok", confidence=1.5, method="smith", divisor=4.0,
                 peak_acc=None, verdict=None, message="")


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
        start, end = _longest_decreasing(s)
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


# ------------------------------------------------------------------------------------------------ frames
def _frame(acc: np.ndarray, eval_every: int = 2) -> pd.DataFrame:
    acc_col = np.full_like(acc, np.nan)
    acc_col[::eval_every] = acc[::eval_every]
    loss = np.linspace(2.3, 0.5, LR.size)
    return pd.DataFrame({"step": np.arange(LR.size), "lr": LR, "loss": loss, "smooth_loss": loss,
                         "acc": acc_col, "val_loss": loss})


def test_bounds_from_frame_dispatch():
    df = _frame(triangle(LR, 1.0))
    b = bounds_from_frame(df)
    assert b == smith_bounds(LR[::2], triangle(LR, 1.0)[::2])
    assert bounds_from_frame(df, divisor=3.0).min_lr == pytest.approx(b.max_lr / 3.0)
    df.loc[45:, "loss"] = np.nan
    assert bounds_from_frame(df).max_lr == pytest.approx(b.max_lr)  # cut after the peak: same peak
    assert "non-finite" in bounds_from_frame(df).message
    assert bounds_from_frame(df, method="divergence").max_lr == pytest.approx(0.5 * LR[44])
    assert bounds_from_frame(_frame(triangle(LR, 1.0)), method="steepest").method == "steepest"


def test_bounds_from_frame_validation():
    df = _frame(triangle(LR, 1.0))
    with pytest.raises(ValueError, match="method"):
        bounds_from_frame(df, method="magic")
    with pytest.raises(ValueError, match="missing \\['acc'\\]"):
        bounds_from_frame(df.drop(columns=["acc"]))


# ------------------------------------------------------------------------------------------------ seeds
def test_aggregate_bounds_three_seeds():
    results = [smith_bounds(LR, triangle(LR, p)) for p in (0.9, 1.0, 1.2)]
    agg = aggregate_bounds(results)
    json.dumps(agg, allow_nan=False)
    assert agg["status"] == "ok" and agg["n_ok"] == 3 and agg["n_total"] == 3
    assert agg["max_lr"] == pytest.approx(1.0) and agg["min_lr"] == pytest.approx(0.25)
    spread = agg["spread"]["max_lr"]
    assert spread["min"] == pytest.approx(0.9) and spread["max"] == pytest.approx(1.2)
    assert spread["rel_iqr"] == pytest.approx((1.1 - 0.95) / 1.0)
    assert agg["possible_frac"] == 0.0
    assert agg["confidence"] == pytest.approx(np.mean([r.confidence for r in results]))


def test_aggregate_bounds_with_failures():
    ok = smith_bounds(LR, triangle(LR, 1.2))
    flat = smith_bounds(LR, np.full_like(LR, 0.1))
    agg = aggregate_bounds([flat, ok, flat])
    assert agg["status"] == "ok" and agg["n_ok"] == 1 and agg["max_lr"] == pytest.approx(1.2)
    assert agg["statuses"] == {"flat": 2, "ok": 1}
    assert agg["confidence"] == pytest.approx(ok.confidence / 3)
    noisy = LRBounds(min_lr=None, max_lr=None, status="noisy", confidence=0.0, method="smith", divisor=4.0,
                     peak_acc=None, verdict=None, message="noisy")
    none_ok = aggregate_bounds([flat, flat, noisy])
    assert none_ok["status"] == "flat" and none_ok["max_lr"] is None and none_ok["n_ok"] == 0
    assert aggregate_bounds([noisy, flat])["status"] == "flat"  # ties: order of STATUSES
    assert aggregate_bounds([flat, noisy, noisy])["status"] == "noisy"
    assert none_ok["possible_frac"] is None
    with pytest.raises(ValueError, match="at least one"):
        aggregate_bounds([])
