"""LR bounds from an LR range test: pure functions of a curve (METHOD.md sections 2 and 4).

Smith's rule (1506.01186 section 3.3, 1708.07120 section 3): run the LR up linearly from ~0, record held-out
accuracy, take ``max_lr`` at the peak of the accuracy before it falls, and ``min_lr = max_lr / 3..4``.
If the accuracy stays near its peak for a wide band of LRs (ResNet-56/CIFAR-10: up to LR 3.0), super-convergence
is likely; :func:`super_convergence_verdict` reports that band and its width in decades.

The loss-based suggestions (:func:`suggest_steepest`, :func:`suggest_valley`, :func:`suggest_divergence`) are
the LR-finder conventions of fastai and pytorch-lr-finder, offered for runs without held-out accuracy.

Every function returns an :class:`LRBounds` whose ``status`` says whether the curve was usable. A degenerate
curve (too short, flat, diverged at the start, noisy) never yields bounds: ``min_lr`` and ``max_lr`` are then
``None`` and ``message`` says what to change in the range test. Nothing here imports torch or ray.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

BoundsStatus = Literal["ok", "flat", "diverged_at_start", "too_few_points", "noisy"]
STATUSES: tuple[str, ...] = ("ok", "flat", "diverged_at_start", "too_few_points", "noisy")
METHODS: tuple[str, ...] = ("smith", "steepest", "valley", "divergence")

# A non-finite loss this early means the ramp starts (or climbs) too high: the brief's 10% of the sweep.
EARLY_CUT_FRAC = 0.10
# Confidence from the number of evaluation points: 1 - exp(-n / 20). About 20 evaluations place the peak
# within ~5% of the sweep; 8 points (the minimum) give 0.33, 30 (RangeTestConfig: 300 iters / eval_every 10)
# give 0.78, 61 give 0.95.
CONF_POINTS_SCALE = 20.0
# fastai's valley code lands half-way down the longest valley (start + len/3 + len/6); we go 2/3 of the way,
# nearer the loss minimum, because max_lr in one-cycle is a peak visited only briefly.
VALLEY_FRAC = 2.0 / 3.0
# The divergence point is where the loss has already risen to diverge_th x its best, past the usable range;
# back off by 2x. (fastai's "lr_min / 10" targets a fixed LR; a one-cycle peak can sit closer to the edge.)
DIVERGENCE_BACKOFF = 0.5
# Accuracy range below which noise is judged against this absolute scale instead (accuracy units).
NOISE_RANGE_FLOOR = 0.2
# The plateau bridges dips of up to this many evaluation points below the near-peak zone (ragged
# high-LR accuracy); a longer dip ends it.
PLATEAU_MAX_GAP = 2
# Ties in a smoothed curve (exact plateaus in synthetic data) resolve to the *last* maximal point: Smith's
# max_lr is where accuracy peaks "before it falls".
_TIE_EPS = 1e-12


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SuperConvergenceVerdict:
    """Whether the range test shows Smith's super-convergence signature (accuracy high over a wide LR band)."""

    possible: bool
    plateau_low_lr: float  # lowest LR (> 0) of the contiguous band around the peak within `tolerance`
    plateau_high_lr: float
    width_decades: float  # log10(plateau_high_lr / plateau_low_lr)
    threshold_decades: float  # `possible` = width_decades >= threshold_decades
    tolerance: float  # absolute accuracy drop from the peak still counted as "near the peak"
    reaches_end: bool  # the band extends to the last finite tested LR: accuracy never degraded
    message: str

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SuperConvergenceVerdict:
        return cls(**data)


