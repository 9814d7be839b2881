"""What the LR-bound finders share: the result types, input checks, the cut at the first non-finite loss, the
recommended max_lr's rule (``recommend_max_lr``).

Private to :mod:`sctune.core.bounds` (Smith's rule) and :mod:`sctune.core.loss_bounds` (the loss-based finders), which
both build an :class:`LRBounds`; import the public names from ``sctune.core.bounds``. A module of its own so that
bounds.py can dispatch to the loss finders without either importing the other in a cycle.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

# One logger name for every finder: it is the name users see in `-v` output (it was bounds.py's).
logger = logging.getLogger("sctune.core.bounds")

BoundsStatus = Literal["ok", "flat", "diverged_at_start", "too_few_points", "noisy"]
STATUSES: tuple[str, ...] = ("ok", "flat", "diverged_at_start", "too_few_points", "noisy")

# A non-finite loss this early means the ramp starts (or climbs) too high: the brief's 10% of the sweep.
EARLY_CUT_FRAC = 0.10
# Confidence from the number of evaluation points: 1 - exp(-n / 20). About 20 evaluations place the peak
# within ~5% of the sweep; 8 points (the minimum) give 0.33, 30 (RangeTestConfig: 300 iters / eval_every 10)
# give 0.78, 61 give 0.95.
CONF_POINTS_SCALE = 20.0
# Both readers' defaults (Smith's and the loss methods): a curve of fewer than MIN_POINTS evaluations is too short
# (a peak needs neighbours); one whose smoothed level moves less than FLAT_TOL (of accuracy; of the starting loss)
# is flat; one whose scatter around its smoothed level exceeds NOISE_TOL of the change is noisy.
MIN_POINTS = 8
FLAT_TOL = 0.02
NOISE_TOL = 0.25
# The divergence point is where the loss has already risen to diverge_th x its best, past the usable range;
# back off by 2x. (fastai's "lr_min / 10" targets a fixed LR; a one-cycle peak can sit closer to the edge.)
DIVERGENCE_BACKOFF = 0.5
# The recommended max_lr (the first point's): a quarter of the high band's top, max_lr / RECOMMEND_DIVISOR. Where
# super-convergence is likely it is raised to the LR where the model had learned (the band's start) if below it,
# so it lies inside the band; where it is unlikely the top is the edge of a collapse and it stays at max / 4.
# Measured (BENCHMARKS.md section 7, full one-cycle trainings across the band, 3 seeds each): with the signature
# (digits, 0 -> 3 and 0 -> 10 ramps) accuracy is flat over the band's lower part and falls towards its top
# (digits 0 -> 10: 99.4% at 0.8-2.0, 98.9% at the top 5.3, 87% at 8.1); without it (MNIST-1D, full and 1,000
# samples) the best max_lr lay below the band's start (97.5% at 0.65 against 96.7% at the start 0.89 and 94.8%
# at the top 1.34; 80.5% at 0.33 against 78.8% at the start 0.74). It reads 0.75 on each of the authors' four
# ResNet-56 curves (band 0.015-0.3 -> 3), where the band's geometric middle moved from 0.21 to 0.95.
# Where super-convergence is unlikely and the band is wider than the divisor (its start below max / 4), the
# recommendation goes halfway (in log LR) from max / 4 down to the start: wine's MLP (a task-only file) learned
# at 0.0127 and collapsed past 0.29; at max / 4 (0.072) its full trainings tested at 0.988 +- 0.016, at 0.03-0.036
# (near the geometric middle, 0.030) at 0.993-0.994 +- 0.011-0.013 (16 seeds each, dropout 0.15).
RECOMMEND_DIVISOR = 4.0


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SuperConvergenceVerdict:
    """Whether the range test shows Smith's super-convergence signature: accuracy high far past learning."""

    possible: bool | None  # None: undetermined, the model was still learning when the ramp ended
    learn_lr: float  # first LR whose running-median accuracy is in the high band: learning is done
    top_lr: float  # last LR in the high band, before accuracy falls away for good (or the loss diverges)
    end_lr: float  # last LR tested: the ramp's end, or the divergence point
    headroom: float  # top_lr / learn_lr
    coverage: float  # share of the LRs tested past learn_lr over which accuracy stays high
    high_level: float  # the accuracy floor of the band
    reaches_end: bool  # the band reaches the last tested LR
    diverged: bool  # the loss diverged (end_lr is the divergence point)
    still_learning: bool
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
    lower_bound: bool = False  # max_lr is only a lower bound: accuracy never fell (or still learning)
    still_learning: bool = False  # the model had not finished learning when the ramp ended
    # The first point's max_lr: inside the high band, below its top (bounds.recommend_max_lr); None for the
    # loss-based finders, which read no band. ``recommended_reason`` says how it was read.
    recommended_max_lr: float | None = None
    recommended_reason: str = ""

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


