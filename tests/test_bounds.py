"""Tests for sctune.core.bounds (Smith's rule, frames, seeds) on synthetic range-test curves of known shape.

The loss-based finders (sctune.core.loss_bounds) are tested in test_loss_bounds.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sctune.core.bounds import (
    RECOMMEND_DIVISOR,
    LRBounds,
    SuperConvergenceVerdict,
    aggregate_bounds,
    bounds_from_frame,
    choose_weight_decay,
    recipe_max_lr,
    recommend_max_lr,
    smith_bounds,
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


# ------------------------------------------------------------------------------------------------ Smith
def ragged(lr: np.ndarray, *, learn_at: float, fall_at: float | None = None, high: float = 0.8,
           swing: float = 0.12, seed: int = 0) -> np.ndarray:
    """A range test as Smith's look: chance accuracy at LR 0, a rise to `high` by `learn_at`, then a ragged band
    (single evaluations dropping up to `swing` below it, as the authors' ResNet-56 curves do), then - past
    `fall_at` - a fall to chance."""
    rng = np.random.default_rng(seed)
    acc = np.where(lr < learn_at, 0.1 + (high - 0.1) * lr / learn_at, high)
    drops = rng.uniform(0.0, swing, lr.size) * (rng.random(lr.size) < 0.4)
    acc = np.where(lr >= learn_at, acc - drops, acc)
    if fall_at is not None:
        acc = np.where(lr > fall_at, np.maximum(0.1, high - 3.0 * (lr - fall_at)), acc)
    return acc


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window", [None, 3, 5, 9])
def test_band_reaching_the_end_gives_the_end_as_a_lower_bound(seed, window):
    acc = ragged(LR, learn_at=0.3, seed=seed)
    b = smith_bounds(LR, acc, window=window)
    assert b.status == "ok"
    # the top of the band, whatever the window and wherever the noise spikes: not the argmax of the plateau
    assert b.max_lr == pytest.approx(3.0) and b.min_lr == pytest.approx(0.75)
    assert b.lower_bound and not b.still_learning
    assert "lower bound" in b.message and "raise end_lr" in b.message
    v = b.verdict
    assert v.possible is True and v.reaches_end and v.coverage == pytest.approx(1.0)
    assert 0.25 <= v.learn_lr <= 0.35 and v.headroom >= 3.0
    assert v.message.startswith("Super-convergence likely")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_lr_is_the_top_of_the_band_before_accuracy_falls(seed):
    acc = ragged(LR, learn_at=0.3, fall_at=2.2, seed=seed)
    acc[14] = 0.95  # a spike at LR 0.7, the highest single point: Smith's max_lr is not there
    b = smith_bounds(LR, acc)
    assert b.status == "ok" and not b.lower_bound
    assert 2.1 <= b.max_lr <= 2.3
    assert "falls away" in b.message
    v = b.verdict
    assert not v.reaches_end and v.possible is True  # high over (2.2 - 0.3) / 2.7 = 70% of the sweep


def test_accuracy_that_collapses_soon_after_learning_is_unlikely():
    acc = ragged(LR, learn_at=0.2, fall_at=0.8, swing=0.0)
    b = smith_bounds(LR, acc)
    assert b.status == "ok" and 0.75 <= b.max_lr <= 0.9 and not b.lower_bound
    v = b.verdict
    assert v.possible is False and v.coverage < 0.3
    assert v.message.startswith("Super-convergence unlikely")
    assert "falls away" in v.message


def test_verdict_thresholds():
    lr = np.round(np.linspace(0.0, 3.0, 31), 6)  # 0.1 steps
    level = np.where((lr >= 0.5) & (lr <= 2.3), 0.9, 0.2)
    v = super_convergence_verdict(lr, level, high_level=0.85)
    assert v.learn_lr == pytest.approx(0.5) and v.top_lr == pytest.approx(2.3)
    assert v.headroom == pytest.approx(2.3 / 0.5) and v.coverage == pytest.approx(1.8 / 2.5)
    assert v.possible is True
    assert super_convergence_verdict(lr, level, high_level=0.85, min_coverage=0.75).possible is False
    assert super_convergence_verdict(lr, level, high_level=0.85, min_headroom=5.0).possible is False
    # measured against the ramp's planned end: a test that diverged at LR 2.3 of a 0 -> 6 ramp covered 1.8 of 5.5
    short = super_convergence_verdict(lr, level, high_level=0.85, end_lr=6.0, diverged=True)
    assert short.coverage == pytest.approx(1.8 / 5.5) and short.possible is False
    undetermined = super_convergence_verdict(lr, level, high_level=0.85, still_learning=True)
    assert undetermined.possible is None and "still learning" in undetermined.message
    with pytest.raises(ValueError, match="lr > 0"):
        super_convergence_verdict([0.0, 0.0], [0.5, 0.6], high_level=0.5)


def test_still_learning_at_the_end_of_a_short_ramp_is_said_not_called_noise():
    rng = np.random.default_rng(0)
    acc = 0.1 + 0.6 * (LR / 3.0) ** 2 + rng.normal(0.0, 0.02, LR.size)  # rising until the last point
    b = smith_bounds(LR, acc)
    assert b.status == "ok" and b.still_learning and b.lower_bound
    assert "still learning" in b.message and "lengthen num_iter" in b.message
    assert b.verdict.possible is None
    assert b.confidence < smith_bounds(LR, ragged(LR, learn_at=0.3, fall_at=2.2)).confidence


def test_divergence_backs_off_from_the_divergence_point():
    lr = LR[:31]  # the test stopped at LR 1.5 of a 0 -> 3 ramp, accuracy high to the end
    acc = ragged(lr, learn_at=0.3, swing=0.0)
    free = smith_bounds(lr, acc)
    assert free.max_lr == pytest.approx(1.5) and free.lower_bound
    b = smith_bounds(lr, acc, diverged=True, ramp_end_lr=3.0)
    assert b.max_lr == pytest.approx(0.5 * 1.5) and not b.lower_bound
    assert "diverged at LR 1.5" in b.message
    assert b.verdict.possible is False and b.verdict.diverged and b.verdict.end_lr == pytest.approx(3.0)
    # the same through a non-finite loss: the last finite LR is the divergence point
    loss = np.linspace(2.3, 0.5, LR.size)
    loss[31:] = np.nan
    cut = smith_bounds(LR, np.concatenate([acc, np.full(LR.size - 31, 0.95)]), loss=loss, ramp_end_lr=3.0)
    assert cut.max_lr == pytest.approx(b.max_lr) and "non-finite" in cut.message
    # accuracy that falls before the loss diverges: the fall decides, no back-off needed
    falls = smith_bounds(lr, ragged(lr, learn_at=0.3, fall_at=0.9, swing=0.0), diverged=True, ramp_end_lr=3.0)
    assert 0.85 <= falls.max_lr <= 1.0


# ------------------------------------------------------------------------------------------------ statuses
def test_flat_curve_yields_no_bounds():
    acc = 0.1 + 0.005 * np.sin(LR * 7)
    b = smith_bounds(LR, acc)
    assert b.status == "flat" and not b.ok
    assert b.min_lr is None and b.max_lr is None and b.verdict is None and b.confidence == 0.0
    assert "nothing was learned" in b.message


def test_already_trained_model_is_flat():
    acc = 0.95 - 0.005 * LR  # starts at its best and hardly moves: a pretrained model
    b = smith_bounds(LR, acc)
    assert b.status == "flat" and b.max_lr is None


def test_too_few_points():
    b = smith_bounds(LR[:5], ragged(LR[:5], learn_at=0.1))
    assert b.status == "too_few_points" and b.max_lr is None
    assert "num_iter" in b.message
    d = smith_bounds(LR[:5], ragged(LR[:5], learn_at=0.1), diverged=True)
    assert d.status == "too_few_points" and "diverged at LR 0.2" in d.message and "eval_every" in d.message


def test_unevaluated_steps_are_dropped():
    acc = ragged(LR, learn_at=0.5, fall_at=2.0, swing=0.0)
    sparse = np.full_like(acc, np.nan)
    sparse[::10] = acc[::10]  # 7 evaluations < min_points 8
    assert smith_bounds(LR, sparse).status == "too_few_points"
    sparse[::5] = acc[::5]  # 13 evaluations, LR 0.25 apart
    b = smith_bounds(LR, sparse)
    assert b.status == "ok" and b.max_lr == pytest.approx(2.0)


def test_peak_at_start_is_diverged_at_start():
    b = smith_bounds(LR, np.maximum(0.1, 0.8 - 0.5 * LR))
    assert b.status == "diverged_at_start" and b.max_lr is None
    assert "start_lr" in b.message


def test_early_nan_loss_is_diverged_at_start():
    loss = np.full_like(LR, 1.0)
    loss[4:] = np.nan  # cut at row 4 of 61, within the first 10%
    b = smith_bounds(LR, ragged(LR, learn_at=0.3), loss=loss)
    assert b.status == "diverged_at_start" and b.max_lr is None
    assert "non-finite" in b.message


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_without_a_level_is_noisy(seed):
    base = np.where(LR <= 1.0, 0.1 + 0.3 * LR, 0.4 - 0.1 * (LR - 1.0))  # a small signal: range 0.3
    assert smith_bounds(LR, base).status == "ok"
    noisy = base + np.random.default_rng(seed).normal(0.0, 0.2, LR.size)  # scatter 2/3 of the signal
    b = smith_bounds(LR, noisy)
    assert b.status == "noisy" and b.max_lr is None
    assert "noisy" in b.message


def test_confidence_falls_with_noise_and_when_the_top_is_not_located():
    located = smith_bounds(LR, ragged(LR, learn_at=0.3, fall_at=2.2, swing=0.0))
    scatter = np.random.default_rng(0).normal(0.0, 0.03, LR.size)
    noisier = smith_bounds(LR, ragged(LR, learn_at=0.3, fall_at=2.2, swing=0.0) + scatter)
    assert noisier.status == "ok" and noisier.confidence < located.confidence
    lower = smith_bounds(LR, ragged(LR, learn_at=0.3, swing=0.0))  # never falls: only a lower bound
    assert lower.confidence < located.confidence
    lr_fine = np.linspace(0.0, 3.0, 241)
    fine = smith_bounds(lr_fine, ragged(lr_fine, learn_at=0.3, fall_at=2.2, swing=0.0))
    assert fine.confidence > located.confidence  # more evaluations
    for b in (located, noisier, lower, fine):
        assert 0.0 < b.confidence <= 1.0


def test_input_validation():
    acc = ragged(LR, learn_at=0.3)
    with pytest.raises(ValueError, match="61 and 60"):
        smith_bounds(LR, acc[:-1])
    with pytest.raises(ValueError, match="strictly increasing"):
        smith_bounds(LR[::-1], acc)
    with pytest.raises(ValueError, match="divisor"):
        smith_bounds(LR, acc, divisor=0.5)
    with pytest.raises(ValueError, match="high_frac"):
        smith_bounds(LR, acc, high_frac=1.5)


# ------------------------------------------------------------------------------------------------ results
def test_to_dict_is_json_and_round_trips():
    b = smith_bounds(LR, ragged(LR, learn_at=0.2, fall_at=0.8, swing=0.0))
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
    results = [smith_bounds(LR, ragged(LR, learn_at=0.3, fall_at=f, swing=0.0)) for f in (1.9, 2.0, 2.4)]
    agg = aggregate_bounds(results)
    json.dumps(agg, allow_nan=False)
    assert agg["status"] == "ok" and agg["n_ok"] == 3 and agg["n_total"] == 3
    assert agg["max_lr"] == pytest.approx(results[1].max_lr) and agg["min_lr"] == pytest.approx(agg["max_lr"] / 4)
    spread = agg["spread"]["max_lr"]
    assert spread["min"] == pytest.approx(results[0].max_lr) and spread["max"] == pytest.approx(results[2].max_lr)
    assert agg["verdict"]["possible"] is True and agg["verdict"]["message"] == results[1].verdict.message
    assert not agg["lower_bound"] and not agg["still_learning"]
    assert agg["confidence"] == pytest.approx(np.mean([r.confidence for r in results]))


def test_a_weight_decay_counts_only_with_most_seeds_usable():
    ok = smith_bounds(LR, ragged(LR, learn_at=0.3, swing=0.0))
    flat = smith_bounds(LR, np.full_like(LR, 0.1))
    one_of_three = aggregate_bounds([flat, ok, flat])
    assert one_of_three["status"] == "inconsistent" and one_of_three["max_lr"] is None
    assert one_of_three["n_ok"] == 1 and one_of_three["statuses"] == {"flat": 2, "ok": 1}
    assert "Only 1 of 3" in one_of_three["message"]
    two_of_three = aggregate_bounds([ok, flat, ok])
    assert two_of_three["status"] == "ok" and two_of_three["max_lr"] == pytest.approx(3.0)
    assert two_of_three["lower_bound"] and two_of_three["confidence"] == pytest.approx(2 * ok.confidence / 3)
    noisy = LRBounds(min_lr=None, max_lr=None, status="noisy", confidence=0.0, method="smith", divisor=4.0,
                     peak_acc=None, verdict=None, message="noisy")
    none_ok = aggregate_bounds([flat, flat, noisy])
    assert none_ok["status"] == "flat" and none_ok["max_lr"] is None and none_ok["verdict"] is None
    assert aggregate_bounds([noisy, flat])["status"] == "flat"  # ties: order of STATUSES
    assert aggregate_bounds([flat, noisy, noisy])["status"] == "noisy"
    with pytest.raises(ValueError, match="at least one"):
        aggregate_bounds([])


def test_verdict_majority_and_undetermined():
    likely = smith_bounds(LR, ragged(LR, learn_at=0.3, swing=0.0))
    unlikely = smith_bounds(LR, ragged(LR, learn_at=0.2, fall_at=0.8, swing=0.0))
    learning = smith_bounds(LR, 0.1 + 0.6 * (LR / 3.0) ** 2)
    assert aggregate_bounds([likely, unlikely, likely])["verdict"]["possible"] is True
    assert aggregate_bounds([unlikely, unlikely, likely])["verdict"]["possible"] is False
    assert aggregate_bounds([learning, learning, likely])["verdict"]["possible"] is None


def test_weight_decay_prior_is_chosen_on_peak_accuracy_and_confidence():
    def entry(wd, peak, conf, max_lr, status="ok"):
        return {"weight_decay": wd, "status": status, "peak_acc": peak, "confidence": conf, "max_lr": max_lr}

    per_wd = {"0.001": entry(1e-3, 0.80, 0.9, 0.5), "0.0001": entry(1e-4, 0.90, 0.4, 1.0),
              "1e-05": entry(1e-5, 0.895, 0.7, 2.5), "0": entry(0.0, 0.99, 0.9, 3.0, status="inconsistent")}
    # 1e-5 ties 1e-4 on peak accuracy (within 0.01) and is the more confident; the unusable WD never counts
    assert choose_weight_decay(per_wd)["weight_decay"] == 1e-5
    per_wd["1e-05"]["peak_acc"] = 0.85  # now clearly worse: the larger max_lr does not buy it the prior
    assert choose_weight_decay(per_wd)["weight_decay"] == 1e-4
    assert choose_weight_decay({"0": per_wd["0"]}) is None


def test_recipe_max_lr_is_the_recommendation_inside_the_band():
    for curve in (ragged(LR, learn_at=0.3, swing=0.0), ragged(LR, learn_at=0.2, fall_at=0.8, swing=0.0)):
        b = smith_bounds(LR, curve)
        learn = b.verdict.learn_lr
        quarter = b.max_lr / RECOMMEND_DIVISOR
        if b.verdict.possible is False:
            expected = quarter if quarter <= learn else (learn * quarter) ** 0.5
        else:
            expected = max(learn, quarter)
        assert b.recommended_max_lr == pytest.approx(expected)
        assert b.recommended_max_lr < b.max_lr and b.recommended_reason
        agg = aggregate_bounds([b])
        value, reason = recipe_max_lr(agg)
        assert value == pytest.approx(b.recommended_max_lr) and reason == b.recommended_reason
        assert agg["max_lr_reason"].startswith("the top of the band")
    # no band (a loss-based finder): the first point falls back to max_lr
    assert recipe_max_lr({"max_lr": 1.0, "min_lr": 0.25, "recommended_max_lr": None})[0] is None


def test_aggregate_bounds_recommends_the_median_over_seeds():
    seeds = [smith_bounds(LR, ragged(LR, learn_at=learn, fall_at=fall, swing=0.0))
             for learn, fall in ((0.2, 0.8), (0.3, 1.5), (0.4, 2.4))]
    agg = aggregate_bounds(seeds)
    recs = sorted(b.recommended_max_lr for b in seeds)
    assert agg["recommended_max_lr"] == pytest.approx(recs[1])
    assert agg["recommended_reason"].startswith("median of 3 range tests")
    # below the top; below min_lr (max/4) only where super-convergence is unlikely and the band is wide
    assert agg["recommended_max_lr"] < agg["max_lr"]
    assert all(b.recommended_max_lr >= b.min_lr or b.verdict.possible is False for b in seeds)
    bad = aggregate_bounds([smith_bounds(LR, np.full_like(LR, 0.1))])
    assert bad["recommended_max_lr"] is None and bad["max_lr_reason"] is None


def test_recommend_max_lr_reads_a_stated_fraction_of_the_band():
    value, why = recommend_max_lr(0.1, 3.0)
    assert value == pytest.approx(3.0 / RECOMMEND_DIVISOR) and why.startswith(f"max_lr / {RECOMMEND_DIVISOR:g}")
    # not below the band where super-convergence is likely (or undetermined): where max/4 falls under the LR at
    # which the model learned, the band's start
    for likely in (True, None):
        value, why = recommend_max_lr(0.9, 1.3, likely=likely)
        assert value == pytest.approx(0.9) and why.startswith("the band's start")
    # where it is unlikely, the band's top is the edge of a collapse: max/4 even below the band
    value, why = recommend_max_lr(0.9, 1.3, likely=False)
    assert value == pytest.approx(1.3 / RECOMMEND_DIVISOR) and "below the band's start" in why
    # unlikely, and the band is wide (its start far below max/4: wine's MLP learned at 0.0127 and collapsed past
    # 0.29): halfway in log LR from max/4 down to the start, where its full trainings were steadiest
    value, why = recommend_max_lr(0.01, 0.64, likely=False)
    assert value == pytest.approx(0.04) and why.startswith("halfway") and "0.16" in why
    assert recommend_max_lr(0.5, 0.5)[0] == 0.5  # no width: max_lr itself
    assert recommend_max_lr(0.5, 0.5, likely=False)[0] == pytest.approx(0.125)
    assert recommend_max_lr(0.1, 3.0, divisor=2.0)[0] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="divisor"):
        recommend_max_lr(0.1, 3.0, divisor=0.5)