@dataclass(frozen=True)
class LRBounds:
    """LR bounds from one range test, or the reason there are none.

    ``min_lr``/``max_lr`` are set exactly when ``status == "ok"``; ``confidence`` is 0 otherwise.
    """

    min_lr: float | None
    max_lr: float | None
    status: BoundsStatus
    confidence: float  # 0..1, see smith_bounds / _loss_confidence for the formulas
    method: str  # "smith" | "steepest" | "valley" | "divergence"
    divisor: float  # min_lr = max_lr / divisor
    peak_acc: float | None
    verdict: SuperConvergenceVerdict | None
    message: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        has_bounds = self.min_lr is not None and self.max_lr is not None
        if has_bounds != (self.status == "ok"):
            raise ValueError(
                f"min_lr/max_lr must be set exactly when status is 'ok', got status {self.status!r} with "
                f"min_lr={self.min_lr}, max_lr={self.max_lr}"
            )
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (nested verdict dict; NaN and inf become None)."""
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRBounds:
        data = dict(data)
        if data.get("verdict") is not None:
            data["verdict"] = SuperConvergenceVerdict.from_dict(data["verdict"])
        return cls(**data)


def jsonable(obj: Any) -> Any:
    """Strict-JSON form: NaN/inf -> None, numpy scalars -> Python, tuples -> lists (recursively)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _no_bounds(method: str, status: BoundsStatus, divisor: float, message: str,
               peak_acc: float | None = None) -> LRBounds:
    logger.info("range test (%s): %s - %s", method, status, message)
    return LRBounds(min_lr=None, max_lr=None, status=status, confidence=0.0, method=method, divisor=divisor,
                    peak_acc=peak_acc, verdict=None, message=message)


# --------------------------------------------------------------------------------------------- helpers
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


