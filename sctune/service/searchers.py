"""Stage 2's Ray Tune searchers, made in one place (``make_searcher``) for the stage and the benchmarks.

* ``HalvingSearcher`` (``search.scheduler: halving``, the default): successive halving over complete
  one-cycle schedules (``sctune.service.fidelity.Promotion``). Smith's recipe trains at the full length
  first (the anchor); new configurations come from Optuna (TPE) at the shortest length; a configuration in
  the top half of its length's results is suggested again with a longer ``epochs`` (the trainable builds
  the whole one-cycle for that length).
  It spends the budget itself, in epochs, so it needs no ``BudgetLimiter``.
* ``OptunaSearch`` (``asha`` or ``none``: every trial at the full length), wrapped in ``BudgetLimiter``
  when there is a budget.

Ray is imported with this module: it is loaded only when a search runs (``stages``) or a benchmark drives
a searcher in-process.
"""

from __future__ import annotations

import math
import pickle
import tempfile
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search import ConcurrencyLimiter, Searcher

from .fidelity import Promotion, rungs_for_budget
from .plan import SearchPlan, make_sampler, optuna_space
from .space import SpaceSpec

EPOCHS_KEY = "epochs"  # the fidelity: the trainable trains a complete one-cycle of this many epochs


class HalvingSearcher(Searcher):
    """Successive halving of complete schedules as a Ray Tune ``Searcher``.

    ``suggest`` returns a configuration with ``epochs`` (its schedule's length) and ``_rung`` / ``_config``
    (bookkeeping, ignored by the trainable), ``None`` while nothing may start yet (running trials decide the
    next promotion, or the budget is committed), or ``FINISHED``. Optuna learns from the shortest length's
    scores only: scores of different lengths are not comparable.
    """

    def __init__(self, plan: SearchPlan, *, mode: str, budget_epochs: float | None, sampler,
                 max_concurrent: int | None = None, max_configs: int | None = None, recipe: bool = True):
        super().__init__(metric=plan.select, mode=mode)
        # The searcher limits concurrency itself, in its saved books: Ray's ConcurrencyLimiter does not save
        # its live trials, so after --resume it would drop the completions of the trials it restored and
        # the ladder would wait for them for ever.
        self.max_concurrent = max_concurrent
        self.space = optuna_space(plan.dists)
        # Smith's recipe is the anchor: one full training first (``Promotion.add_anchor``); the ladder gets
        # what is left, over as many rungs as that leaves room for (``rungs_for_budget``)
        full = plan.rungs[-1] if plan.rungs else None
        ladder = budget_epochs - full if recipe and budget_epochs is not None and full else budget_epochs
        self.books = Promotion(rungs_for_budget(plan.rungs, ladder), eta=plan.eta, mode=mode,
                               budget_epochs=budget_epochs, max_configs=max_configs)
        if recipe:
            self.books.add_anchor(dict(plan.recipe))
        self.study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", sampler=sampler)
        self.asked: dict[str, Any] = {}  # trial id -> its Optuna trial (shortest length only)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if (self.max_concurrent is not None and self.books.in_flight >= self.max_concurrent
                and trial_id not in self.books.trial_of):
            return None
        s = self.books.suggest(trial_id)
        if s == "finished":
            return Searcher.FINISHED
        if s is None:
            return None
        cid = s.cid
        if cid is None:
            ot = self.study.ask(self.space)
            self.asked[trial_id] = ot
            cid = self.books.add_config(trial_id, ot.params)
        return dict(self.books.configs[cid]) | {EPOCHS_KEY: s.epochs, "_rung": s.rung, "_config": cid}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        result = result or {}
        score = None if error or result.get("diverged") else result.get(self.metric)
        self.books.complete(trial_id, score, float(result.get("epoch") or 0))
        ot = self.asked.pop(trial_id, None)
        if ot is not None:
            if score is not None and math.isfinite(score):
                self.study.tell(ot, float(score))
            else:
                self.study.tell(ot, state=optuna.trial.TrialState.FAIL)

    # Tune saves the searcher for --resume: the books, the study and the open Optuna trials
    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.__dict__))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))


