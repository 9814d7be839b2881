"""LR bounds from an LR range test: pure functions of a curve (METHOD.md sections 2 and 4).

Smith's rule (1506.01186 section 3.3, 1708.07120 section 3): run the LR up linearly from ~0, record held-out
accuracy, take ``max_lr`` at the top of the band where accuracy stays high - the largest LR before it falls
away for good or the loss diverges - and ``min_lr = max_lr / 3..4``. If accuracy stays high far past the LR
at which the model learned (ResNet-56/CIFAR-10: up to LR 3.0), super-convergence is likely;
:func:`super_convergence_verdict` reports that band, relative to the curve itself. Smith's reader, step by
step, lives in :mod:`sctune.core.bounds_smith`; this module re-exports it, runs a method on a range-test frame,
and aggregates the tests of a weight decay and across weight decays.

The loss-based suggestions (steepest, valley, divergence: the LR-finder conventions of fastai and
pytorch-lr-finder, for runs without held-out accuracy) live in :mod:`sctune.core.loss_bounds`;
:func:`bounds_from_frame` runs whichever ``range_test.method`` names.

Every function returns an :class:`LRBounds` whose ``status`` says whether the curve was usable. A degenerate
curve (too short, flat, diverged at the start, noisy) never yields bounds: ``min_lr`` and ``max_lr`` are then
``None`` and ``message`` says what to change in the range test. Nothing here imports torch or ray.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .bounds_common import (
    RECOMMEND_DIVISOR,  # noqa: F401 - re-exported (the recommendation's rule)
    STATUSES,
    LRBounds,
    SuperConvergenceVerdict,
    jsonable,
    recommend_max_lr,  # noqa: F401 - re-exported
)
from .bounds_smith import (  # noqa: F401 - re-exported: Smith's reader is part of this module's interface
    HIGH_FRAC,
    LEARNING_TAIL_FRAC,
    MEDIAN_WINDOW_FRAC,
    SC_MIN_COVERAGE,
    SC_MIN_HEADROOM,
    running_median,
    smith_bounds,
    super_convergence_verdict,
)
from .loss_bounds import suggest_divergence, suggest_steepest, suggest_valley

# LRBounds, SuperConvergenceVerdict, STATUSES, jsonable and recommend_max_lr (with RECOMMEND_DIVISOR) are defined
# in bounds_common (loss_bounds builds LRBounds too) and are part of this module's interface: import them from here.
METHODS: tuple[str, ...] = ("smith", "steepest", "valley", "divergence")


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