def _as_1d(name: str, values: ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_same_length(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_name} and {b_name} must have the same length, got {len(a)} and {len(b)}")


def _check_common(divisor: float, window: int, min_points: int) -> None:
    if not (isinstance(divisor, (int, float, np.floating)) and math.isfinite(divisor) and divisor >= 1):
        raise ValueError(f"divisor must be a finite number >= 1 (min_lr = max_lr / divisor), got {divisor!r}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if isinstance(min_points, bool) or not isinstance(min_points, (int, np.integer)) or min_points < 3:
        raise ValueError(f"min_points must be an integer >= 3 (a peak needs neighbours), got {min_points!r}")


def _check_lr(lr: np.ndarray) -> None:
    """Kept LRs must be >= 0 and strictly increasing (a range test ramps the LR up)."""
    if len(lr) and lr.min() < 0:
        raise ValueError(f"lr must be >= 0, got min {lr.min():g}")
    if len(lr) > 1:
        bad = np.flatnonzero(np.diff(lr) <= 0)
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"lr must be strictly increasing along the range test, got lr[{i}]={lr[i]:g} then "
                f"lr[{i + 1}]={lr[i + 1]:g}"
            )


def _first_nonfinite(loss: np.ndarray | None) -> int | None:
    if loss is None:
        return None
    bad = np.flatnonzero(~np.isfinite(loss))
    return int(bad[0]) if len(bad) else None


def _peak_index(s: np.ndarray) -> int:
    return int(np.flatnonzero(s >= s.max() - _TIE_EPS)[-1])


def _band(s: np.ndarray, peak: int, tolerance: float, *, max_gap: int = 0,
          members: np.ndarray | None = None) -> tuple[int, int]:
    """Index band around `peak` where s >= s[peak] - tolerance, bridging dips of <= `max_gap` points.

    A range test's accuracy at high LR is ragged: one evaluation below the near-peak zone between two
    inside it should not cut the plateau in two (``max_gap`` = 0 gives the strictly contiguous band).
    """
    floor = s[peak] - tolerance
    inside = (s if members is None else members) >= floor
    inside[peak] = True

    def walk(start: int, step: int) -> int:
        edge, i, gap = start, start + step, 0
        while 0 <= i < len(s):
            if inside[i]:
                edge, gap = i, 0
            else:
                gap += 1
                if gap > max_gap:
                    break
            i += step
        return edge

    return walk(peak, -1), walk(peak, +1)


def _robust_std(x: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the std of Gaussian noise, blind to a few outliers."""
    if len(x) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def _points_confidence(n: int) -> float:
    return 1.0 - math.exp(-n / CONF_POINTS_SCALE)


def _cut_note(cut: int | None, lr_all: np.ndarray, n_used: int) -> str:
    if cut is None:
        return ""
    lr_at = lr_all[cut]
    where = f"LR {lr_at:.3g}" if math.isfinite(lr_at) else f"row {cut}"
    return f" The loss became non-finite at row {cut} ({where}); only the {n_used} points before it were used."


def _early_cut_message(cut: int, n_total: int, lr_all: np.ndarray) -> str:
    lr_at = lr_all[cut]
    where = f" (LR {lr_at:.3g})" if math.isfinite(lr_at) else ""
    return (
        f"The loss became non-finite at row {cut} of {n_total}{where}, within the first "
        f"{EARLY_CUT_FRAC:.0%} of the sweep: lower end_lr (or start_lr) so the ramp reaches the divergence "
        f"point late, or check the model/data for NaNs."
    )


# --------------------------------------------------------------------------------------------- Smith
def super_convergence_verdict(lr: ArrayLike, acc_smoothed: ArrayLike, *, tolerance: float = 0.05,
                              threshold_decades: float = 1.0, acc_raw: ArrayLike | None = None
                              ) -> SuperConvergenceVerdict:
    """Width of the band of LRs over which the smoothed accuracy stays within `tolerance` of its peak.

    Only points with lr > 0 and finite accuracy count (log10 of LR 0 is undefined). The band is the
    contiguous run of points around the peak with ``acc >= peak - tolerance``; ``possible`` when its width
    ``log10(high / low)`` is at least `threshold_decades` (default one decade, e.g. 0.3 -> 3.0).

    With `acc_raw` (the unsmoothed points) membership is judged on the raw accuracy against the smoothed
    peak: a centered window drags the first points of a steep early rise below the zone and would move the
    plateau's low end to a higher LR than the data show. Dips of up to ``PLATEAU_MAX_GAP`` points are
    bridged either way.
    """
    lr_a = _as_1d("lr", lr)
    s_a = _as_1d("acc_smoothed", acc_smoothed)
    _check_same_length("lr", lr_a, "acc_smoothed", s_a)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if not (math.isfinite(threshold_decades) and threshold_decades > 0):
        raise ValueError(f"threshold_decades must be a finite number > 0, got {threshold_decades!r}")
    raw_a = None
    if acc_raw is not None:
        raw_a = _as_1d("acc_raw", acc_raw)
        _check_same_length("lr", lr_a, "acc_raw", raw_a)
    keep = np.isfinite(lr_a) & np.isfinite(s_a) & (lr_a > 0)
    if raw_a is not None:
        keep &= np.isfinite(raw_a)
    lr_k, s_k = lr_a[keep], s_a[keep]
    members = raw_a[keep] if raw_a is not None else None
    if len(lr_k) == 0:
        raise ValueError("super_convergence_verdict needs at least one point with lr > 0 and finite accuracy, got 0")
    peak = _peak_index(s_k)
    lo, hi = _band(s_k, peak, tolerance, max_gap=PLATEAU_MAX_GAP, members=members)
    low, high = float(lr_k[lo]), float(lr_k[hi])
    width = float(math.log10(high / low))
    possible = width >= threshold_decades
    reaches_end = hi == len(s_k) - 1
    if possible:
        message = (f"Super-convergence likely: accuracy stays within {tolerance:g} of its peak from LR {low:.3g} "
                   f"to {high:.3g} ({width:.2f} decades >= {float(threshold_decades)!r}).")
    else:
        message = (f"Super-convergence unlikely: accuracy stays within {tolerance:g} of its peak only from LR "
                   f"{low:.3g} to {high:.3g} ({width:.2f} decades < {float(threshold_decades)!r}).")
    if reaches_end:
        message += " The band reaches the last tested LR: raise end_lr to see where accuracy falls."
    return SuperConvergenceVerdict(possible=possible, plateau_low_lr=low, plateau_high_lr=high,
                                   width_decades=width, threshold_decades=float(threshold_decades),
                                   tolerance=float(tolerance), reaches_end=reaches_end, message=message)


def smith_bounds(lr: ArrayLike, acc: ArrayLike, *, loss: ArrayLike | None = None, divisor: float = 4.0,
                 window: int = 5, min_points: int = 8, flat_tol: float = 0.02, noise_tol: float = 0.25,
                 sc_tolerance: float = 0.05, sc_threshold_decades: float = 1.0) -> LRBounds:
    """Smith's rule: ``max_lr`` at the peak of the smoothed held-out accuracy, ``min_lr = max_lr / divisor``.

    A centered window of `window` points can move the peak of an asymmetric curve by up to ``window // 2``
    points toward its gentler side (a kink rising steeply and falling slowly reads slightly late); noise-free
    curves with ``window=1`` give the raw argmax.

    `acc` may be NaN on steps where accuracy was not evaluated; those points are dropped. If `loss` is given
    the curve is cut at its first non-finite value (divergence) and only the points before it are used.

    Status, first match wins:

    - ``diverged_at_start``: the loss went non-finite within the first 10% of the rows (checked first: the
      few points left would otherwise read as "too few", and more iterations would not help);
    - ``too_few_points``: fewer than `min_points` evaluated points;
    - ``flat``: smoothed accuracy range < `flat_tol`, or the peak is at the first or second point and the
      accuracy never falls more than `sc_tolerance` below it (nothing learned, or already trained);
    - ``diverged_at_start``: the peak is at the first or second point and the accuracy then falls;
    - ``noisy``: robust std (1.4826 x median absolute deviation) of (raw - smoothed) accuracy > `noise_tol` x
      max(peak - minimum of the smoothed accuracy, 0.2) - robust, so the few points of a steep early rise, which a
      centered window cannot follow, do not count as noise -
      measured up to the end of the near-peak band (past it the curve "becomes ragged", which is Smith's
      sign that max_lr was passed, not measurement noise);
    - ``ok``.

    Confidence (``ok`` only, else 0) is the product of three factors in [0, 1]:
    ``(1 - exp(-n / 20))`` for the number of points, ``(1 - noise_ratio / noise_tol)`` for the noise, and
    ``0.5 + 0.5 * fall / range`` for how clearly accuracy falls after the peak (0.5 when it never falls:
    max_lr is then only a lower bound).
    """
    _check_common(divisor, window, min_points)
    for name, value in (("flat_tol", flat_tol), ("noise_tol", noise_tol), ("sc_tolerance", sc_tolerance)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    lr_all = _as_1d("lr", lr)
    acc_all = _as_1d("acc", acc)
    _check_same_length("lr", lr_all, "acc", acc_all)
    loss_all = None
    if loss is not None:
        loss_all = _as_1d("loss", loss)
        _check_same_length("lr", lr_all, "loss", loss_all)
    n_total = len(lr_all)
    method = "smith"

    cut = _first_nonfinite(loss_all)
    end = n_total if cut is None else cut
    keep = np.isfinite(lr_all[:end]) & np.isfinite(acc_all[:end])
    lr_k, acc_k = lr_all[:end][keep], acc_all[:end][keep]
    _check_lr(lr_k)
    n = len(lr_k)

    if cut is not None and cut < EARLY_CUT_FRAC * n_total:
        return _no_bounds(method, "diverged_at_start", divisor, _early_cut_message(cut, n_total, lr_all))
    if n < min_points:
        return _no_bounds(method, "too_few_points", divisor,
                          f"Only {n} evaluated accuracy points (need >= {min_points}): use more num_iter or a "
                          f"smaller eval_every." + _cut_note(cut, lr_all, n))

    s = smooth(acc_k, window=window)
    peak = _peak_index(s)
    peak_acc = float(s[peak])
    acc_range = float(s.max() - s.min())
    _, hi = _band(s, peak, sc_tolerance)
    falls = hi < n - 1

    if acc_range < flat_tol or (peak <= 1 and not falls):
        return _no_bounds(method, "flat", divisor,
                          f"Smoothed accuracy hardly changes over the sweep (range {acc_range:.3g}, flat_tol "
                          f"{flat_tol:g}; peak {peak_acc:.3f} at LR {lr_k[peak]:.3g}): nothing was learned or the "
                          f"model is already trained. Raise end_lr or num_iter, or check the model and labels."
                          + _cut_note(cut, lr_all, n), peak_acc=peak_acc)
    if peak <= 1:
        return _no_bounds(method, "diverged_at_start", divisor,
                          f"Smoothed accuracy peaks at the start of the sweep (LR {lr_k[peak]:.3g}, acc "
                          f"{peak_acc:.3f}) and then falls to {s[peak:].min():.3f}: the ramp starts too high. "
                          f"Lower start_lr (Smith starts at 0) and end_lr." + _cut_note(cut, lr_all, n),
                          peak_acc=peak_acc)
    resid = acc_k[: hi + 1] - s[: hi + 1]
    noise = _robust_std(resid)
    # Relative to the curve's range, but never to less than NOISE_RANGE_FLOOR: a model that learns within
    # the first evaluations (range 0.05) with +-0.02 scatter is a plateau, not noise.
    noise_ratio = noise / max(acc_range, NOISE_RANGE_FLOOR)
    if noise_ratio > noise_tol:
        return _no_bounds(method, "noisy", divisor,
                          f"Accuracy is too noisy to place the peak: residual std {noise:.3g} is "
                          f"{noise_ratio:.2f} of the accuracy range {max(acc_range, NOISE_RANGE_FLOOR):.3g} (noise_tol {noise_tol:g}). "
                          f"Raise eval_samples, widen the smoothing window, or repeat seeds and aggregate."
                          + _cut_note(cut, lr_all, n), peak_acc=peak_acc)

    max_lr = float(lr_k[peak])
    min_lr = max_lr / divisor
    fall = float(s[peak] - s[peak:].min())
    confidence = _points_confidence(n) * (1.0 - noise_ratio / noise_tol if noise_tol > 0 else 1.0) * (
        0.5 + 0.5 * min(1.0, fall / acc_range))
    verdict = super_convergence_verdict(lr_k, s, tolerance=sc_tolerance, threshold_decades=sc_threshold_decades,
                                        acc_raw=acc_k)
    if falls:
        shape = f"accuracy then falls to {s[peak:].min():.3f} by LR {lr_k[-1]:.3g}."
    else:
        shape = (f"accuracy stays within {sc_tolerance:g} of the peak up to the last LR {lr_k[-1]:.3g}, so max_lr "
                 f"is a lower bound: raise end_lr to see where it falls.")
    message = (f"max_lr {max_lr:.3g} at the smoothed-accuracy peak {peak_acc:.3f} (min_lr {min_lr:.3g} = "
               f"max_lr/{divisor:g}); {shape} {verdict.message}" + _cut_note(cut, lr_all, n))
    logger.debug("smith_bounds: n=%d peak=%d noise_ratio=%.3f fall=%.3f confidence=%.3f",
                 n, peak, noise_ratio, fall, confidence)
    return LRBounds(min_lr=min_lr, max_lr=max_lr, status="ok", confidence=float(np.clip(confidence, 0.0, 1.0)),
                    method=method, divisor=float(divisor), peak_acc=peak_acc, verdict=verdict, message=message)


# --------------------------------------------------------------------------------------------- loss methods
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
    _check_common(divisor, window, min_points)
    if not (math.isfinite(flat_tol) and flat_tol >= 0):
        raise ValueError(f"flat_tol must be a finite number >= 0, got {flat_tol!r}")
    lr_all = _as_1d("lr", lr)
    loss_all = _as_1d("loss", loss)
    _check_same_length("lr", lr_all, "loss", loss_all)
    n_total = len(lr_all)
    cut = _first_nonfinite(loss_all)
    end = n_total if cut is None else cut
    # lr > 0: the slope is taken against log10(lr); a linear ramp's LR-0 point carries no information anyway.
    keep = np.isfinite(lr_all[:end]) & (lr_all[:end] > 0)
    lr_k, loss_k = lr_all[:end][keep], loss_all[:end][keep]
    _check_lr(lr_k)
    n = len(lr_k)
    if cut is not None and cut < EARLY_CUT_FRAC * n_total:
        return _no_bounds(method, "diverged_at_start", divisor, _early_cut_message(cut, n_total, lr_all))
    if n < min_points:
        return _no_bounds(method, "too_few_points", divisor,
                          f"Only {n} finite loss points with lr > 0 (need >= {min_points}): use more num_iter."
                          + _cut_note(cut, lr_all, n))
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
        return _no_bounds(method, "flat", divisor,
                          f"Smoothed loss hardly changes over the sweep (range {s.max() - s.min():.3g} < flat_tol "
                          f"{flat_tol:g} x start {s[0]:.3g}): nothing was learned or the model is already "
                          f"trained. Raise end_lr or num_iter." + _cut_note(c.cut, c.lr_all, len(s)))
    if s[0] - s.min() < flat_tol * scale or int(np.argmin(s)) <= 1:
        return _no_bounds(method, "diverged_at_start", divisor,
                          f"The smoothed loss never decreases (start {s[0]:.3g}, minimum {s.min():.3g} at LR "
                          f"{c.lr[int(np.argmin(s))]:.3g}): the ramp starts too high. Lower start_lr."
                          + _cut_note(c.cut, c.lr_all, len(s)))
    if c.noise_ratio > noise_tol:
        return _no_bounds(method, "noisy", divisor,
                          f"The loss is too noisy on its descent (residual std {c.noise_ratio:.2f} of the drop, "
                          f"noise_tol {noise_tol:g}): widen the smoothing window or repeat seeds and aggregate."
                          + _cut_note(c.cut, c.lr_all, len(s)))
    return None


def _loss_confidence(c: _LossCurve, noise_tol: float) -> float:
    """(1 - exp(-n / 20)) x (1 - noise_ratio / noise_tol), clipped to [0, 1]."""
    noise_factor = max(0.0, 1.0 - c.noise_ratio / noise_tol) if noise_tol > 0 else 1.0
    return float(np.clip(_points_confidence(len(c.lr)) * noise_factor, 0.0, 1.0))


def _loss_ok(method: str, c: _LossCurve, idx: int, max_lr: float, divisor: float, confidence: float,
             what: str) -> LRBounds:
    min_lr = max_lr / divisor
    message = (f"max_lr {max_lr:.3g} ({what}; min_lr {min_lr:.3g} = max_lr/{divisor:g})."
               + _cut_note(c.cut, c.lr_all, len(c.lr)))
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


def suggest_steepest(lr: ArrayLike, loss: ArrayLike, *, divisor: float = 4.0, window: int = 5,
                     min_points: int = 8, flat_tol: float = 0.02, noise_tol: float = 0.25,
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
    c = _loss_prelude(method, lr, loss, divisor=divisor, window=window, min_points=min_points, flat_tol=flat_tol)
    if isinstance(c, LRBounds):
        return c
    bad = _descent_checks(method, c, divisor=divisor, flat_tol=flat_tol, noise_tol=noise_tol)
    if bad is not None:
        return bad
    slope = _local_slope(np.log10(c.lr), c.loss, half_width=span_decades / 2, min_side=max(1, window // 2))
    idx = int(np.nanargmin(slope))
    return _loss_ok(method, c, idx, float(c.lr[idx]), divisor, _loss_confidence(c, noise_tol),
                    f"steepest descent of the loss, {slope[idx]:.3g} per decade")


def _longest_decreasing(s: np.ndarray) -> tuple[int, int]:
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


def suggest_valley(lr: ArrayLike, loss: ArrayLike, *, divisor: float = 4.0, window: int = 5, min_points: int = 8,
                   flat_tol: float = 0.02, noise_tol: float = 0.25, frac: float = VALLEY_FRAC) -> LRBounds:
    """fastai's 'valley': ``max_lr`` a fraction `frac` (default 2/3) of the way, in log10(lr), down the longest
    descending stretch (longest strictly decreasing subsequence) of the smoothed loss. The result depends on
    where the sweep starts, as fastai's does: the valley begins at the first LR.

    Statuses and confidence as in :func:`suggest_steepest`.
    """
    if not (math.isfinite(frac) and 0 <= frac <= 1):
        raise ValueError(f"frac must be in [0, 1], got {frac!r}")
    method = "valley"
    c = _loss_prelude(method, lr, loss, divisor=divisor, window=window, min_points=min_points, flat_tol=flat_tol)
    if isinstance(c, LRBounds):
        return c
    bad = _descent_checks(method, c, divisor=divisor, flat_tol=flat_tol, noise_tol=noise_tol)
    if bad is not None:
        return bad
    start, end = _longest_decreasing(c.smoothed)
    # the fraction is taken in log10(lr), not in points, so linear and exponential sweeps agree
    x = np.log10(c.lr)
    idx = int(np.argmin(np.abs(x - (x[start] + frac * (x[end] - x[start])))))
    return _loss_ok(method, c, idx, float(c.lr[idx]), divisor, _loss_confidence(c, noise_tol),
                    f"{frac:.2f} of the way down the loss valley from LR {c.lr[start]:.3g} to {c.lr[end]:.3g}")


def suggest_divergence(lr: ArrayLike, loss: ArrayLike, *, divisor: float = 4.0, diverge_th: float = 4.0,
                       min_points: int = 8, window: int = 5, flat_tol: float = 0.02, noise_tol: float = 0.25,
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
            return _no_bounds(method, "diverged_at_start", divisor,
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
            return _no_bounds(method, "flat", divisor,
                              f"The smoothed loss hardly changes and never diverges (range {s.max() - s.min():.3g}): "
                              f"raise end_lr or num_iter.")
        last = len(c.lr) - 1
        confidence *= 0.5
        what = (f"{backoff:g} x the last LR {c.lr[last]:.3g}; the loss never exceeded {diverge_th:g}x its best, so "
                f"this is a lower bound: raise end_lr")
    return _loss_ok(method, c, last, backoff * float(c.lr[last]), divisor, confidence, what)


# --------------------------------------------------------------------------------------------- frames
def bounds_from_frame(df: pd.DataFrame, *, method: str = "smith", **kw: Any) -> LRBounds:
    """Bounds from a range-test frame (columns step, lr, loss, smooth_loss, acc, val_loss).

    ``smith`` reads ``lr``, ``acc`` and (if present) ``loss`` for the divergence cut; the loss methods read
    ``lr`` and the raw ``loss`` (they smooth it themselves with a centered window). `kw` goes to the method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    need = ("lr", "acc") if method == "smith" else ("lr", "loss")
    missing = [col for col in need if col not in df.columns]
    if missing:
        raise ValueError(f"method {method!r} needs columns {list(need)}, missing {missing} (have {list(df.columns)})")
    lr = df["lr"].to_numpy(dtype=float)
    if method == "smith":
        loss = df["loss"].to_numpy(dtype=float) if "loss" in df.columns else None
        return smith_bounds(lr, df["acc"].to_numpy(dtype=float), loss=loss, **kw)
    loss = df["loss"].to_numpy(dtype=float)
    fn = {"steepest": suggest_steepest, "valley": suggest_valley, "divergence": suggest_divergence}[method]
    return fn(lr, loss, **kw)


# --------------------------------------------------------------------------------------------- seeds
def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "max": None, "median": None, "rel_iqr": None}
    arr = np.asarray(values, dtype=float)
    med = float(np.median(arr))
    q25, q75 = np.percentile(arr, [25, 75])
    return {"min": float(arr.min()), "max": float(arr.max()), "median": med,
            "rel_iqr": float((q75 - q25) / med) if med > 0 else None}


def _median_or_none(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def aggregate_bounds(results: Sequence[LRBounds]) -> dict[str, Any]:
    """Combine range tests repeated over seeds (METHOD.md section 2: "repeat and aggregate").

    Medians of the ``ok`` results' bounds (robust to one bad seed), their spread (min, max, median and
    relative IQR = (q75 - q25) / median), ``n_ok``/``n_total``, the fraction of ok verdicts that say
    super-convergence is possible, and ``status``: "ok" if at least one result is ok, else the most common
    status (ties: the order of ``STATUSES``). ``confidence`` is the mean over *all* results (a failed seed
    counts as 0, so it also says how reproducible the test was). The dict is JSON-serialisable.
    """
    results = list(results)
    if not results:
        raise ValueError("aggregate_bounds needs at least one LRBounds, got 0")
    for i, r in enumerate(results):
        if not isinstance(r, LRBounds):
            raise ValueError(f"results[{i}] must be an LRBounds, got {type(r).__name__}")
    ok = [r for r in results if r.ok]
    counts = Counter(r.status for r in results)
    if ok:
        status = "ok"
    else:
        status = max(STATUSES, key=lambda st: (counts.get(st, 0), -STATUSES.index(st)))
    verdicts = [r.verdict for r in ok if r.verdict is not None]
    methods = sorted({r.method for r in results})
    max_spread = _spread([r.max_lr for r in ok])
    min_spread = _spread([r.min_lr for r in ok])
    possible_frac = (sum(v.possible for v in verdicts) / len(verdicts)) if verdicts else None
    if ok:
        message = (f"{len(ok)}/{len(results)} range tests usable: median max_lr {max_spread['median']:.3g} "
                   f"(range {max_spread['min']:.3g}..{max_spread['max']:.3g}), median min_lr "
                   f"{min_spread['median']:.3g}.")
        if possible_frac is not None:
            message += f" Super-convergence possible in {possible_frac:.0%} of them."
    else:
        message = f"No usable range test out of {len(results)} (mostly {status}): " + results[
            [r.status for r in results].index(status)].message
    out = {
        "status": status,
        "min_lr": min_spread["median"],
        "max_lr": max_spread["median"],
        "n_ok": len(ok),
        "n_total": len(results),
        "spread": {"max_lr": max_spread, "min_lr": min_spread},
        "confidence": float(np.mean([r.confidence for r in results])),  # non-ok results count as 0
        "peak_acc": _median_or_none([r.peak_acc for r in ok if r.peak_acc is not None]),
        "possible_frac": possible_frac,
        "width_decades": _median_or_none([v.width_decades for v in verdicts]),
        "plateau_low_lr": _median_or_none([v.plateau_low_lr for v in verdicts]),
        "plateau_high_lr": _median_or_none([v.plateau_high_lr for v in verdicts]),
        "statuses": dict(counts),
        "method": methods[0] if len(methods) == 1 else "mixed",
        "message": message,
    }
    return jsonable(out)
