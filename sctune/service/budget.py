"""Compute in full-training equivalents (FTE) and the plan of an experiment, before anything starts.

One FTE is one full training run of the space's ``fixed`` budget: ``epochs x steps_per_epoch``
iterations on the training split (``steps_per_epoch = n_train // batch_size``: the last partial
batch is dropped). Every stage is counted in it: stage 1 by range-test iterations, the search by
the epochs its trials ran (pruned and diverged trials count what they ran), the final fit by its
iterations. A peer's one-shot recipe (an LR finder plus one one-cycle run) costs about 1.1 FTE.

With a budget (``--budget FTE`` / ``search.budget``) the three stages share it:

* stage 1 gets at most ``RANGE_SHARE`` of it: repeats are cut first (down to 1), then weight decays
  (the ones farthest from the config's default, 1e-4, the authors' best on ResNet-56, go first);
  the range test's own length is not cut for a budget (shorter tests read the top badly);
* the final fit gets at most ``FINAL_SHARE``: fewer seeds, down to 0, where the search's best trial
  itself is the final model and is tested once (its checkpoint; no extra training);
* the search gets the rest, measured after stage 1 ran (its real cost), and spends it as complete
  one-cycle schedules of 1/8 .. 1 of the training (``fidelity.Promotion``: a trial at 1/8 costs 1/8 FTE,
  it starts only while the ladder it belongs to still fits), so the budget is never exceeded.

Without either (and without ``--smoke``) a run gets ``DEFAULT_BUDGET_FTE`` (8 FTE in all).

With or without a budget, one range test is at most ``range_test.max_fte`` (default 0.5) of one
training (``range_test_length``): a space file's ``num_iter`` sized for the full dataset would otherwise
cost more than the trainings it sizes when the data shrink (``train_subset: 1000`` of MNIST-1D: two
160-iteration tests = 2.3 FTE of a 140-iteration training).

The plan needs neither Ray nor torch (dataset sizes are passed in); ``make_plan`` loads them in the driver
(``dataset_sizes``), and the accounting after the stages (``range_cost_fte``, ``compute_summary``) reads what
they wrote.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..core.config import ConfigError, RegularizationConfig

# Shares of a budget: stage 1 is a measurement whose value does not grow with the budget (a few range
# tests place the bounds; BENCHMARKS.md: 12 of them cost 9-16 FTE on the CPU tasks and left the search
# 1-2 FTE from the target), and the final fit only re-measures; the search is where the budget buys
# accuracy.
RANGE_SHARE = 0.25
# A run with no --budget and no search.budget (and not --smoke) gets this many FTE in all: stage 1, the
# multi-fidelity search and the final fit (issue 18: a default run at most ~8 FTE). On digits: stage 1 ~0.9,
# the search ~5.5 FTE = Smith's recipe point in full, then 5 configurations at 1/2 and the better 2 in full
# (BENCHMARKS.md 8), one final seed. Why so few are enough: on the shipped spaces the configurations stage 1's space
# holds differ by little more than seed noise at the full length (BENCHMARKS.md 1a: two full-length runs
# of the same 14 rank them with Spearman 0.23-0.38), so more configurations buy little; benchmark 1b
# measures sctune at 8 FTE against the other methods.
DEFAULT_BUDGET_FTE = 8.0
FINAL_SHARE = 0.2


class BudgetError(ConfigError):
    """The budget cannot hold one search trial next to stage 1 and the final fit."""


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Iterations per epoch of ``DeviceLoader`` (drop_last: the last partial batch is dropped)."""
    return max(1, n_train // max(1, min(batch_size, n_train)))


def range_test_length(rt, full_iters: int | None) -> tuple[int, int]:
    """``(num_iter, eval_every)`` of one range test, capped at ``rt.max_fte`` of a training of ``full_iters``.

    The paper's range tests took 5k-20k iterations for trainings of 10k-80k: about half a training or less.
    A range test needs enough iterations for the model to learn at all before the LR grows large (the
    ``still_learning`` verdict says when it did not), so the cap is a share of the training, not a fixed
    count: on 1,000 MNIST-1D samples (140 iterations an FTE) 70-iteration tests read the same bounds as
    160-iteration ones within their seed spread (BENCHMARKS.md, benchmark 1). A shortened test keeps its
    number of held-out evaluations (``eval_every`` scaled down, at least 1) so the curve is read as finely.
    A test within one evaluation interval of the cap is left alone (the paper's 5,000 iterations for its
    9,996-iteration training stay 5,000).
    """
    if rt.max_fte is None or not full_iters:
        return rt.num_iter, rt.eval_every
    cap = max(10, math.ceil(rt.max_fte * full_iters))
    if rt.num_iter <= math.ceil(cap / rt.eval_every) * rt.eval_every:
        return rt.num_iter, rt.eval_every
    evals = max(1, rt.num_iter // rt.eval_every)
    return cap, max(1, cap // evals)


def plan_compute(spec, sizes: dict[str, int] | None, *, budget: float | None = None,
                 budget_key: str = "search.budget", budget_is_default: bool = False):
    """``(spec, plan)``: the spec trimmed to fit ``budget`` (unchanged without one) and its plan.

    ``sizes``: ``{"train": n, "val": n}`` of the task's splits (``DatasetSplits.sizes``), or None when
    unknown (then iterations are not shown and a budget cannot be planned: BudgetError).
    """
    base, rt, final = spec.base, spec.range_test, spec.final
    E = base.epochs
    if sizes is None:
        if budget is not None:
            raise BudgetError(budget_key, "needs the dataset's size to count compute, and the dataset could not be "
                              "loaded here (check task.data_root)")
        spe = full = None
    else:
        spe = steps_per_epoch(sizes["train"], base.batch_size)
        full = E * spe
    trimmed: dict[str, Any] = {}
    num_iter, eval_every = range_test_length(rt, full)
    if num_iter != rt.num_iter:
        why = f"to fit range_test.max_fte ({rt.max_fte:g} of one training)"
        trimmed["range_test.num_iter"] = (rt.num_iter, num_iter, why)
        if eval_every != rt.eval_every:
            trimmed["range_test.eval_every"] = (rt.eval_every, eval_every, why)
        rt = rt.replace(num_iter=num_iter, eval_every=eval_every)
    wds, repeats, seeds = list(rt.weight_decays), rt.repeats, final.seeds
    refit_fte, refit_epochs, refit_spe = 1.0, E, spe
    if final.refit and sizes is not None:
        # as many iterations as a search trial ran (the paper's budgets are in iterations): more data per
        # epoch, fewer epochs
        refit_spe = steps_per_epoch(sizes["train"] + sizes["val"], base.batch_size)
        refit_epochs = max(1, round(full / refit_spe))
        refit_fte = refit_epochs * refit_spe / full
    test_fte = (lambda n_wd, r: n_wd * r * rt.num_iter / full) if full else (lambda n_wd, r: math.nan)
    if budget is not None:
        while test_fte(len(wds), repeats) > RANGE_SHARE * budget and repeats > 1:
            repeats -= 1
        default_wd = RegularizationConfig().weight_decay
        while test_fte(len(wds), repeats) > RANGE_SHARE * budget and len(wds) > 1:
            far = max(wds, key=lambda w: (abs(math.log10(w / default_wd)) if w > 0 else math.inf, w))
            wds.remove(far)
        seeds = min(seeds, math.floor(FINAL_SHARE * budget / refit_fte + 1e-9))
        why = "to fit the budget"
        if repeats != rt.repeats:
            trimmed["range_test.repeats"] = (rt.repeats, repeats, why)
        if wds != list(rt.weight_decays):
            trimmed["range_test.weight_decays"] = (list(rt.weight_decays), wds, why)
        if seeds != final.seeds:
            trimmed["final.seeds"] = (final.seeds, seeds, why)
    range_fte = test_fte(len(wds), repeats)
    final_fte = seeds * refit_fte
    search_fte = None if budget is None else budget - range_fte - final_fte
    if budget is not None and search_fte < 1.0:
        raise BudgetError(budget_key, (
            f"{budget:g} FTE cannot hold stage 1 ({range_fte:.2f} FTE: {len(wds)} weight decay(s) x {repeats} "
            f"repeat(s) x {rt.num_iter} iterations, already cut to its minimum), the final fit ({final_fte:.2f} "
            f"FTE) and one full search trial (1 FTE); give at least {math.ceil((range_fte + final_fte + 1) * 10) / 10:g}, "
            "or shorten range_test.num_iter (or range_test.max_fte)"))
    if trimmed:
        spec = dataclasses.replace(spec, range_test=rt.replace(weight_decays=tuple(wds), repeats=repeats),
                                   final=final.replace(seeds=seeds))
    plan = {
        "fte": {"epochs": E, "steps_per_epoch": spe, "iterations": full, "batch_size": base.batch_size,
                "train_samples": None if sizes is None else sizes["train"],
                "val_samples": None if sizes is None else sizes["val"]},
        "budget_fte": budget,
        "budget_default": budget_is_default,
        "range": {"tests": len(wds) * repeats, "weight_decays": wds, "repeats": repeats,
                  "iterations_each": rt.num_iter, "iterations": len(wds) * repeats * rt.num_iter,
                  "fte": range_fte},
        "search": {"fte": search_fte, "max_trials": spec.search.num_samples, "scheduler": spec.search.scheduler,
                   "fte_without_budget": float(spec.search.num_samples)},
        "final": {"seeds": seeds, "refit": final.refit, "epochs": refit_epochs,
                  "iterations_each": None if refit_spe is None else refit_epochs * refit_spe,
                  "fte": final_fte},
        "trimmed": {k: {"from": a, "to": b, "why": why} for k, (a, b, why) in trimmed.items()},
    }
    return spec, plan


def halving_text(search_fte: float) -> str:
    """How the halving search spends ``search_fte`` (``searchers.HalvingSearcher``): the recipe in full
    first (the anchor), then the ladder over the lengths ``fidelity.rungs_for_budget`` leaves it."""
    from fractions import Fraction

    from .fidelity import RUNG_FRACTIONS, rungs_for_budget

    if search_fte < 2:
        return "Smith's recipe point, trained in full (too little for a second configuration)"
    rungs = rungs_for_budget(RUNG_FRACTIONS, search_fte - 1)
    if len(rungs) == 1:
        return "Smith's recipe point in full first, then full trainings of new configurations"
    names = [str(Fraction(f).limit_denominator(64)) for f in rungs[:-1]]
    return (f"Smith's recipe point in full first, then complete one-cycles of {', '.join(names)} and all of the "
            "training, the top half promoted")


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_plan(plan: dict[str, Any]) -> list[str]:
    """The plan as printed before anything starts (``[plan]`` lines)."""
    u, r, s, f = plan["fte"], plan["range"], plan["search"], plan["final"]
    it = "?" if u["iterations"] is None else f"{u['iterations']:,}"
    spe = "?" if u["steps_per_epoch"] is None else str(u["steps_per_epoch"])
    lines = [f"1 FTE = {u['epochs']} epochs x {spe} iterations = {it} iterations "
             f"({u['train_samples'] or '?'} training samples, batch {u['batch_size']}, last partial batch dropped)"]
    lines.append(f"stage 1: {r['tests']} range tests ({len(r['weight_decays'])} weight decay(s) x {r['repeats']} "
                 f"seed(s)) x {r['iterations_each']:,} iterations = {r['iterations']:,} iterations = "
                 f"{_f(r['fte'])} FTE of training steps; its held-out evaluations add to it (measured as it runs)")
    if s["fte"] is not None:
        how = (halving_text(s["fte"]) if s.get("scheduler", "halving") == "halving"
               else "trials start while a full run still fits")
        lines.append(f"search:  {_f(s['fte'])} FTE (what the budget leaves after stage 1 and the final fit; {how})")
    elif s.get("scheduler", "halving") == "halving":
        lines.append(f"search:  {s['fte_without_budget']:.0f} FTE (search.num_samples full trainings' worth; "
                     f"{halving_text(s['fte_without_budget'])})")
    else:
        lines.append(f"search:  at most {s['max_trials']} trials = {s['fte_without_budget']:.0f} FTE if none is "
                     "pruned")
    if f["seeds"]:
        its = "?" if f["iterations_each"] is None else f"{f['iterations_each']:,}"
        lines.append(f"final:   {f['seeds']} seed(s) x {f['epochs']} epochs = {its} iterations each"
                     f"{' on train + validation' if f['refit'] else ''} = {_f(f['fte'])} FTE")
    else:
        lines.append("final:   0 seeds: the search's best trial is tested as it is (0 FTE)")
    total = None if r["fte"] is None or math.isnan(r["fte"]) else r["fte"] + f["fte"] + (
        s["fte"] if s["fte"] is not None else s["fte_without_budget"])
    budget = plan.get("budget_fte")
    default = " (the default budget; --budget FTE sets another)" if plan.get("budget_default") else ""
    lines.append(f"total:   {_f(total)} FTE" + (f" of a budget of {budget:g} FTE{default}" if budget is not None
                                                 else " planned (no budget set: --budget FTE)"))
    for key, ch in plan.get("trimmed", {}).items():
        lines.append(f"{ch.get('why', 'to fit the budget')}: {key} {ch['from']} -> {ch['to']}")
    return lines


# -- a run's compute: the plan on the task's real split sizes, the FTE each stage spent ------------------

def dataset_sizes(spec) -> dict[str, int] | None:
    """Split sizes of the task's data (loaded once in the driver, then freed); None if it cannot be loaded
    here (e.g. a cluster whose data lives only on the workers)."""
    import logging

    from ..core.data import known_split_sizes, load_dataset

    try:
        sizes = load_dataset(spec.base.task).sizes()
    except Exception as e:
        sizes = known_split_sizes(spec.base.task)
        if sizes is None:
            logging.getLogger("sctune").warning("could not load %s here to count iterations (%s); the plan "
                                                "shows epochs only", spec.base.task.dataset, e)
    return sizes


def make_plan(spec, *, budget_from_cli: bool = False, sizes: dict[str, int] | None | bool = False,
              default_budget: bool = False) -> tuple[Any, dict[str, Any]]:
    """``plan_compute`` on the task's real split sizes (``sizes``, loaded here if not given); a budget it
    cannot meet is a UsageError (exit 2) naming ``--budget`` or the space file's ``search.budget``.
    ``default_budget``: a spec without a budget gets ``DEFAULT_BUDGET_FTE`` (not with --smoke: its tiny
    budgets are the smoke section's)."""
    from .experiment import UsageError

    key = "--budget" if budget_from_cli else f"{spec.path}: search.budget"
    is_default = default_budget and spec.search.budget is None
    if is_default:
        spec = spec.with_search(budget=DEFAULT_BUDGET_FTE)
        key = f"--budget (none given: the default {DEFAULT_BUDGET_FTE:g} FTE)"
    try:
        return plan_compute(spec, dataset_sizes(spec) if sizes is False else sizes, budget=spec.search.budget,
                            budget_key=key, budget_is_default=is_default)
    except BudgetError as e:
        raise UsageError(key, e.rule) from None


def search_budget(budget_fte: float | None, range_fte: float | None, cplan: dict[str, Any]) -> float | None:
    """The search's share of the budget: what is left after stage 1 (its real cost) and the planned final fit."""
    from .experiment import StageError

    if budget_fte is None:
        return None
    left = budget_fte - (range_fte or 0.0) - cplan["final"]["fte"]
    if left < 1.0:
        raise StageError(f"after stage 1 ({range_fte:.2f} FTE) and the final fit ({cplan['final']['fte']:.2f} "
                         f"FTE), the budget of {budget_fte:g} FTE leaves {left:.2f} FTE: not one "
                         "full search trial; raise --budget")
    return left


def range_cost_fte(bounds: dict[str, Any] | None, paths, full_iters: int | None) -> float | None:
    """Stage 1's cost in FTE: bounds.json's ``cost_fte`` when stage 1 reports it, else the range-test
    iterations in curves.csv (one row per step taken; ``paths``: the ``ExperimentPaths``) / the iterations of
    one FTE."""
    if bounds is None:
        return None
    if isinstance(bounds.get("cost_fte"), (int, float)):
        return float(bounds["cost_fte"])
    if not full_iters or not paths.curves.exists():
        return None
    with paths.curves.open() as f:
        steps = sum(1 for _ in f) - 1
    return max(0, steps) / full_iters


def accuracy_se(value: Any, n: int | None) -> float | None:
    """Binomial standard error of an accuracy measured on ``n`` samples (None where it does not apply)."""
    if not n or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return None
    return (value * (1.0 - value) / n) ** 0.5


def compute_summary(budget: float | None, range_fte: float | None, search: float, final: float,
                    plan: dict[str, Any]) -> dict[str, Any]:
    """best.json's ``compute``: the FTE each stage spent, against the budget."""
    total = (range_fte or 0.0) + search + final
    return {"budget_fte": budget, "spent_fte": {"range": range_fte, "search": search, "final": final,
                                                "total": total},
            "fte": plan["fte"], "within_budget": None if budget is None else total <= budget + 1e-9}
