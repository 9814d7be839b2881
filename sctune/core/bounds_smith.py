"""Smith's reading of an LR range test (1506.01186 section 3.3, 1708.07120 section 3; METHOD.md section 2):
held-out accuracy through its running median, the band where it stays high, and whether super-convergence
is likely. ``smith_bounds`` composes the steps, each a public function of its own: ``divergence_cut``,
``cut_status`` / ``accuracy_level`` / ``level_status``, ``high_band``, ``super_convergence_verdict``,
``smith_confidence``, ``smith_message``. ``sctune.core.bounds`` re-exports the public names (its interface).
Nothing here imports torch or ray.
"""

from __future__ import annotations

import logging
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
    SuperConvergenceVerdict,
    as_1d,
    check_common,
    check_lr,
    check_same_length,
    cut_note,
    early_cut_message,
    first_nonfinite,
    no_bounds,
    points_confidence,
    recommend_max_lr,
)
from .config import HIGH_FRAC, MIN_LR_DIVISOR, SC_MIN_COVERAGE, SC_MIN_HEADROOM

logger = logging.getLogger("sctune.core.bounds")

# Running-median window as a share of the evaluated points (odd, 3..25): 5 of 51, 21 of 201, 25 of 1001.
MEDIAN_WINDOW_FRAC = 0.1
# The model is "still learning" when its accuracy first reaches the high band in the last quarter of the ramp.
LEARNING_TAIL_FRAC = 0.25


