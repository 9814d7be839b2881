"""LR bounds from an LR range test: pure functions of a curve (METHOD.md sections 2 and 4).

Smith's rule (1506.01186 section 3.3, 1708.07120 section 3): run the LR up linearly from ~0, record held-out
accuracy, take ``max_lr`` at the top of the band where accuracy stays high - the largest LR before it falls
away for good or the loss diverges - and ``min_lr = max_lr / 3..4``. If accuracy stays high far past the LR
at which the model learned (ResNet-56/CIFAR-10: up to LR 3.0), super-convergence is likely;
:func:`super_convergence_verdict` reports that band, relative to the curve itself.

The loss-based suggestions (steepest, valley, divergence: the LR-finder conventions of fastai and
pytorch-lr-finder, for runs without held-out accuracy) live in :mod:`sctune.loss_bounds`;
:func:`bounds_from_frame` runs whichever ``range_test.method`` names.

Every function returns an :class:`LRBounds` whose ``status`` says whether the curve was usable. A degenerate
curve (too short, flat, diverged at the start, noisy) never yields bounds: ``min_lr`` and ``max_lr`` are then
``None`` and ``message`` says what to change in the range test. Nothing here imports torch or ray.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from .bounds_common import (
    DIVERGENCE_BACKOFF,
    EARLY_CUT_FRAC,
    RECOMMEND_DIVISOR,  # noqa: F401 - re-exported (the recommendation's rule)
    STATUSES,
    LRBounds,
    SuperConvergenceVerdict,
    as_1d,
    check_common,
    check_lr,
    check_same_length,
    cut_note,
    early_cut_message,
    first_nonfinite,
    jsonable,
    no_bounds,
    points_confidence,
    recommend_max_lr,
)
from .loss_bounds import suggest_divergence, suggest_steepest, suggest_valley

logger = logging.getLogger(__name__)

# LRBounds, SuperConvergenceVerdict, STATUSES, jsonable and recommend_max_lr (with RECOMMEND_DIVISOR) are defined
# in bounds_common (loss_bounds builds LRBounds too) and are part of this module's interface: import them from here.
METHODS: tuple[str, ...] = ("smith", "steepest", "valley", "divergence")

# The high band: held-out accuracy counts as "still high" while its running median stays within this fraction
# of the learned range (best running median - untrained accuracy) below its best. On the authors' ResNet-56
# tests (shared reference curves) high-LR accuracy swings by 0.1-0.2 around ~0.75 after learning from 0.1:
# single points fall 15-30% of the learned range, the running median stays within ~10%.
HIGH_FRAC = 0.2
# Running-median window as a share of the evaluated points (odd, 3..25): 5 of 51, 21 of 201, 25 of 1001.
MEDIAN_WINDOW_FRAC = 0.1
# The model is "still learning" when its accuracy first reaches the high band in the last quarter of the ramp.
LEARNING_TAIL_FRAC = 0.25
# Super-convergence verdict: the band must reach >= 3x the LR at which the model learned (a cycle between
# Smith's max_lr/3 and max_lr then lies wholly inside it) and cover most (>= 60%) of the sweep past that LR:
# MNIST-1D's BatchNorm CNN, where one-cycle does not beat the baseline at 8x fewer iterations (BENCHMARKS.md),
# collapses at 30-50% of a 0->3 sweep; every curve of the authors' stays high to the end (100%).
SC_MIN_HEADROOM = 3.0
SC_MIN_COVERAGE = 0.6


# --------------------------------------------------------------------------------------------- helpers
def _robust_std(x: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the std of Gaussian noise, blind to a few outliers."""
    if len(x) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


# --------------------------------------------------------------------------------------------- Smith
def _auto_window(n: int) -> int:
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