class BudgetLimiter(ConcurrencyLimiter):
    """Ray's ``ConcurrencyLimiter`` that also never lets a full-length search spend more than
    ``budget_epochs`` (``search.scheduler: asha`` or ``none``).

    A trial starts only if a full run of it still fits: the epochs finished trials ran plus ``max_epochs``
    for every running one (it may not be pruned) plus ``max_epochs`` for the new one. A pruned or diverged
    trial gives back what it did not run, so the next trial may start. When nothing is running and a full
    trial no longer fits, the search is finished.
    """

    def __init__(self, searcher, max_concurrent: int, *, budget_epochs: float, max_epochs: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.budget_epochs, self.max_epochs = float(budget_epochs), int(max_epochs)
        self.ran: dict[str, float] = {}  # trial id -> epochs it ran
        self.running: set[str] = set()

    @property
    def committed(self) -> float:
        return sum(v for k, v in self.ran.items() if k not in self.running) + self.max_epochs * len(self.running)

    def suggest(self, trial_id: str):
        if self.committed + self.max_epochs > self.budget_epochs + 1e-9:
            return Searcher.FINISHED if not self.running else None
        suggestion = super().suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.running.add(trial_id)
            self.ran[trial_id] = 0.0
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(result.get("epoch"), (int, float)):
            self.ran[trial_id] = max(self.ran.get(trial_id, 0.0), float(result["epoch"]))
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and isinstance(result.get("epoch"), (int, float)):
            self.ran[trial_id] = max(self.ran.get(trial_id, 0.0), float(result["epoch"]))
        self.running.discard(trial_id)
        super().on_trial_complete(trial_id, result=result, error=error)

    # Tune saves the searcher for --resume through ``save``: keep the budget's books with the inner state.
    def save(self, checkpoint_path: str):
        with tempfile.TemporaryDirectory() as d:
            inner = Path(d) / "inner.pkl"
            self.searcher.save(str(inner))
            blob = inner.read_bytes() if inner.exists() else None
        Path(checkpoint_path).write_bytes(pickle.dumps({"inner": blob, "limiter": self.get_state()}))

    def restore(self, checkpoint_path: str):
        data = pickle.loads(Path(checkpoint_path).read_bytes())
        self.set_state(data["limiter"])
        if data["inner"] is not None:
            with tempfile.TemporaryDirectory() as d:
                inner = Path(d) / "inner.pkl"
                inner.write_bytes(data["inner"])
                self.searcher.restore(str(inner))


def make_searcher(spec: SpaceSpec, plan: SearchPlan, *, budget_epochs: float | None, sampler: str = "tpe",
                  recipe: bool = True) -> Searcher:
    """Stage 2's search algorithm for ``plan`` (its ``scheduler``), seeded with ``search.seed``.

    ``budget_epochs``: what the search may spend, in epochs (None: ``num_samples`` full trainings).
    ``sampler``: ``tpe`` (sctune's) or ``random`` (the benchmarks' baseline arm). ``recipe``: Smith's recipe
    is the first configuration (only a benchmark's random arm turns it off)."""
    from ray.tune.search.optuna import OptunaSearch

    s = spec.search
    samp = make_sampler(sampler, seed=s.seed, num_samples=s.num_samples)
    if plan.scheduler == "halving":
        return HalvingSearcher(plan, mode=s.mode, sampler=samp, recipe=recipe, max_concurrent=s.max_concurrent,
                               budget_epochs=(
            budget_epochs if budget_epochs is not None else s.num_samples * spec.base.epochs))
    # Optuna learns from the selection score (mean of the last evaluations), the number trials are ranked by;
    # ASHA compares the precise-BN metric of the epoch at which trials reach the same phase.
    searcher = OptunaSearch(space=optuna_space(plan.dists), metric=plan.select, mode=s.mode,
                            points_to_evaluate=[dict(plan.recipe)] if recipe else None, sampler=samp)
    if budget_epochs is not None:
        searcher = BudgetLimiter(searcher, s.max_concurrent, budget_epochs=budget_epochs, max_epochs=spec.base.epochs)
    return searcher


def make_scheduler(spec: SpaceSpec, plan: SearchPlan):
    """Ray's ASHA with rungs at equal schedule phase (``search.scheduler: asha``), else None."""
    if plan.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    r, s = plan.asha, spec.search
    return ASHAScheduler(time_attr=r["time_attr"], metric=s.metric, mode=s.mode, max_t=r["max_t"],
                         grace_period=r["grace_period"], reduction_factor=s.reduction_factor)
