"""Stage 2's plan, in one place: what the search searches, from the space file and stage 1's anchors.

``SearchPlan`` (typed, frozen; stored as ``search_plan.json``) holds the searched ranges resolved against
stage 1 (``dists``), the parameters that collapsed to a constant, the ``Anchors`` they were scaled with,
Smith's recipe as the first point, the rungs (the lengths of the complete one-cycle schedules stage 2's
successive halving trains, ``sctune.service.fidelity``; or ASHA's rungs with ``search.scheduler: asha``), the
selection score's key and the hash of its inputs (a stored plan is reused only when they are unchanged).

The functions that build it: ``stage1_anchors`` / ``search_anchors`` (stage 1's result or the user's
``--lr-bounds`` -> ``Anchors``), ``resolve`` (relative ranges -> absolute), ``recipe_point``,
``asha_rungs``, ``build_plan`` and ``stored_plan``; ``optuna_space`` turns the ranges into Optuna
distributions and ``make_sampler`` is the one place the sampler is configured (stages and benchmarks).

No torch and no Ray at import.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.bounds import recipe_max_lr
from .experiment import ExperimentPaths, read_dict, read_output, write_json
from .fidelity import ETA, RUNG_FRACTIONS, rung_epochs
from .space import Dist, SpaceSpec


@dataclass(frozen=True)
class Anchors:
    """Stage-1 results that relative ranges scale with.

    ``max_lr_lower_bound``: accuracy had not fallen yet when the range test's ramp ended, so
    ``max_lr_bound`` only says "at least this" (Smith & Topin's ResNet-56 curves stay high up to the
    ramp's end, LR 3); ``ramp_end_lr`` is where that ramp ended.
    """

    max_lr_bound: float
    min_lr_bound: float
    wd_prior: float
    max_lr_lower_bound: bool = False
    ramp_end_lr: float | None = None
    # The recipe's max_lr (stage 2's first point); None: max_lr_bound. Stage 1 sets it to its recommendation
    # (bounds.recommend_max_lr: max / 4, inside the band where super-convergence is likely), below the band's top.
    recipe_max_lr: float | None = None
    # Stage 1's verdict (None: unknown, e.g. --lr-bounds): the recipe reduces regularization unless it is False.
    # The reasons say how max_lr_bound and recipe_max_lr were read (bounds.json's ``chosen``).
    sc_likely: bool | None = None
    max_lr_reason: str = ""
    recipe_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Anchors:
        """From bounds.json's ``chosen`` (older files lack the two optional fields; extra keys are ignored)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


# -- anchors from stage 1 (or the user) ---------------------------------------------------------------

def stage1_anchors(spec: SpaceSpec, chosen: dict[str, Any] | None, *, lr_bounds: tuple[float, float] | None = None,
                   wd_prior: float | None = None) -> Anchors | None:
    """Stage 2's anchors from stage 1's chosen weight decay (``bounds.choose_weight_decay``'s row), or from the
    user's ``--lr-bounds`` (which win); ``--wd-prior`` wins over the chosen weight decay. None: neither."""
    if lr_bounds is not None:
        min_lr, max_lr = lr_bounds
        prior = wd_prior if wd_prior is not None else (chosen["weight_decay"] if chosen else spec.base.reg.weight_decay)
        return Anchors(max_lr_bound=max_lr, min_lr_bound=min_lr, wd_prior=prior, max_lr_reason="user (--lr-bounds)",
                       recipe_reason="max_lr itself: the user's bounds say nothing about a band")
    if chosen is None:
        return None
    prior = wd_prior if wd_prior is not None else chosen["weight_decay"]
    recipe, recipe_reason = recipe_max_lr(chosen)
    return Anchors(max_lr_bound=chosen["max_lr"], min_lr_bound=chosen["min_lr"], wd_prior=prior,
                   max_lr_lower_bound=bool(chosen.get("lower_bound")), ramp_end_lr=spec.range_test.end_lr,
                   recipe_max_lr=recipe, sc_likely=(chosen.get("verdict") or {}).get("possible"),
                   max_lr_reason=chosen.get("max_lr_reason") or "", recipe_reason=recipe_reason)


def search_anchors(bounds: dict[str, Any] | None, spec: SpaceSpec, *, lr_bounds: tuple[float, float] | None = None,
                   wd_prior: float | None = None) -> Anchors | None:
    """What stage 2 scales its ranges with: bounds.json's ``chosen``, else the user's ``--lr-bounds``,
    else None (nothing to search within)."""
    chosen = (bounds or {}).get("chosen")
    if lr_bounds is not None and not chosen:
        return stage1_anchors(spec, None, lr_bounds=lr_bounds, wd_prior=wd_prior)
    return Anchors.from_dict(chosen) if chosen else None


# -- the ranges --------------------------------------------------------------------------------------

# A max_lr bound that is only a lower bound says nothing about where accuracy falls: search up to
# this many times the ramp's end (Smith & Topin trained at the top of a band that reached the end of
# their 0 -> 3 ramp; beyond the ramp nothing was measured, so one doubling is explored, no more).
LOWER_BOUND_STRETCH = 2.0


def resolve(spec: SpaceSpec, anchors: Anchors) -> tuple[dict[str, Dist], dict[str, Any]]:
    """Absolute ranges for stage 2, plus parameters that collapsed to a constant.

    A weight-decay range scaled by a zero prior (no weight decay let the LR go highest) is scaled by
    the smallest positive weight decay the range tests tried instead, so weight decay stays in the
    search - on both sides of the smallest tested value - rather than silently dropping out. Any
    other range scaled by a zero anchor collapses to 0.

    When ``anchors.max_lr_lower_bound`` (accuracy never fell before the ramp ended), a ``max_lr``
    range scaled by an LR bound is widened to reach from below ``min_lr_bound`` to
    ``LOWER_BOUND_STRETCH`` x the ramp's end (or x ``max_lr_bound`` when the ramp's end is unknown).
    """
    out: dict[str, Dist] = {}
    constants: dict[str, Any] = {}
    a = anchors.to_dict()
    positive_wds = [w for w in spec.range_test.weight_decays if w > 0]
    for name, d in spec.space.items():
        if d.scale is None:
            out[name] = d
            continue
        factor = a[d.scale]
        if factor <= 0 and d.scale == "wd_prior" and positive_wds:
            factor = min(positive_wds)
        if factor <= 0:
            constants[name] = 0.0
            continue
        low, high = d.low * factor, d.high * factor
        if d.log and low <= 0:
            low = high * 1e-3
        if (name == "max_lr" and anchors.max_lr_lower_bound and d.scale in ("max_lr_bound", "min_lr_bound")
                and d.kind == "float"):
            top = max(anchors.ramp_end_lr or 0.0, anchors.max_lr_bound)
            high = max(high, LOWER_BOUND_STRETCH * top)
            low = min(low, anchors.min_lr_bound)
        out[name] = Dist(name, d.kind, low=low, high=high, log=d.log)
    return out, constants


def optuna_space(dists: Mapping[str, Dist]) -> dict[str, Any]:
    """The ranges as Optuna distributions."""
    import optuna

    out: dict[str, Any] = {}
    for name, d in dists.items():
        if d.kind == "categorical":
            out[name] = optuna.distributions.CategoricalDistribution(list(d.choices))
        elif d.kind == "int":
            out[name] = optuna.distributions.IntDistribution(int(d.low), int(d.high), log=d.log)
        else:
            out[name] = optuna.distributions.FloatDistribution(d.low, d.high, log=d.log)
    return out


def make_sampler(kind: str, *, seed: int, num_samples: int):
    """The Optuna sampler of stage 2 (and of the benchmarks' arms that use one): ``tpe`` (multivariate,
    ``n_startup_trials`` random draws first: a third of ``num_samples``, 2 to 10) or ``random``."""
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(2, min(10, num_samples // 3)))


# -- the first point ---------------------------------------------------------------------------------

# Smith's one-cycle runs start far below the max: 0.08 -> 0.8 (1803.09820, Fig. 2), 0.1 -> 3 (1708.07120);
# one-cycle users take max/10..20 (METHOD.md 2). The range test's divisor (max/3..4) is CLR's lower bound
# for repeated cycles between the bounds; the recipe's single cycle starts at max / this at the most.
RECIPE_DIV_FACTOR = 10.0


def recipe_point(dists: Mapping[str, Dist], anchors: Anchors, *, divisor: float) -> dict[str, Any]:
    """Smith's recipe from the stage-1 bounds, clipped into the space: the first point evaluated.

    * max_lr: ``anchors.recipe_max_lr``, stage 1's recommendation inside the high-accuracy band
      (``bounds.recipe_max_lr``), or the max bound (the band's top, 1708.07120 section 3) without one;
    * div_factor: one-cycle's ``max(RECIPE_DIV_FACTOR, divisor)`` (``divisor``: the range test's CLR
      divisor, the most the recipe's minimum may be above max/10);
    * weight decay: the one the range tests chose;
    * regularization: reduced (1708.07120 section 4: large LRs regularize, reduce the rest to keep the
      balance) unless stage 1 found super-convergence unlikely (``anchors.sc_likely``): there the LR cannot
      stand in for it, so dropout (and any other searched parameter without a recipe value) starts at the
      middle of its range instead of at the config default 0;
    * every other one-cycle value from the config defaults (``OneCycleConfig``: cycle 90% of the run,
      annihilation x1000, cyclical momentum 0.95 -> 0.85).

    Measured (BENCHMARKS.md finding 4): the recipe with the CLR divisor 4 and no dropout trained to 94.5%
    (MNIST-1D) and 98.2% (digits) where random draws from the same space reached ~97% and ~99.4%; its LR was
    too high over the cycle, and on MNIST-1D, where the LR cannot be large, the missing dropout cost a point.
    """
    from ..core.config import OneCycleConfig, RegularizationConfig

    large_lr = anchors.sc_likely is not False
    recipe = OneCycleConfig().to_dict()
    if large_lr:
        recipe |= RegularizationConfig().to_dict()
    max_lr = anchors.max_lr_bound if anchors.recipe_max_lr is None else anchors.recipe_max_lr
    recipe |= {"max_lr": max_lr, "div_factor": max(RECIPE_DIV_FACTOR, divisor), "weight_decay": anchors.wd_prior}
    point: dict[str, Any] = {}
    for name, d in dists.items():
        if d.kind == "categorical":
            v = recipe.get(name)
            point[name] = v if v in d.choices else d.choices[0]
        else:
            mid = math.sqrt(d.low * d.high) if d.log and d.low > 0 else (d.low + d.high) / 2
            v = recipe.get(name, mid)
            v = min(max(v, d.low), d.high)
            point[name] = int(round(v)) if d.kind == "int" else float(v)
    return point


# -- the rungs ---------------------------------------------------------------------------------------

def asha_rungs(spec: SpaceSpec) -> dict[str, Any]:
    """ASHA's time axis and first rung (``search.scheduler: asha``): compare trials only where they are in
    the same phase.

    During 1cycle the accuracy of a trial depends on where it is in its own schedule: it dips while the
    LR is high, the more the larger the LR, and trials with different ``cycle_frac`` are in different
    phases at the same epoch (on the 200-epoch CIFAR space, epoch 96 is the LR peak of a 0.95 cycle but
    already the descent of a 0.8 one). Trials therefore report ``phase`` (``schedules.schedule_phase``:
    0 start, 1 LR peak, 2 end of the cycle, 3 end of the run) and ASHA's rungs sit at equal phase. The
    default first rung is the end of the cycle (``search.rung_phase: 2``): every trial has finished its
    cycle and sits at its min LR. On recorded MNIST-1D histories (``tests/test_early_stopping.py``) an
    earlier rung (the LR peak, or halfway down) pruned the eventual winner in about 40% of trial orders,
    because rankings during one-cycle flip up to the cycle's end. An explicit ``search.grace_period``
    (epochs) restores epoch rungs.
    """
    from ..core.schedules import PHASE_RUN_END  # imported here: schedules loads torch, space files must not

    s = spec.search
    if s.grace_period is not None:
        return {"time_attr": "epoch", "grace_period": min(s.grace_period, spec.base.epochs),
                "max_t": spec.base.epochs}
    return {"time_attr": "phase", "grace_period": s.rung_phase, "max_t": PHASE_RUN_END}


# -- the plan ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchPlan:
    """Stage 2's plan (``build_plan``); ``search_plan.json`` is its ``to_dict``."""

    dists: dict[str, Dist]
    constants: dict[str, Any]
    anchors: Anchors
    recipe: dict[str, Any]
    select: str  # the selection score's key: trials are ranked by it (``train.tail_key``)
    scheduler: str  # halving | asha | none (``search.scheduler``)
    rungs: tuple[int, ...] = ()  # halving: epochs of each rung's complete one-cycle, the last the full length
    eta: int = ETA  # halving: the top 1/eta of a rung is promoted
    asha: dict[str, Any] | None = None  # asha: ``asha_rungs``
    made_from: dict[str, Any] = field(default_factory=dict)  # the inputs, as JSON
    inputs_hash: str = ""

    @property
    def full_epochs(self) -> int | None:
        return self.rungs[-1] if self.rungs else None

    def to_dict(self) -> dict[str, Any]:
        return {"dists": {n: d.to_dict() for n, d in self.dists.items()}, "constants": dict(self.constants),
                "anchors": self.anchors.to_dict(), "recipe": dict(self.recipe), "select": self.select,
                "scheduler": self.scheduler, "rungs": list(self.rungs), "eta": self.eta, "asha": self.asha,
                "made_from": self.made_from, "inputs_hash": self.inputs_hash}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchPlan:
        dists = {}
        for n, d in data["dists"].items():
            if "choices" in d:
                dists[n] = Dist(n, "categorical", choices=tuple(d["choices"]))
            else:
                dists[n] = Dist(n, d["type"], low=d["low"], high=d["high"], log=bool(d["log"]))
        return cls(dists=dists, constants=dict(data["constants"]), anchors=Anchors.from_dict(data["anchors"]),
                   recipe=dict(data["recipe"]), select=data["select"], scheduler=data["scheduler"],
                   rungs=tuple(int(e) for e in data.get("rungs") or ()), eta=int(data.get("eta", ETA)),
                   asha=data.get("asha"), made_from=dict(data.get("made_from") or {}),
                   inputs_hash=data.get("inputs_hash", ""))


def plan_inputs(spec: SpaceSpec, anchors: Anchors) -> dict[str, Any]:
    """What ``build_plan`` reads, as JSON: a stored plan is reused only if these are unchanged."""
    s = spec.search
    return json.loads(json.dumps({
        "anchors": anchors.to_dict(), "space": {n: d.to_dict() for n, d in spec.space.items()},
        "divisor": spec.range_test.divisor, "weight_decays": list(spec.range_test.weight_decays),
        "epochs": spec.base.epochs, "metric": s.metric, "scheduler": s.scheduler, "rung_phase": s.rung_phase,
        "grace_period": s.grace_period, "fractions": list(RUNG_FRACTIONS)}))


def build_plan(spec: SpaceSpec, anchors: Anchors) -> SearchPlan:
    """Stage 2 from stage 1's anchors: the searched ranges, the constants, Smith's recipe as the first point,
    the rungs and the selection score's key."""
    from ..core.train import tail_key  # train loads torch: only when a plan is made

    dists, constants = resolve(spec, anchors)
    inputs = plan_inputs(spec, anchors)
    s = spec.search
    return SearchPlan(
        dists=dists, constants=constants, anchors=anchors,
        recipe=recipe_point(dists, anchors, divisor=spec.range_test.divisor), select=tail_key(s.metric),
        scheduler=s.scheduler, rungs=rung_epochs(spec.base.epochs) if s.scheduler == "halving" else (),
        asha=asha_rungs(spec) if s.scheduler == "asha" else None, made_from=inputs,
        inputs_hash=hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16])


def write_plan(paths: ExperimentPaths, plan: SearchPlan) -> None:
    write_json(paths.search_plan, plan.to_dict())


def read_plan(path) -> SearchPlan:
    return SearchPlan.from_dict(read_dict(path))


def stored_plan(paths: ExperimentPaths, spec: SpaceSpec, anchors: Anchors) -> SearchPlan:
    """Stage 2's plan: the stored one when it was made from the same inputs (a resumed or later run sees what
    the search ran with), else made now and stored. Made once, then read, not recomputed."""
    plan = build_plan(spec, anchors)
    saved = read_output(paths.search_plan, read_plan)
    if saved is not None and saved.inputs_hash == plan.inputs_hash:
        return saved
    write_plan(paths, plan)
    return plan
