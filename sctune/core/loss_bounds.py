"""Loss-based LR finders: the conventions of fastai and pytorch-lr-finder, for runs without held-out accuracy.

* :func:`suggest_steepest`: ``max_lr`` at the steepest descent of the loss against log10(lr).
* :func:`suggest_valley`: fastai's 'valley', a fraction of the way down the longest descent of the loss.
* :func:`suggest_divergence`: a back-off from where the loss runs away.

Smith's rule on held-out accuracy (:mod:`sctune.core.bounds`) is the default; these are chosen with
``range_test.method`` and reached through :func:`sctune.core.bounds.bounds_from_frame`. Each returns an
:class:`~sctune.core.bounds.LRBounds` with the same statuses and the same no-bounds contract (METHOD.md section 2).
Nothing here imports torch or ray.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from .bounds_common import (
    DIVERGENCE_BACKOFF,
    EARLY_CUT_FRAC,
    FLAT_TOL,
    MIN_POINTS,
    NOISE_TOL,
    LRBounds,
    as_1d,
    check_common,
    check_lr,
    check_same_length,
    cut_note,
    early_cut_message,
    first_nonfinite,
    logger,
    no_bounds,
    points_confidence,
)
from .config import MIN_LR_DIVISOR

# fastai's valley code lands half-way down the longest valley (start + len/3 + len/6); we go 2/3 of the way,
# nearer the loss minimum, because max_lr in one-cycle is a peak visited only briefly.
VALLEY_FRAC = 2.0 / 3.0


# --------------------------------------------------------------------------------------------- smoothing
def smooth(values: ArrayLike, *, window: int = 5) -> np.ndarray:
    """Centered rolling mean (pandas), ``min_periods=1`` so the edges average what is there.

    A centered window does not shift the peak the way an EMA does (an EMA lags by ~1/alpha points, which moves
    Smith's max_lr to a higher LR). NaNs are skipped inside the window.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {arr.shape}")
    return pd.Series(arr).rolling(int(window), center=True, min_periods=1).mean().to_numpy()


# --------------------------------------------------------------------------------------------- the curve
@dataclass(frozen=True)
class _LossCurve:
    lr: np.ndarray  # kept points: before the first non-finite loss, finite, lr > 0
    loss: np.ndarray
    smoothed: np.ndarray
    n_total: int
    cut: int | None
    lr_all: np.ndarray
    noise_ratio: float  # residual std / descent, on the descent (start .. smoothed minimum)


def _loss_prelude(method: str, lr: ArrayLike, loss: ArrayLike, *, divisor: float, window: int,
                  min_points: int, flat_tol: float) -> LRBounds | _LossCurve:
    """Shared checks of the loss methods; returns a no-bounds LRBounds or the prepared curve."""
    check_common(divisor, window, min_points)
    if not (math.isfinite(flat_tol) and flat_tol >= 0):
        raise ValueError(f"flat_tol must be a finite number >= 0, got {flat_tol!r}")
    lr_all = as_1d("lr", lr)
    loss_all = as_1d("loss", loss)
    check_same_length("lr", lr_all, "loss", loss_all)
    n_total = len(lr_all)
    cut = first_nonfinite(loss_all)
    end = n_total if cut is None else cut
    # lr > 0: the slope is taken against log10(lr); a linear ramp's LR-0 point carries no information anyway.
    keep = np.isfinite(lr_all[:end]) & (lr_all[:end] > 0)
    lr_k, loss_k = lr_all[:end][keep], loss_all[:end][keep]
    check_lr(lr_k)
    n = len(lr_k)
    if cut is not None and cut < EARLY_CUT_FRAC * n_total:
        return no_bounds(method, "diverged_at_start", divisor, early_cut_message(cut, n_total, lr_all))
    if n < min_points:
        return no_bounds(method, "too_few_points", divisor,
                          f"Only {n} finite loss points with lr > 0 (need >= {min_points}): use more num_iter."
                          + cut_note(cut, lr_all, n))
    s = smooth(loss_k, window=window)
    low = int(np.argmin(s))
    descent = float(s[: low + 1].max() - s[low])
    noise = float(np.std(loss_k[: low + 1] - s[: low + 1])) if low >= 2 else 0.0
    noise_ratio = noise / descent if descent > 0 else 0.0
    return _LossCurve(lr=lr_k, loss=loss_k, smoothed=s, n_total=n_total, cut=cut, lr_all=lr_all,
                      noise_ratio=noise_ratio)


def _descent_checks(method: str, c: _LossCurve, *, divisor: float, flat_tol: float,
                    noise_tol: float) -> LRBounds | None:
    """Steepest and valley need a clean descent of the loss."""
    s = c.smoothed
    scale = max(abs(float(s[0])), 1e-12)
    if (s.max() - s.min()) < flat_tol * scale:
        return no_bounds(method, "flat", divisor,
                          f"Smoothed loss hardly changes over the sweep (range {s.max() - s.min():.3g} < flat_tol "
                          f"{flat_tol:g} x start {s[0]:.3g}): nothing was learned or the model is already "
                          f"trained. Raise end_lr or num_iter." + cut_note(c.cut, c.lr_all, len(s)))
    if s[0] - s.min() < flat_tol * scale or int(np.argmin(s)) <= 1:
        return no_bounds(method, "diverged_at_start", divisor,
                          f"The smoothed loss never decreases (start {s[0]:.3g}, minimum {s.min():.3g} at LR "
                          f"{c.lr[int(np.argmin(s))]:.3g}): the ramp starts too high. Lower start_lr."
                          + cut_note(c.cut, c.lr_all, len(s)))
    if c.noise_ratio > noise_tol:
        return no_bounds(method, "noisy", divisor,
                          f"The loss is too noisy on its descent (residual std {c.noise_ratio:.2f} of the drop, "
                          f"noise_tol {noise_tol:g}): widen the smoothing window or repeat seeds and aggregate."
                          + cut_note(c.cut, c.lr_all, len(s)))
    return None


def _descent(method: str, lr: ArrayLike, loss: ArrayLike, *, divisor: float, window: int, min_points: int,
             flat_tol: float, noise_tol: float) -> _LossCurve | LRBounds:
    """The prepared curve of a descent-reading finder (steepest, valley), or the no-bounds result that its
    prelude or descent checks gave."""
    c = _loss_prelude(method, lr, loss, divisor=divisor, window=window, min_points=min_points, flat_tol=flat_tol)
    if isinstance(c, LRBounds):
        return c
    bad = _descent_checks(method, c, divisor=divisor, flat_tol=flat_tol, noise_tol=noise_tol)
    return c if bad is None else bad


def _loss_confidence(c: _LossCurve, noise_tol: float) -> float:
    """(1 - exp(-n / 20)) x (1 - noise_ratio / noise_tol), clipped to [0, 1]."""
    noise_factor = max(0.0, 1.0 - c.noise_ratio / noise_tol) if noise_tol > 0 else 1.0
    return float(np.clip(points_confidence(len(c.lr)) * noise_factor, 0.0, 1.0))


def _loss_ok(method: str, c: _LossCurve, idx: int, max_lr: float, divisor: float, confidence: float,
             what: str) -> LRBounds:
    min_lr = max_lr / divisor
    message = (f"max_lr {max_lr:.3g} ({what}; min_lr {min_lr:.3g} = max_lr/{divisor:g})."
               + cut_note(c.cut, c.lr_all, len(c.lr)))
    logger.debug("%s: idx=%d max_lr=%.4g confidence=%.3f", method, idx, max_lr, confidence)
    return LRBounds(min_lr=min_lr, max_lr=max_lr, status="ok", confidence=confidence, method=method,
                    divisor=float(divisor), peak_acc=None, verdict=None, message=message)


def _local_slope(x: np.ndarray, y: np.ndarray, *, half_width: float, min_side: int) -> np.ndarray:
    """Least-squares slope of y on x around each point, O(n log n) with prefix sums.

    The neighbourhood of point i is the wider of ``|x_j - x_i| <= half_width`` and ``min_side`` points on each
    side, so dense stretches are averaged over a fixed width in x and sparse ones still get a few points.
    """
    n = len(x)
    idx = np.arange(n)
    lo = np.minimum(np.searchsorted(x, x - half_width, side="left"), np.maximum(idx - min_side, 0))
    hi = np.maximum(np.searchsorted(x, x + half_width, side="right"), np.minimum(idx + min_side + 1, n))

    def window_sum(a: np.ndarray) -> np.ndarray:
        csum = np.concatenate([[0.0], np.cumsum(a)])
        return csum[hi] - csum[lo]

    # centre x and y first: the prefix-sum variance formula loses precision on large offsets
    xc, yc = x - x.mean(), y - y.mean()
    count = (hi - lo).astype(float)
    sx, sy = window_sum(xc), window_sum(yc)
    var_x = window_sum(xc * xc) - sx * sx / count
    cov_xy = window_sum(xc * yc) - sx * sy / count
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = cov_xy / var_x
    slope[(count < 2) | ~(var_x > 0)] = np.nan
    return slope


def suggest_steepest(lr: ArrayLike, loss: ArrayLike, *, divisor: float = MIN_LR_DIVISOR, window: int = 5,
                     min_points: int = MIN_POINTS, flat_tol: float = FLAT_TOL, noise_tol: float = NOISE_TOL,
                     span_decades: float = 0.2) -> LRBounds:
    """``max_lr`` at the steepest negative slope of the loss against log10(lr) (pytorch-lr-finder's rule).

    The slope at each point is a local least-squares fit of the raw loss on log10(lr) over `span_decades`
    (default +-0.1 decade) or +-``window // 2`` points, whichever is wider. A point-to-point gradient of the
    smoothed loss, as pytorch-lr-finder takes it, divides the noise by the spacing in log10(lr); on Smith's
    linear sweep that spacing shrinks to ~0.001 decade at high LR and the "steepest" point lands in the noise
    (seeded simulation, 300 steps 0 -> 3, loss noise std 0.05: median suggestion LR 2.5 for a true 0.1; the
    local fit: 0.105, 10-90% range 0.06-0.15). On an exponential sweep with 0.05-decade steps both agree.

    `flat_tol` is relative to the starting loss; confidence is ``(1 - exp(-n / 20)) x (1 - noise_ratio /
    noise_tol)`` with the noise measured on the descent of the smoothed loss.
    """
    if not (math.isfinite(span_decades) and span_decades >= 0):
        raise ValueError(f"span_decades must be a finite number >= 0, got {span_decades!r}")
    method = "steepest"
    c = _descent(method, lr, loss, divisor=divisor, window=window, min_points=min_points, flat_tol=flat_tol,
                 noise_tol=noise_tol)
    if isinstance(c, LRBounds):
        return c
    slope = _local_slope(np.log10(c.lr), c.loss, half_width=span_decades / 2, min_side=max(1, window // 2))
    idx = int(np.nanargmin(slope))
    return _loss_ok(method, c, idx, float(c.lr[idx]), divisor, _loss_confidence(c, noise_tol),
                    f"steepest descent of the loss, {slope[idx]:.3g} per decade")


def longest_decreasing(s: np.ndarray) -> tuple[int, int]:
    """Start and end index of a longest strictly decreasing subsequence, O(n log n) (patience sorting).

    fastai's valley uses the same longest decreasing subsequence in O(n^2); a subsequence (not a contiguous
    run) is robust to the small upticks a smoothed but noisy loss still has.
    """
    neg = -s  # decreasing in s = increasing in -s
    tails_val: list[float] = []
    tails_idx: list[int] = []
    prev = np.full(len(s), -1, dtype=int)
    for i, v in enumerate(neg.tolist()):
        j = bisect.bisect_left(tails_val, v)  # bisect_left: equal values do not extend (strict)
        if j > 0:
            prev[i] = tails_idx[j - 1]
        if j == len(tails_val):
            tails_val.append(v)
            tails_idx.append(i)
        else:
            tails_val[j] = v
            tails_idx[j] = i
    end = tails_idx[-1]
    start = end
    while prev[start] >= 0:
        start = int(prev[start])
    return start, end


def suggest_valley(lr: ArrayLike, loss: ArrayLike, *, divisor: float = MIN_LR_DIVISOR, window: int = 5,
                   min_points: int = MIN_POINTS, flat_tol: float = FLAT_TOL, noise_tol: float = NOISE_TOL, frac: float = VALLEY_FRAC) -> LRBounds:
    """fastai's 'valley': ``max_lr`` a fraction `frac` (default 2/3) of the way, in log10(lr), down the longest
    descending stretch (longest strictly decreasing subsequence) of the smoothed loss. The result depends on
    where the sweep starts, as fastai's does: the valley begins at the first LR.

    Statuses and confidence as in :func:`suggest_steepest`.
    """
    if not (math.isfinite(frac) and 0 <= frac <= 1):
        raise ValueError(f"frac must be in [0, 1], got {frac!r}")
    method = "valley"
    c = _descent(method, lr, loss, divisor=divisor, window=window, min_points=min_points, flat_tol=flat_tol,
                 noise_tol=noise_tol)
    if isinstance(c, LRBounds):
        return c
    start, end = longest_decreasing(c.smoothed)
    # the fraction is taken in log10(lr), not in points, so linear and exponential sweeps agree
    x = np.log10(c.lr)
    idx = int(np.argmin(np.abs(x - (x[start] + frac * (x[end] - x[start])))))
    return _loss_ok(method, c, idx, float(c.lr[idx]), divisor, _loss_confidence(c, noise_tol),
                    f"{frac:.2f} of the way down the loss valley from LR {c.lr[start]:.3g} to {c.lr[end]:.3g}")


def suggest_divergence(lr: ArrayLike, loss: ArrayLike, *, divisor: float = MIN_LR_DIVISOR,
                       diverge_th: float = 4.0, min_points: int = MIN_POINTS, window: int = 5,
                       flat_tol: float = FLAT_TOL, noise_tol: float = NOISE_TOL,
                       backoff: float = DIVERGENCE_BACKOFF) -> LRBounds:
    """``max_lr = backoff x`` the last LR before the divergence point (METHOD.md section 2).

    The divergence point is the first point where the smoothed loss exceeds `diverge_th` x its best value so
    far (pytorch-lr-finder's rule), or the first non-finite loss, whichever comes first. The loss must be
    positive there (cross-entropy is). If it comes within the first 10% of the rows: ``diverged_at_start``.
    If the sweep never diverges, ``max_lr = backoff x`` the last LR, reported as a lower bound with half
    the confidence (raise end_lr). Confidence otherwise as in :func:`suggest_steepest`.
    """
    if not (math.isfinite(diverge_th) and diverge_th > 1):
        raise ValueError(f"diverge_th must be a finite number > 1, got {diverge_th!r}")
    if not (math.isfinite(backoff) and 0 < backoff <= 1):
        raise ValueError(f"backoff must be in (0, 1], got {backoff!r}")
    method = "divergence"
    c = _loss_prelude(method, lr, loss, divisor=divisor, window=window, min_points=min_points, flat_tol=flat_tol)
    if isinstance(c, LRBounds):
        return c
    s = c.smoothed
    best = np.minimum.accumulate(s)
    if best.min() <= 0:
        raise ValueError(f"the diverge_th rule needs a positive loss, got smoothed loss min {best.min():.3g}")
    over = np.flatnonzero(s > diverge_th * best)
    confidence = _loss_confidence(c, noise_tol)
    if len(over):
        k = int(over[0])  # index among kept points; map it to a row for the 10% rule
        row = int(np.flatnonzero(np.isfinite(c.lr_all) & (c.lr_all > 0))[k])
        if row < EARLY_CUT_FRAC * c.n_total or k == 0:
            return no_bounds(method, "diverged_at_start", divisor,
                              f"The smoothed loss exceeds {diverge_th:g}x its best already at LR {c.lr[k]:.3g} "
                              f"(row {row} of {c.n_total}, within the first {EARLY_CUT_FRAC:.0%}): lower end_lr "
                              f"or start_lr.")
        last = k - 1
        what = (f"{backoff:g} x LR {c.lr[last]:.3g}, the last before the smoothed loss exceeds {diverge_th:g}x its "
                f"best")
    elif c.cut is not None:
        last = len(c.lr) - 1
        what = f"{backoff:g} x LR {c.lr[last]:.3g}, the last before the loss became non-finite"
    else:
        if (s.max() - s.min()) < flat_tol * max(abs(float(s[0])), 1e-12):
            return no_bounds(method, "flat", divisor,
                              f"The smoothed loss hardly changes and never diverges (range {s.max() - s.min():.3g}): "
                              f"raise end_lr or num_iter.")
        last = len(c.lr) - 1
        confidence *= 0.5
        what = (f"{backoff:g} x the last LR {c.lr[last]:.3g}; the loss never exceeded {diverge_th:g}x its best, so "
                f"this is a lower bound: raise end_lr")
    return _loss_ok(method, c, last, backoff * float(c.lr[last]), divisor, confidence, what)