def robust_std(x: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the std of Gaussian noise, blind to a few outliers."""
    if len(x) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def auto_window(n: int) -> int:
    """Running-median window: ~1/10 of the evaluated points, odd, clipped to 3..25."""
    w = int(round(n * MEDIAN_WINDOW_FRAC))
    w += 1 - w % 2
    return int(min(max(w, 3), 25))


def running_median(values: ArrayLike, *, window: int) -> np.ndarray:
    """Centered rolling median (pandas), ``min_periods=1``.

    A median, not a mean: a ragged high-LR curve swings by 0.1-0.2 between neighbouring evaluations
    (the authors' ResNet-56 tests), and one low point must neither end the high band nor one spike
    make a peak. On a monotone stretch the centered median is the middle value, so the rise of the
    learning phase is not shifted.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    arr = as_1d("values", values)
    return pd.Series(arr).rolling(int(window), center=True, min_periods=1).median().to_numpy()


def verdict_message(possible: bool | None, *, learn: float, top: float, end: float, level: float,
                     headroom: float, coverage: float, reaches_end: bool, diverged: bool,
                     min_headroom: float, min_coverage: float) -> str:
    """The one wording of the super-convergence verdict (per curve and, with the median, per weight decay)."""
    if possible is None:
        return (f"Super-convergence undetermined: the model was still learning when the ramp ended (accuracy "
                f"first reached its high band at LR {learn:.3g} of {end:.3g}), so the range test says nothing "
                f"about larger LRs. Lengthen num_iter so learning ends in the first half of the ramp.")
    band = f"held-out accuracy stays high (>= {level:.3f}) from LR {learn:.3g}, where the model has learned, to {top:.3g}"
    if reaches_end:
        band += " (the end of the ramp)" if not diverged else " (where the loss diverged)"
    figures = (f"{headroom:.1f}x the learning LR, {coverage:.0%} of the sweep past it; likely needs >= "
               f"{min_headroom:g}x and >= {min_coverage:.0%}")
    if possible:
        return (f"Super-convergence likely: {band}: {figures}. Large LRs regularize: reduce weight decay and "
                f"dropout to keep the balance.")
    return f"Super-convergence unlikely: {band}, then it falls away: {figures}."


def super_convergence_verdict(lr: ArrayLike, level: ArrayLike, *, high_level: float,
                              end_lr: float | None = None, diverged: bool = False, still_learning: bool = False,
                              min_headroom: float = SC_MIN_HEADROOM,
                              min_coverage: float = SC_MIN_COVERAGE) -> SuperConvergenceVerdict:
    """Smith's signature: accuracy that stays high while the LR goes far past where the model learned.

    Judged on the high end of the curve, relative to the curve itself (METHOD.md section 2): ``learn_lr``
    is the first LR whose running-median accuracy (`level`) reaches `high_level`, ``top_lr`` the last.
    Super-convergence is ``possible`` when the band reaches at least `min_headroom` x ``learn_lr``
    (default 3: a cycle between max_lr/3 and max_lr - Smith's CLR bounds - then lies wholly inside it) and
    covers at least `min_coverage` of the LRs tested past ``learn_lr``, i.e. accuracy did not fall away
    soon after learning. Coverage is measured in LR, not log LR, whatever the ramp: Smith's signature is
    accuracy that stays high up to the large LRs at the top of the sweep (3.0 for SGD on CIFAR), so set
    end_lr of an exponential ramp to what counts as a very large LR for the optimizer. ``None`` (undetermined)
    when the model was still learning at the end of the ramp. `end_lr` is the last LR tested (the
    divergence point if the loss diverged), default the last of `lr`.
    """
    lr_a = as_1d("lr", lr)
    lv = as_1d("level", level)
    check_same_length("lr", lr_a, "level", lv)
    for name, value in (("min_headroom", min_headroom), ("min_coverage", min_coverage)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    high = np.flatnonzero(np.isfinite(lv) & (lv >= high_level) & (lr_a > 0))
    if len(high) == 0:
        raise ValueError(f"super_convergence_verdict needs a point with lr > 0 and level >= {high_level:g}, got none")
    first, last = int(high[0]), int(high[-1])
    learn, top = float(lr_a[first]), float(lr_a[last])
    end = float(lr_a[-1]) if end_lr is None else float(end_lr)
    span = end - learn
    coverage = (top - learn) / span if span > 0 else 0.0
    headroom = top / learn
    reaches_end = last == len(lr_a) - 1
    possible = None if still_learning else bool(headroom >= min_headroom and coverage >= min_coverage)
    message = verdict_message(possible, learn=learn, top=top, end=end, level=high_level, headroom=headroom,
                               coverage=coverage, reaches_end=reaches_end, diverged=diverged,
                               min_headroom=min_headroom, min_coverage=min_coverage)
    return SuperConvergenceVerdict(possible=possible, learn_lr=learn, top_lr=top, end_lr=end,
                                   headroom=float(headroom), coverage=coverage, high_level=float(high_level),
                                   reaches_end=reaches_end, diverged=bool(diverged),
                                   still_learning=bool(still_learning), message=message)


def _check_params(divisor: float, window: int | None, min_points: int, flat_tol: float, noise_tol: float,
                  high_frac: float, backoff: float) -> None:
    check_common(divisor, window if window is not None else 3, min_points)
    for name, value in (("flat_tol", flat_tol), ("noise_tol", noise_tol)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(high_frac) and 0 < high_frac < 1):
        raise ValueError(f"high_frac must be in (0, 1), got {high_frac!r}")
    if not (math.isfinite(backoff) and 0 < backoff <= 1):
        raise ValueError(f"backoff must be in (0, 1], got {backoff!r}")


@dataclass(frozen=True)
class Cut:
    """A range-test curve up to where its loss first went non-finite (``divergence_cut``)."""

    lr_all: np.ndarray  # every row's LR (the messages name where the loss diverged)
    cut: int | None  # the first row whose loss is non-finite; None: it never was
    lr: np.ndarray  # the rows before the cut with a finite LR and accuracy
    acc: np.ndarray
    lr_div: float | None  # where the loss diverged (None: it did not)

    @property
    def n(self) -> int:
        return len(self.lr)

    def note(self) -> str:
        """The messages' closing sentence about the cut ("" without one)."""
        return cut_note(self.cut, self.lr_all, self.n)


def divergence_cut(lr: ArrayLike, acc: ArrayLike, loss: ArrayLike | None = None, *,
                   diverged: bool = False) -> Cut:
    """The curve before the first non-finite `loss`, its finite (lr, acc) rows, and where the loss diverged:
    the last LR before it went non-finite, or the range test's last row when the test stopped at divergence
    (`diverged`: its smoothed loss ran away there)."""
    lr_all = as_1d("lr", lr)
    acc_all = as_1d("acc", acc)
    check_same_length("lr", lr_all, "acc", acc_all)
    loss_all = None
    if loss is not None:
        loss_all = as_1d("loss", loss)
        check_same_length("lr", lr_all, "loss", loss_all)
    cut = first_nonfinite(loss_all)
    end = len(lr_all) if cut is None else cut
    keep = np.isfinite(lr_all[:end]) & np.isfinite(acc_all[:end])
    lr_k, acc_k = lr_all[:end][keep], acc_all[:end][keep]
    check_lr(lr_k)
    before = lr_all[:end][np.isfinite(lr_all[:end])]
    lr_div = float(before[-1]) if (cut is not None or diverged) and len(before) else None
    return Cut(lr_all=lr_all, cut=cut, lr=lr_k, acc=acc_k, lr_div=lr_div)


def cut_status(c: Cut, *, min_points: int, divisor: float) -> LRBounds | None:
    """The statuses read before any level: ``diverged_at_start`` (non-finite loss in the first 10% of rows),
    ``too_few_points`` (< `min_points` evaluations). None: the curve can be read on."""
    n_total = len(c.lr_all)
    if c.cut is not None and c.cut < EARLY_CUT_FRAC * n_total:
        return no_bounds("smith", "diverged_at_start", divisor, early_cut_message(c.cut, n_total, c.lr_all))
    if c.n < min_points:
        why = (f"the loss diverged at LR {c.lr_div:.3g} after only {c.n} evaluated accuracy points (need >= "
               f"{min_points}): evaluate more often (smaller eval_every) or end the ramp near {c.lr_div:.3g}."
               if c.lr_div is not None else
               f"only {c.n} evaluated accuracy points (need >= {min_points}): use more num_iter or a smaller "
               f"eval_every.")
        return no_bounds("smith", "too_few_points", divisor, why[0].upper() + why[1:] + c.note())
    return None


@dataclass(frozen=True)
class Level:
    """Held-out accuracy read through its running median (``accuracy_level``)."""

    window: int
    median: np.ndarray  # the running median, one value per evaluation
    base: float  # the untrained model's accuracy (the range test evaluates it at row 0)
    top: float  # the best running median
    noise: float  # robust std of the raw accuracy around the running median

    @property
    def learned(self) -> float:
        return self.top - self.base


def accuracy_level(c: Cut, window: int | None = None) -> Level:
    """The running median of `window` evaluations (default ``auto_window``) and what it says."""
    w = auto_window(c.n) if window is None else int(window)
    level = running_median(c.acc, window=w)
    return Level(window=w, median=level, base=float(c.acc[0]), top=float(level.max()),
                 noise=robust_std(c.acc - level))


def level_status(c: Cut, lv: Level, *, flat_tol: float, noise_tol: float, divisor: float) -> LRBounds | None:
    """The statuses the level gives: ``flat`` (the best running median less than `flat_tol` above the
    untrained accuracy), ``diverged_at_start`` (nothing gained over the start and accuracy falls from
    there), ``noisy`` (robust std of raw - running median > `noise_tol` x learned range). None: ``ok``."""
    if lv.learned < flat_tol:
        start = max(lv.base, float(lv.median[0]))
        if start - float(lv.median.min()) >= max(flat_tol, 0.05):
            return no_bounds("smith", "diverged_at_start", divisor,
                             f"Accuracy is highest at the start of the sweep ({start:.3f}) and then falls to "
                             f"{lv.median.min():.3f}: the ramp starts too high, or the model was trained already. "
                             f"Lower start_lr (Smith starts at 0) and end_lr." + c.note(), peak_acc=start)
        return no_bounds("smith", "flat", divisor,
                         f"Held-out accuracy hardly changes over the sweep (from {lv.base:.3f} to a best running "
                         f"median of {lv.top:.3f}, flat_tol {flat_tol:g}): nothing was learned or the model "
                         f"is already trained. Raise end_lr or num_iter, or check the model and labels."
                         + c.note(), peak_acc=lv.top)
    noise_ratio = lv.noise / lv.learned
    if noise_ratio > noise_tol:
        return no_bounds("smith", "noisy", divisor,
                         f"Held-out accuracy is too noisy to read a level: its scatter around the running median "
                         f"(robust std {lv.noise:.3g}) is {noise_ratio:.2f} of what the model learned "
                         f"({lv.learned:.3g}; noise_tol {noise_tol:g}). Raise eval_samples, or repeat seeds and "
                         "aggregate." + c.note(), peak_acc=lv.top)
    return None


@dataclass(frozen=True)
class Band:
    """The high band of a readable curve and the ``max_lr`` it gives (``high_band``)."""

    high_level: float  # the running median counts as high at or above this
    first: int  # the band's first and last evaluation
    last: int
    falls: bool  # accuracy falls away after the band (its top is located)
    still_learning: bool  # the band begins only in the last quarter of the sweep
    top: float  # the band's last LR
    max_lr: float
    lower_bound: bool  # accuracy still high at the end of the ramp and no divergence


def high_band(c: Cut, lv: Level, *, high_frac: float, backoff: float) -> Band:
    """Where the running median stays within `high_frac` of the learned range below its best; ``max_lr`` is its
    last LR, or `backoff` x the divergence LR when the loss diverged while accuracy was still high."""
    high_level = lv.top - high_frac * lv.learned
    high = np.flatnonzero(lv.median >= high_level)
    first, last = int(high[0]), int(high[-1])
    falls = last < c.n - 1
    top = float(c.lr[last])
    max_lr = min(top, backoff * c.lr_div) if c.lr_div is not None and not falls else top
    return Band(high_level=high_level, first=first, last=last, falls=falls,
                still_learning=first > (1.0 - LEARNING_TAIL_FRAC) * (c.n - 1), top=top, max_lr=max_lr,
                lower_bound=not falls and c.lr_div is None)


def smith_confidence(n: int, noise_ratio: float, *, noise_tol: float, located: bool, still_learning: bool) -> float:
    """``(1 - exp(-n / 20))`` (points) x ``(1 - noise_ratio / noise_tol)`` (noise) x 1.0 if the top is
    `located` (accuracy falls or the loss diverges after it), 0.6 if only a lower bound, halved again when
    `still_learning`; in [0, 1]."""
    confidence = (points_confidence(n) * (1.0 - noise_ratio / noise_tol if noise_tol > 0 else 1.0)
                  * (1.0 if located else 0.6) * (0.5 if still_learning else 1.0))
    return float(np.clip(confidence, 0.0, 1.0))


def smith_message(c: Cut, lv: Level, band: Band, verdict: SuperConvergenceVerdict, *, divisor: float,
                  high_frac: float, backoff: float) -> str:
    """The bounds in words: the band, how its top was found, the verdict, the cut."""
    head = (f"max_lr {band.max_lr:.3g}, min_lr {band.max_lr / divisor:.3g} (= max_lr/{divisor:g}): held-out accuracy "
            f"(running median of {lv.window}) stays high, >= {band.high_level:.3f} ({high_frac:.0%} of the learned "
            f"range {lv.base:.3f}->{lv.top:.3f} below its best), from LR {c.lr[band.first]:.3g} to {band.top:.3g}")
    if band.still_learning:
        tail = (f"; the model was still learning when the ramp ended (the high band starts at point "
                f"{band.first + 1} of {c.n}), so max_lr is only a lower bound: lengthen num_iter "
                f"(x{max(2, math.ceil(2 * band.first / c.n))}) so learning ends in the first half of the ramp, or "
                "lower end_lr.")
    elif band.falls:
        tail = f", then falls away (to {lv.median[band.last + 1:].min():.3f} by LR {c.lr[-1]:.3g})."
    elif c.lr_div is not None:
        tail = f" and the loss diverged at LR {c.lr_div:.3g}: max_lr backs off to {backoff:g} x that."
    else:
        tail = (" and is still high at the last LR: max_lr is a lower bound (raise end_lr to see where accuracy "
                "falls; stage 2 searches above it).")
    return head + tail + " " + verdict.message + c.note()


def smith_bounds(lr: ArrayLike, acc: ArrayLike, *, loss: ArrayLike | None = None, divisor: float = MIN_LR_DIVISOR,
                 window: int | None = None, min_points: int = MIN_POINTS, flat_tol: float = FLAT_TOL, noise_tol: float = NOISE_TOL,
                 high_frac: float = HIGH_FRAC, sc_min_headroom: float = SC_MIN_HEADROOM,
                 sc_min_coverage: float = SC_MIN_COVERAGE, diverged: bool = False,
                 backoff: float = DIVERGENCE_BACKOFF,
                 ramp_end_lr: float | None = None) -> LRBounds:
    """Smith's rule: ``max_lr`` = the top of the band where held-out accuracy stays high, ``min_lr = max_lr / divisor``.

    The curve is read through its running median (`window` evaluations; default ~1/10 of them, 3..25), so
    the ragged swings of high-LR accuracy neither end the band nor make a peak. The *high band* is where
    that median is within `high_frac` of the learned range (peak - untrained accuracy) below its peak;
    ``max_lr`` is its last LR: the largest LR before accuracy falls away for good (1506.01186 section 3.3,
    1708.07120 figure 2: the authors trained at 0.1-3 on curves that stay ragged-high up to 3). Not the
    argmax of the plateau's noise.

    - Accuracy still high at the end of the ramp: ``max_lr`` = the last LR, ``lower_bound`` True (stage 2
      may search above it).
    - The loss diverged (first non-finite `loss`, or `diverged`: the range test stopped at divergence, so
      its last row is the divergence point) while accuracy was still high: back off to `backoff` x the
      divergence LR. A loss that diverges before the ramp's end (`ramp_end_lr`, the LR the test was set to
      reach) counts against super-convergence like accuracy that falls.
    - The high band begins only in the last quarter of the sweep: the model was still learning when the
      ramp ended. Bounds are given (a lower bound), ``still_learning`` is set, the verdict is undetermined
      and the message says to lengthen the ramp. This is not noise.

    Its steps, in order: ``divergence_cut``; the statuses (first match wins) of ``cut_status`` and
    ``level_status`` on the ``accuracy_level``, else ``ok``; ``high_band``; ``super_convergence_verdict``;
    ``smith_confidence`` (``ok`` only); ``smith_message``.
    """
    _check_params(divisor, window, min_points, flat_tol, noise_tol, high_frac, backoff)
    c = divergence_cut(lr, acc, loss, diverged=diverged)
    failed = cut_status(c, min_points=min_points, divisor=divisor)
    if failed is not None:
        return failed
    lv = accuracy_level(c, window)
    failed = level_status(c, lv, flat_tol=flat_tol, noise_tol=noise_tol, divisor=divisor)
    if failed is not None:
        return failed
    band = high_band(c, lv, high_frac=high_frac, backoff=backoff)
    verdict = super_convergence_verdict(c.lr, lv.median, high_level=band.high_level,
                                        end_lr=max(ramp_end_lr or 0.0, float(c.lr[-1])),
                                        diverged=c.lr_div is not None, still_learning=band.still_learning,
                                        min_headroom=sc_min_headroom, min_coverage=sc_min_coverage)
    confidence = smith_confidence(c.n, lv.noise / lv.learned, noise_tol=noise_tol,
                                  located=band.falls or c.lr_div is not None, still_learning=band.still_learning)
    message = smith_message(c, lv, band, verdict, divisor=divisor, high_frac=high_frac, backoff=backoff)
    logger.debug("smith_bounds: n=%d window=%d band=%d..%d noise_ratio=%.3f confidence=%.3f",
                 c.n, lv.window, band.first, band.last, lv.noise / lv.learned, confidence)
    recommended, why = recommend_max_lr(verdict.learn_lr, band.max_lr, likely=verdict.possible)
    return LRBounds(min_lr=band.max_lr / divisor, max_lr=band.max_lr, status="ok", confidence=confidence,
                    method="smith", divisor=float(divisor), peak_acc=lv.top, verdict=verdict, message=message,
                    lower_bound=band.lower_bound or band.still_learning, still_learning=band.still_learning,
                    recommended_max_lr=recommended, recommended_reason=why)