def no_bounds(method: str, status: BoundsStatus, divisor: float, message: str,
               peak_acc: float | None = None) -> LRBounds:
    logger.info("range test (%s): %s - %s", method, status, message)
    return LRBounds(min_lr=None, max_lr=None, status=status, confidence=0.0, method=method, divisor=divisor,
                    peak_acc=peak_acc, verdict=None, message=message)



# --------------------------------------------------------------------------------------------- checks
def as_1d(name: str, values: ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def check_same_length(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_name} and {b_name} must have the same length, got {len(a)} and {len(b)}")


def check_common(divisor: float, window: int, min_points: int) -> None:
    if not (isinstance(divisor, (int, float, np.floating)) and math.isfinite(divisor) and divisor >= 1):
        raise ValueError(f"divisor must be a finite number >= 1 (min_lr = max_lr / divisor), got {divisor!r}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if isinstance(min_points, bool) or not isinstance(min_points, (int, np.integer)) or min_points < 3:
        raise ValueError(f"min_points must be an integer >= 3 (a peak needs neighbours), got {min_points!r}")


def check_lr(lr: np.ndarray) -> None:
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


def first_nonfinite(loss: np.ndarray | None) -> int | None:
    if loss is None:
        return None
    bad = np.flatnonzero(~np.isfinite(loss))
    return int(bad[0]) if len(bad) else None


def points_confidence(n: int) -> float:
    return 1.0 - math.exp(-n / CONF_POINTS_SCALE)


def cut_note(cut: int | None, lr_all: np.ndarray, n_used: int) -> str:
    if cut is None:
        return ""
    lr_at = lr_all[cut]
    where = f"LR {lr_at:.3g}" if math.isfinite(lr_at) else f"row {cut}"
    return f" The loss became non-finite at row {cut} ({where}); only the {n_used} points before it were used."


def early_cut_message(cut: int, n_total: int, lr_all: np.ndarray) -> str:
    lr_at = lr_all[cut]
    where = f" (LR {lr_at:.3g})" if math.isfinite(lr_at) else ""
    return (
        f"The loss became non-finite at row {cut} of {n_total}{where}, within the first "
        f"{EARLY_CUT_FRAC:.0%} of the sweep: lower end_lr (or start_lr) so the ramp reaches the divergence "
        f"point late, or check the model/data for NaNs."
    )


def recommend_max_lr(learn_lr: float, max_lr: float, *, likely: bool | None = True,
                     divisor: float = RECOMMEND_DIVISOR) -> tuple[float, str]:
    """``(recommended max_lr, reason)``: ``max_lr / divisor``; raised to `learn_lr` (the band's start) when below
    it, unless super-convergence is unlikely (``likely`` False); there, when ``learn_lr`` lies below
    ``max_lr / divisor``, lowered to their geometric middle (full trainings peak near the band's start).

    ``max_lr`` (the band's top, Smith's reading) stays the upper end of the search; full one-cycle trainings
    are best in the band's lower part, or below it where the band ends in a collapse (BENCHMARKS.md section 7).
    A linear fraction of the top, not a point in log LR between ``learn_lr`` and the top: ``learn_lr`` is known
    only to the resolution of the range test's evaluations (the first evaluation on the authors' 20k-iteration
    curve, LR 0.015), and a log-space middle inherits that. Only a wide band without the signature moves in
    log LR, and only below max / divisor (wine: 0.020-0.030 where max / 4 read 0.067-0.108). Never above
    ``max_lr``.
    """
    if not (math.isfinite(divisor) and divisor >= 1):
        raise ValueError(f"divisor must be a finite number >= 1, got {divisor!r}")
    quarter = max_lr / divisor
    if likely is False:  # the top is the edge of a collapse: full trainings peak near the band's start
        why = "super-convergence is unlikely, the band's top is the edge of a collapse, and full trainings peak"
        if quarter < learn_lr:
            return float(quarter), (f"max_lr / {divisor:g}, below the band's start (LR {learn_lr:.3g}): {why} below "
                                    f"the band there")
        return float(math.sqrt(learn_lr * quarter)), (
            f"halfway (in log LR) from max_lr / {divisor:g} = {quarter:.3g} down to the band's start, LR "
            f"{learn_lr:.3g}: {why} near the band's start there")
    why = "full trainings peak in the band's lower part, not at its top"
    if quarter >= learn_lr:
        return float(quarter), (f"max_lr / {divisor:g}, in the band that starts at LR {learn_lr:.3g} (where the model "
                                f"had learned): {why}")
    return float(min(learn_lr, max_lr)), (f"the band's start, LR {learn_lr:.3g}, where the model had learned (max_lr / "
                                          f"{divisor:g} = {quarter:.3g} lies below the band): {why}")