def _verdict_message(possible: bool | None, *, learn: float, top: float, end: float, level: float,
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
    message = _verdict_message(possible, learn=learn, top=top, end=end, level=high_level, headroom=headroom,
                               coverage=coverage, reaches_end=reaches_end, diverged=diverged,
                               min_headroom=min_headroom, min_coverage=min_coverage)
    return SuperConvergenceVerdict(possible=possible, learn_lr=learn, top_lr=top, end_lr=end,
                                   headroom=float(headroom), coverage=coverage, high_level=float(high_level),
                                   reaches_end=reaches_end, diverged=bool(diverged),
                                   still_learning=bool(still_learning), message=message)


def smith_bounds(lr: ArrayLike, acc: ArrayLike, *, loss: ArrayLike | None = None, divisor: float = 4.0,
                 window: int | None = None, min_points: int = 8, flat_tol: float = 0.02, noise_tol: float = 0.25,
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

    Status, first match wins: ``diverged_at_start`` (non-finite loss in the first 10% of rows),
    ``too_few_points`` (< `min_points` evaluations), ``flat`` (the best running median is less than
    `flat_tol` above the untrained accuracy, the first evaluation), ``diverged_at_start`` (nothing gained
    over the start and accuracy falls from there), ``noisy`` (robust std of raw - running median > `noise_tol` x learned range: no level can be
    read), else ``ok``.

    Confidence (``ok`` only) = ``(1 - exp(-n / 20))`` (points) x ``(1 - noise_ratio / noise_tol)`` (noise) x
    1.0 if the top is located (accuracy falls or the loss diverges after it), 0.6 if only a lower bound,
    halved again when still learning.
    """
    check_common(divisor, window if window is not None else 3, min_points)
    for name, value in (("flat_tol", flat_tol), ("noise_tol", noise_tol)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(high_frac) and 0 < high_frac < 1):
        raise ValueError(f"high_frac must be in (0, 1), got {high_frac!r}")
    if not (math.isfinite(backoff) and 0 < backoff <= 1):
        raise ValueError(f"backoff must be in (0, 1], got {backoff!r}")
    lr_all = as_1d("lr", lr)
    acc_all = as_1d("acc", acc)
    check_same_length("lr", lr_all, "acc", acc_all)
    loss_all = None
    if loss is not None:
        loss_all = as_1d("loss", loss)
        check_same_length("lr", lr_all, "loss", loss_all)
    n_total = len(lr_all)
    method = "smith"

    cut = first_nonfinite(loss_all)
    end = n_total if cut is None else cut
    keep = np.isfinite(lr_all[:end]) & np.isfinite(acc_all[:end])
    lr_k, acc_k = lr_all[:end][keep], acc_all[:end][keep]
    check_lr(lr_k)
    n = len(lr_k)

    if cut is not None and cut < EARLY_CUT_FRAC * n_total:
        return no_bounds(method, "diverged_at_start", divisor, early_cut_message(cut, n_total, lr_all))
    # Where the loss diverged: the last LR before it went non-finite, or the range test's last row when the
    # test stopped at divergence (its smoothed loss ran away there).
    before = lr_all[:end][np.isfinite(lr_all[:end])]
    lr_div = float(before[-1]) if (cut is not None or diverged) and len(before) else None
    if n < min_points:
        why = (f"the loss diverged at LR {lr_div:.3g} after only {n} evaluated accuracy points (need >= "
               f"{min_points}): evaluate more often (smaller eval_every) or end the ramp near {lr_div:.3g}."
               if lr_div is not None else
               f"only {n} evaluated accuracy points (need >= {min_points}): use more num_iter or a smaller "
               f"eval_every.")
        return no_bounds(method, "too_few_points", divisor, why[0].upper() + why[1:] + cut_note(cut, lr_all, n))

    w = _auto_window(n) if window is None else int(window)
    level = running_median(acc_k, window=w)
    base = float(acc_k[0])  # the untrained model's accuracy (the range test evaluates it at row 0)
    top_level = float(level.max())
    learned = top_level - base
    if learned < flat_tol:
        start = max(base, float(level[0]))
        if start - float(level.min()) >= max(flat_tol, 0.05):
            return no_bounds(method, "diverged_at_start", divisor,
                              f"Accuracy is highest at the start of the sweep ({start:.3f}) and then falls to "
                              f"{level.min():.3f}: the ramp starts too high, or the model was trained already. "
                              f"Lower start_lr (Smith starts at 0) and end_lr." + cut_note(cut, lr_all, n),
                              peak_acc=start)
        return no_bounds(method, "flat", divisor,
                          f"Held-out accuracy hardly changes over the sweep (from {base:.3f} to a best running "
                          f"median of {top_level:.3f}, flat_tol {flat_tol:g}): nothing was learned or the model "
                          f"is already trained. Raise end_lr or num_iter, or check the model and labels."
                          + cut_note(cut, lr_all, n), peak_acc=top_level)
    high_level = top_level - high_frac * learned
    high = np.flatnonzero(level >= high_level)
    first, last = int(high[0]), int(high[-1])
    falls = last < n - 1
    noise = _robust_std(acc_k - level)
    noise_ratio = noise / learned
    if noise_ratio > noise_tol:
        return no_bounds(method, "noisy", divisor,
                          f"Held-out accuracy is too noisy to read a level: its scatter around the running median "
                          f"(robust std {noise:.3g}) is {noise_ratio:.2f} of what the model learned ({learned:.3g}; "
                          f"noise_tol {noise_tol:g}). Raise eval_samples, or repeat seeds and aggregate."
                          + cut_note(cut, lr_all, n), peak_acc=top_level)

    still_learning = first > (1.0 - LEARNING_TAIL_FRAC) * (n - 1)
    top = float(lr_k[last])
    max_lr = top
    lower_bound = not falls and lr_div is None
    if lr_div is not None and not falls:
        max_lr = min(top, backoff * lr_div)
    verdict = super_convergence_verdict(lr_k, level, high_level=high_level,
                                        end_lr=max(ramp_end_lr or 0.0, float(lr_k[-1])),
                                        diverged=lr_div is not None, still_learning=still_learning,
                                        min_headroom=sc_min_headroom, min_coverage=sc_min_coverage)
    min_lr = max_lr / divisor
    located = 1.0 if (falls or lr_div is not None) else 0.6
    confidence = (points_confidence(n) * (1.0 - noise_ratio / noise_tol if noise_tol > 0 else 1.0) * located
                  * (0.5 if still_learning else 1.0))

    head = (f"max_lr {max_lr:.3g}, min_lr {min_lr:.3g} (= max_lr/{divisor:g}): held-out accuracy (running median "
            f"of {w}) stays high, >= {high_level:.3f} ({high_frac:.0%} of the learned range {base:.3f}->"
            f"{top_level:.3f} below its best), from LR {lr_k[first]:.3g} to {top:.3g}")
    if still_learning:
        tail = (f"; the model was still learning when the ramp ended (the high band starts at point {first + 1} of "
                f"{n}), so max_lr is only a lower bound: lengthen num_iter (x{max(2, math.ceil(2 * first / n))}) "
                f"so learning ends in the first half of the ramp, or lower end_lr.")
    elif falls:
        tail = f", then falls away (to {level[last + 1:].min():.3f} by LR {lr_k[-1]:.3g})."
    elif lr_div is not None:
        tail = f" and the loss diverged at LR {lr_div:.3g}: max_lr backs off to {backoff:g} x that."
    else:
        tail = (" and is still high at the last LR: max_lr is a lower bound (raise end_lr to see where accuracy "
                "falls; stage 2 searches above it).")
    message = head + tail + " " + verdict.message + cut_note(cut, lr_all, n)
    logger.debug("smith_bounds: n=%d window=%d band=%d..%d noise_ratio=%.3f confidence=%.3f",
                 n, w, first, last, noise_ratio, confidence)
    recommended, why = recommend_max_lr(verdict.learn_lr, max_lr, likely=verdict.possible)
    return LRBounds(min_lr=min_lr, max_lr=max_lr, status="ok", confidence=float(np.clip(confidence, 0.0, 1.0)),
                    method=method, divisor=float(divisor), peak_acc=top_level, verdict=verdict, message=message,
                    lower_bound=lower_bound or still_learning, still_learning=still_learning,
                    recommended_max_lr=recommended, recommended_reason=why)


# --------------------------------------------------------------------------------------------- frames
def bounds_kwargs(cfg: Any, *, method: str | None = None, diverged: bool = False) -> dict[str, Any]:
    """The finder's keyword arguments from a ``RangeTestConfig`` (`cfg`) and whether the test diverged."""
    method = method or cfg.method
    kw: dict[str, Any] = {"divisor": cfg.divisor}
    if method == "smith":
        kw |= {"high_frac": cfg.high_frac, "sc_min_headroom": cfg.sc_min_headroom,
               "sc_min_coverage": cfg.sc_min_coverage, "diverged": diverged,
               "ramp_end_lr": cfg.end_lr}
    return kw


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


def _verdict_vote(verdicts: list[SuperConvergenceVerdict]) -> bool | None:
    """Majority over the seeds' verdicts; undetermined (None) when most seeds were still learning."""
    decided = [v.possible for v in verdicts if v.possible is not None]
    if not verdicts or len(decided) * 2 <= len(verdicts):
        return None
    return sum(decided) * 2 > len(decided)


def _max_lr_reason(methods: list[str], lower_bound: bool) -> str:
    """Why max_lr is what it is: the reading of the finder that produced it (one sentence)."""
    if methods != ["smith"]:
        return f"the loss-based reading ({', '.join(methods)}); the upper end of the search"
    return ("the top of the band where held-out accuracy stays high (Smith's reading), the upper end of the search"
            + (": a lower bound, accuracy was still high at the end of the ramp" if lower_bound else ""))


def aggregate_bounds(results: Sequence[LRBounds]) -> dict[str, Any]:
    """Combine the range tests of one weight decay over seeds (METHOD.md section 2: "repeat and aggregate").

    The weight decay counts (``status`` "ok") only when most of its seeds are usable (``n_ok > n_total / 2``);
    with fewer it is "inconsistent" if any seed was usable, else the most common failure (ties: the order of
    ``STATUSES``). Bounds are the medians of the usable seeds (robust to one odd seed), with their spread
    (min, max, median, relative IQR). ``lower_bound`` and ``still_learning`` hold when they hold for most
    usable seeds; ``verdict`` is the seeds' majority (None when most were still learning) with the message
    of the seed nearest the median max_lr. ``recommended_max_lr`` (the first point's max_lr, inside the band) is
    the median of the seeds' recommendations; ``max_lr_reason`` and ``recommended_reason`` say how each value
    was read. ``confidence`` is the mean over *all* seeds (a failed seed counts
    as 0, so it also says how reproducible the test was). The dict is JSON-serialisable.
    """
    results = list(results)
    if not results:
        raise ValueError("aggregate_bounds needs at least one LRBounds, got 0")
    for i, r in enumerate(results):
        if not isinstance(r, LRBounds):
            raise ValueError(f"results[{i}] must be an LRBounds, got {type(r).__name__}")
    ok = [r for r in results if r.ok]
    counts = Counter(r.status for r in results)
    if len(ok) * 2 > len(results):
        status = "ok"
    elif ok:
        status = "inconsistent"
    else:
        status = max(STATUSES, key=lambda st: (counts.get(st, 0), -STATUSES.index(st)))
    methods = sorted({r.method for r in results})
    max_spread = _spread([r.max_lr for r in ok])
    min_spread = _spread([r.min_lr for r in ok])
    verdicts = [r.verdict for r in ok if r.verdict is not None]
    possible = _verdict_vote(verdicts)
    decided = [v.possible for v in verdicts if v.possible is not None]
    verdict = None
    if verdicts:
        median = max_spread["median"]
        rep = min((r for r in ok if r.verdict is not None), key=lambda r: abs(r.max_lr - median))
        verdict = {"possible": possible, "message": rep.verdict.message,
                   "possible_frac": (sum(decided) / len(decided)) if decided else None,
                   "learn_lr": _median_or_none([v.learn_lr for v in verdicts]),
                   "top_lr": _median_or_none([v.top_lr for v in verdicts]),
                   "end_lr": _median_or_none([v.end_lr for v in verdicts]),
                   "headroom": _median_or_none([v.headroom for v in verdicts]),
                   "coverage": _median_or_none([v.coverage for v in verdicts])}
    recs = [r for r in ok if r.recommended_max_lr is not None]
    rec_median = _median_or_none([r.recommended_max_lr for r in recs])
    rec_reason = None
    if recs and status == "ok":
        rep_rec = min(recs, key=lambda r: abs(r.recommended_max_lr - rec_median))
        rec_reason = (rep_rec.recommended_reason if len(recs) == 1 else
                      f"median of {len(recs)} range tests' readings; nearest: {rep_rec.recommended_reason}")
    lower = sum(r.lower_bound for r in ok) * 2 > len(ok) if ok else False
    if status == "ok":
        message = (f"{len(ok)}/{len(results)} range tests usable: median max_lr {max_spread['median']:.3g} "
                   f"(range {max_spread['min']:.3g}..{max_spread['max']:.3g}), median min_lr "
                   f"{min_spread['median']:.3g}.")
    elif ok:
        message = (f"Only {len(ok)} of {len(results)} range tests usable ({dict(counts)}): not enough to trust "
                   f"this weight decay's bounds. " + next(r for r in results if not r.ok).message)
    else:
        message = f"No usable range test out of {len(results)} (mostly {status}): " + results[
            [r.status for r in results].index(status)].message
    out = {
        "status": status,
        "min_lr": min_spread["median"] if status == "ok" else None,
        "max_lr": max_spread["median"] if status == "ok" else None,
        "max_lr_reason": _max_lr_reason(methods, lower) if status == "ok" else None,
        "recommended_max_lr": rec_median if status == "ok" else None,
        "recommended_reason": rec_reason,
        "lower_bound": lower,
        "still_learning": sum(r.still_learning for r in ok) * 2 > len(ok) if ok else False,
        "n_ok": len(ok),
        "n_total": len(results),
        "spread": {"max_lr": max_spread, "min_lr": min_spread},
        "confidence": float(np.mean([r.confidence for r in results])),  # non-ok results count as 0
        "peak_acc": _median_or_none([r.peak_acc for r in ok if r.peak_acc is not None]),
        "verdict": verdict,
        "statuses": dict(counts),
        "method": methods[0] if len(methods) == 1 else "mixed",
        "message": message,
    }
    return jsonable(out)


# The weight decays whose peak accuracy is within this of the best are tied; confidence then decides.
PEAK_ACC_TIE = 0.01


def choose_weight_decay(per_wd: dict[str, Any]) -> dict[str, Any] | None:
    """The weight-decay prior: the usable WD whose held-out accuracy peaked highest (1803.09820 compares WDs by
    how well the model does across the sweep), ties within ``PEAK_ACC_TIE`` broken by confidence and then by
    the larger max_lr. Not the largest max_lr alone: on a ragged curve that is the noisiest reading."""
    usable = [v for v in per_wd.values() if v["status"] == "ok"]
    if not usable:
        return None
    best_peak = max(v["peak_acc"] or 0.0 for v in usable)
    tied = [v for v in usable if (v["peak_acc"] or 0.0) >= best_peak - PEAK_ACC_TIE]
    return max(tied, key=lambda v: (v["confidence"], v["max_lr"]))


def recipe_max_lr(chosen: dict[str, Any]) -> tuple[float | None, str]:
    """``(max_lr, reason)`` of stage 2's first point (the recipe) from one weight decay's aggregate
    (``aggregate_bounds``): its ``recommended_max_lr``, inside the high band (``recommend_max_lr``). ``None``
    (the band's top, ``max_lr``) when there is no recommendation (a loss-based finder, no band).

    History: the first point used to train at the band's top where super-convergence was likely (the paper's
    0.1 -> 3 on ResNet-56) and at min_lr (max / divisor) where it was not. Full trainings across the band
    (BENCHMARKS.md section 7) put the best max_lr inside the band on every task measured, not at its top.
    """
    rec = chosen.get("recommended_max_lr")
    if not rec or not chosen.get("max_lr"):
        return None, "max_lr itself: no band was read (loss-based finder)"
    return float(rec), str(chosen.get("recommended_reason") or "")
