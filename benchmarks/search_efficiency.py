"""Benchmark 1: search efficiency. sctune vs what users would do instead, at equal compute.

Arms (same task, same data split, same training loop ``sctune.core.train.fit``; repeat r seeds everything):

* ``sctune``: stage 1 exactly as sctune runs it with ``--budget B`` (the space file's range tests, planned by
  ``sctune.service.budget.plan_compute`` for that budget: each at most ``range_test.max_fte`` of one training, at
  most a quarter of the budget), bounds and WD prior from ``sctune.service.stages.summarize_range_tests``, stage 2's
  plan from ``sctune.service.plan.build_plan``, then stage 2 itself: the very Ray ``Searcher`` the stage uses
  (``sctune.service.searchers.make_searcher``: successive halving over complete one-cycle schedules of 1/8 .. 1 of
  the training, ``sctune.service.fidelity.Promotion``; new configurations from Optuna's multivariate TPE, Smith's
  recipe first), asked for one trial at a time. A halving search is planned for its budget, so this arm
  runs once per budget (2, 4, 8 and 16 FTE); its accuracy at B is the answer of the run planned for B.
* ``random_halving``: the same, configurations drawn at random (Optuna's RandomSampler), no recipe point.
* ``random``: the space-file stage 1 (its cost is charged too), then random search over the same resolved
  joint space, every trial a full training, no recipe point, no pruning.
* ``conventional``: what a Ray Tune user writes without sctune: OptunaSearch (multivariate TPE, same
  seed/startup) + ASHA (grace_period 1, the Ray default; reduction factor as in the space file) over a
  wide space: LR log-uniform 1e-4..10 with the step (piecewise-constant) schedule, WD log 1e-5..1e-2,
  dropout 0..0.5, SGD momentum 0.9.
* ``fastai``: fastai's recipe: one exponential LR finder (1e-7 -> 10, 100 iterations, stop when the
  loss exceeds 4x its best: sctune's range test with step_mode exp, AdamW, momentum 0.9), fastai's
  ``valley`` suggestion (ported line for line, see ``fastai_valley``; ``sctune.core.loss_bounds.suggest_valley``
  is recorded next to it), then one ``fit_one_cycle`` run
  with fastai's defaults: AdamW (decoupled WD 0.01), pct_start 0.25, div 25, final_div 1e5,
  moms 0.95-0.85-0.95, cosine annealing (torch ``OneCycleLR``, two phases).

What ran where: everything runs in-process, sequentially (one trial at a time), not through Ray.
The algorithms are the ones sctune hands to Ray: sctune's own ``HalvingSearcher`` object, and for the
conventional and random arms optuna's samplers (``sctune.service.plan.make_sampler``) driven by ask/tell exactly
as Ray's ``OptunaSearch`` drives it (pruned trials are told COMPLETE with their last metric, as
``OptunaSearch.on_trial_complete`` does) and Ray's own ``ASHAScheduler`` object fed each epoch's
result (``on_trial_add`` / ``on_trial_result`` / ``on_trial_complete``). Differences from a real
sctune run: concurrency 1 instead of ``max_concurrent`` 2 (TPE sees every result before the next
ask, ASHA never waits), and no Ray actor/checkpoint overhead (benchmark 3 measures that separately).

Compute = trial-epochs actually run (pruned and diverged trials count what they ran) + range-test
iterations / steps per epoch. 1 FTE = one full training run of the task (``fixed.epochs``).
Accuracy = *test* accuracy of the incumbent: the completed trial with the best validation score among
those of the longest schedule so far (test data is never used for selection).
"""

from __future__ import annotations

import functools
import math
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from benchmarks.common import (
    REPO,
    envelope,
    loadavg,
    log,
    out_dir,
    parser,
    stats,
    write_result,
)

NAME = "search_efficiency"
ARMS = ("sctune", "random_halving", "random", "conventional", "fastai")
HALVING_ARMS = ("sctune", "random_halving")
# A halving search is planned for its budget (``fidelity.rungs_for_budget``, ``Promotion.planned``): what a
# user gets with ``--budget B`` is a run planned for B, not the first B FTE of a longer one. These arms run
# once per budget; their accuracy at B is that run's answer (the best at its longest schedule).
HALVING_BUDGETS = (2, 4, 8)
TARGET_GAP = 0.003  # "within 0.3 points of the best accuracy any method found"

FULL = {
    "tasks": {
        "mnist1d": {"space": "search_spaces/mnist1d.yaml", "budget_fte": 16},
        "digits": {"space": "search_spaces/digits.yaml", "budget_fte": 16},
        # the paper's limited-data regime (its gains were largest with little data): 1,000 training signals
        "mnist1d_1k": {"space": "search_spaces/mnist1d.yaml", "budget_fte": 16, "train_subset": 1000},
        # a task no shipped space tunes for: the README walk-through's breast-cancer MLP and space as written
        "breast_cancer": {"space": "benchmarks/spaces/breast_cancer.yaml", "budget_fte": 16},
    },
    # a median of 3 single trainings moves by more than the goal's 0.2 points (BENCHMARKS.md 1b): 10, paired
    "repeats": 10,
}
QUICK = {
    "tasks": {"digits": {"space": "search_spaces/digits.yaml", "budget_fte": 3, "smoke": True}},
    "repeats": 1,
}
CONVENTIONAL_SPACE = {"lr": (1e-4, 10.0, True), "weight_decay": (1e-5, 1e-2, True), "dropout": (0.0, 0.5, False)}
FASTAI = {"start_lr": 1e-7, "end_lr": 10.0, "num_iter": 100, "diverge_th": 4.0, "wd": 0.01, "pct_start": 0.25,
          "div": 25.0, "final_div": 1e5, "moms": (0.95, 0.85, 0.95), "fallback_lr": 1e-3}


# -- worker side --------------------------------------------------------------------------------

def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(task: dict[str, Any], rep: int):
    from sctune.service.space import load_space

    spec = load_space(REPO / task["space"], smoke=bool(task.get("smoke")))
    spec = spec.with_search(seed=rep)
    extra = {"train_subset": task["train_subset"]} if task.get("train_subset") else {}
    return spec.__class__(spec.path, spec.base.with_flat(seed=rep, **extra), spec.range_test, spec.search,
                          spec.final, spec.space, spec.raw)


@functools.lru_cache(maxsize=4)
def _data(task_cfg):
    from sctune.core.data import load_dataset

    return load_dataset(task_cfg)


def _steps_per_epoch(spec, data) -> int:
    return max(1, len(data.y_train) // min(spec.base.batch_size, len(data.y_train)))


def job_range(task: dict[str, Any], rep: int, budget_fte: float | None = None) -> dict[str, Any]:
    """sctune's stage 1, in-process: every (weight decay, seed) range test, then the stage's summary.
    ``budget_fte``: planned for that budget as ``--budget`` plans it (``budget.plan_compute``: at most a
    quarter of it, fewer repeats and weight decays first)."""
    import pandas as pd

    from sctune.core.range_test import run_range_test
    from sctune.service.budget import BudgetError, plan_compute
    from sctune.service.experiment import ExperimentPaths, StageError
    from sctune.service.stages import summarize_range_tests

    _init_worker()
    spec = _spec(task, rep)
    data = _data(spec.base.task)
    # the range tests sctune runs: the space file's, shortened to range_test.max_fte of one training
    try:
        spec, _ = plan_compute(spec, data.sizes(), budget=budget_fte)
    except BudgetError as e:  # sctune refuses this budget (exit 2): no answer at it
        return {"iters": 0, "cost_epochs": 0.0, "n_tests": 0, "error": f"budget refused: {e.rule}", "chosen": None,
                "verdict": None, "loadavg": loadavg()}
    rt = spec.range_test
    seeds = [spec.search.seed + i for i in range(rt.repeats)]
    t0 = time.perf_counter()
    frames, per_trial, iters = [], [], 0
    for wd in rt.weight_decays:
        for seed in seeds:
            res = run_range_test(spec.base, rt, weight_decay=wd, seed=seed, data=data)
            frames.append(res.frame.astype(float).assign(weight_decay=float(wd), seed=seed))
            per_trial.append({"weight_decay": float(wd), "seed": seed, "stop_reason": res.stop_reason})
            iters += len(res.frame)
    wall = time.perf_counter() - t0
    curves = pd.concat(frames, ignore_index=True)
    curves = curves[["weight_decay", "seed", *[c for c in curves.columns if c not in ("weight_decay", "seed")]]]
    error, bounds = None, None
    with tempfile.TemporaryDirectory() as d:
        try:
            bounds = summarize_range_tests(spec, ExperimentPaths(Path(d)), curves, per_trial)
        except StageError as e:
            error = str(e)
    spe = _steps_per_epoch(spec, data)
    return {"iters": iters, "cost_epochs": iters / spe, "steps_per_epoch": spe, "wall_s": wall,
            "n_tests": len(per_trial), "num_iter": rt.num_iter, "eval_every": rt.eval_every, "error": error,
            "chosen": None if bounds is None else bounds["chosen"],
            "verdict": None if bounds is None else bounds["verdict"], "loadavg": loadavg()}


def _halving(spec, data, plan, *, sampler: str, recipe: bool, spent0: float,
             budget_epochs: float) -> list[dict[str, Any]]:
    """sctune's stage 2 in-process: the very ``Searcher`` the stage hands to Ray (``make_searcher``), asked for
    one trial at a time; each trial a complete one-cycle of the suggested ``epochs``."""
    from ray.tune.search import Searcher

    from sctune.core.config import TrainConfig
    from sctune.core.train import TEST_ACC, VAL_ACC, fit, tail_mean
    from sctune.service.searchers import make_searcher

    searcher = make_searcher(spec, plan, budget_epochs=budget_epochs - spent0, sampler=sampler, recipe=recipe)
    base = spec.base.to_flat() | plan.constants
    events: list[dict[str, Any]] = []
    spent, n = spent0, 0
    while True:
        tid = f"t{n}"
        config = searcher.suggest(tid)
        if config is None or config == Searcher.FINISHED:
            break  # one trial at a time: None (wait) cannot happen with nothing running
        n += 1
        params = {k: v for k, v in config.items() if not k.startswith("_")}
        cfg = TrainConfig.from_flat(base | params)
        t0 = time.perf_counter()
        res = fit(cfg, data=data, test_at_end=True)
        vals = [h[VAL_ACC] for h in res.history]
        score = tail_mean(vals, spec.search.select_last)
        searcher.on_trial_complete(tid, {plan.select: score, "epoch": res.epochs_run, "diverged": res.diverged})
        spent += res.epochs_run
        status = "diverged" if res.diverged else "completed"
        events.append({"trial": n - 1, "params": params, "epochs": cfg.epochs, "rung": config["_rung"],
                       "epochs_run": res.epochs_run, "status": status, "val_acc": score,
                       "test_acc": res.final.get(TEST_ACC) if status == "completed" else None,
                       "cost_epochs": spent, "wall_s": time.perf_counter() - t0})
    return events


def _search(spec, data, *, dists, constants: dict, base_over: dict, sampler, recipe: dict | None,
            asha: dict | None, spent0: float, budget_epochs: float, select_last: int = 1) -> list[dict[str, Any]]:
    """Ask/tell loop as Ray's OptunaSearch runs it, ASHA via Ray's scheduler object, one trial at a time."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from sctune.core.config import TrainConfig
    from sctune.core.schedules import schedule_phase
    from sctune.core.train import PHASE, TEST_ACC, VAL_ACC, fit, tail_mean
    from sctune.service.plan import optuna_space

    study = optuna.create_study(direction="maximize", sampler=sampler)
    if recipe is not None:
        study.enqueue_trial(recipe)
    scheduler = None
    if asha is not None:
        # the conventional arm's rungs are in epochs
        scheduler = ASHAScheduler(time_attr=asha.get("time_attr", "epoch"), metric=VAL_ACC, mode="max",
                                  max_t=asha.get("max_t", spec.base.epochs), grace_period=asha["grace_period"],
                                  reduction_factor=asha["reduction_factor"])

    distributions = optuna_space(dists)
    base = spec.base.to_flat() | base_over | constants
    events: list[dict[str, Any]] = []
    spent = spent0
    while spent < budget_epochs - 1e-9:
        ot = study.ask(distributions)
        params = dict(ot.params)
        cfg = TrainConfig.from_flat(base | params)
        trial = SimpleNamespace(trial_id=f"t{ot.number}")
        if scheduler is not None:
            scheduler.on_trial_add(None, trial)
        last: dict[str, float] = {}
        seen: list[float] = []

        def on_epoch(metrics, state_fn, trial=trial, last=last, max_t=cfg.epochs, cfg=cfg, seen=seen) -> bool:
            seen.append(metrics[VAL_ACC])
            metrics = metrics | {PHASE: schedule_phase(cfg, int(metrics["epoch"]) / cfg.epochs),
                                 "select": tail_mean(seen, select_last)}
            last.update(metrics)
            if scheduler is None or int(metrics["epoch"]) >= max_t:
                return False
            return scheduler.on_trial_result(None, trial, metrics) == TrialScheduler.STOP

        t0 = time.perf_counter()
        res = fit(cfg, data=data, on_epoch=on_epoch, test_at_end=True)
        wall = time.perf_counter() - t0
        if scheduler is not None:
            scheduler.on_trial_complete(None, trial, last)
        val = last.get("select")
        study.tell(ot, val)  # Ray's OptunaSearch: COMPLETE with the last reported value, pruned or not
        spent += res.epochs_run
        status = "diverged" if res.diverged else ("completed" if res.epochs_run == cfg.epochs else "pruned")
        events.append({"trial": ot.number, "params": params, "epochs_run": res.epochs_run, "status": status,
                       "val_acc": val, "test_acc": last.get(TEST_ACC) if status == "completed" else None,
                       "epochs": cfg.epochs, "cost_epochs": spent, "wall_s": wall})
    return events


def job_search(task: dict[str, Any], rep: int, arm: str, range_result: dict[str, Any] | None,
               budget_fte: float | None = None) -> dict[str, Any]:
    from sctune.service.plan import Anchors, build_plan, make_sampler
    from sctune.service.space import Dist

    _init_worker()
    spec = _spec(task, rep)
    data = _data(spec.base.task)
    budget = (budget_fte or task["budget_fte"]) * spec.base.epochs
    s = spec.search
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if arm in ("sctune", "random_halving", "random"):
        if range_result is None or range_result["chosen"] is None:
            return {"arm": arm, "rep": rep, "error": (range_result or {}).get("error") or "stage 1 gave no usable bounds",
                    "events": [], "budget_fte": budget_fte,
                    "spent0": range_result["cost_epochs"] if range_result else 0.0, "loadavg": loadavg()}
        plan = build_plan(spec, Anchors.from_dict(range_result["chosen"]))
        spent0 = range_result["cost_epochs"]
        info = {"recipe": plan.recipe, "rungs": list(plan.rungs), "constants": plan.constants,
                "space": {k: d.to_dict() for k, d in plan.dists.items()}}
        if arm == "sctune":  # sctune's stage 2 as shipped: halving of complete schedules, TPE, the recipe first
            events = _halving(spec, data, plan, sampler="tpe", recipe=True, spent0=spent0, budget_epochs=budget)
        elif arm == "random_halving":  # the same halving, configurations drawn at random, no recipe point
            events = _halving(spec, data, plan, sampler="random", recipe=False, spent0=spent0,
                              budget_epochs=budget)
        else:  # plain random search in the same space: every trial a full training
            events = _search(spec, data, dists=plan.dists, constants=plan.constants, base_over={},
                             sampler=make_sampler("random", seed=s.seed, num_samples=s.num_samples), recipe=None,
                             asha=None, spent0=spent0, budget_epochs=budget, select_last=s.select_last)
    elif arm == "conventional":
        dists = {k: Dist(k, "float", low=lo, high=hi, log=lg) for k, (lo, hi, lg) in CONVENTIONAL_SPACE.items()}
        spent0 = 0.0
        info = {"space": {k: d.to_dict() for k, d in dists.items()}, "grace_period": 1,
                "schedule": "piecewise", "milestones_frac": list(spec.base.baseline.milestones_frac)}
        events = _search(spec, data, dists=dists, constants={}, base_over={"schedule": "piecewise", "momentum": 0.9},
                         sampler=make_sampler("tpe", seed=s.seed, num_samples=s.num_samples), recipe=None,
                         asha={"grace_period": 1, "reduction_factor": 2},
                         spent0=spent0, budget_epochs=budget)
    else:
        raise ValueError(arm)
    return {"arm": arm, "rep": rep, "spent0": spent0, "events": events, "info": info, "budget_fte": budget_fte,
            "wall_s": time.perf_counter() - t0, "loadavg": loadavg()}


def budget_points(by_budget: dict[str, dict[str, Any]]) -> list[tuple[float, float, float]]:
    """A halving arm's curve: per budget (ascending), the answer of the run planned for it (its incumbent at
    the end: the best at the longest schedule), at what that run spent."""
    out = []
    for _, run in sorted(by_budget.items(), key=lambda kv: float(kv[0])):
        cur = incumbent_curve(run["events"])
        if cur:
            out.append((run["events"][-1]["cost_epochs"], cur[-1][1], cur[-1][2]))
    return out


def _fastai_schedule(optimizer, cfg, *, steps_per_epoch: int):
    """fit_one_cycle's schedule: cosine, two phases, pct_start 0.25, div 25, final_div 1e5, moms .95-.85-.95."""
    from torch.optim.lr_scheduler import OneCycleLR

    return OneCycleLR(optimizer, max_lr=cfg.onecycle.max_lr, total_steps=cfg.epochs * steps_per_epoch,
                      pct_start=FASTAI["pct_start"], anneal_strategy="cos", three_phase=False,
                      div_factor=FASTAI["div"], final_div_factor=FASTAI["final_div"], cycle_momentum=True,
                      base_momentum=FASTAI["moms"][1], max_momentum=FASTAI["moms"][0])


def fastai_valley(lrs, losses) -> tuple[float, int]:
    """fastai's ``valley`` suggestion (fastai/callback/schedule.py), ported line for line: the longest
    strictly decreasing subsequence of the smoothed loss; its start is taken as end - length; the LR
    half-way (1/3 + 1/6 of the points) into it. ``lr_find`` calls it on points [num_it//10 : -5]."""
    n = len(losses)
    max_start = max_end = 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), idx


def job_fastai(task: dict[str, Any], rep: int) -> dict[str, Any]:
    from sctune.core.config import RangeTestConfig
    from sctune.core.loss_bounds import suggest_valley
    from sctune.core.range_test import run_range_test
    from sctune.core.train import TEST_ACC, VAL_ACC, fit

    _init_worker()
    spec = _spec(task, rep)
    data = _data(spec.base.task)
    cfg = spec.base.with_flat(optimizer="adamw", weight_decay=FASTAI["wd"], schedule="onecycle", dropout=0.0)
    # fastai's Recorder smooths with beta 0.98 (debiased) = sctune's smooth_f 0.02; stop at 4x the best.
    rt = RangeTestConfig(start_lr=FASTAI["start_lr"], end_lr=FASTAI["end_lr"], num_iter=FASTAI["num_iter"],
                         step_mode="exp", smooth_f=0.02, diverge_th=FASTAI["diverge_th"],
                         eval_every=FASTAI["num_iter"], eval_samples=256, bn_recalibrate=False, method="valley",
                         weight_decays=(FASTAI["wd"],), repeats=1)
    t0 = time.perf_counter()
    res = run_range_test(cfg, rt, weight_decay=FASTAI["wd"], seed=rep, data=data, momentum=0.9)
    f = res.frame
    lrs, smooth = f["lr"].to_numpy(), f["smooth_loss"].to_numpy()
    lo, hi = FASTAI["num_iter"] // 10, len(f) - 5
    if hi - lo >= 3:
        lr, _ = fastai_valley(lrs[lo:hi], smooth[lo:hi])
    else:
        lr = FASTAI["fallback_lr"]
    sb = suggest_valley(lrs, f["loss"].to_numpy())  # sctune's own valley, recorded for comparison
    sb_half = suggest_valley(lrs, f["loss"].to_numpy(), frac=0.5)
    with mock.patch("sctune.core.train.build_schedule", _fastai_schedule):
        fitres = fit(cfg.with_flat(max_lr=float(lr)), data=data, test_at_end=True)
    spe = _steps_per_epoch(spec, data)
    cost = len(f) / spe + fitres.epochs_run
    final = fitres.final
    status = "diverged" if fitres.diverged else "completed"
    return {"arm": "fastai", "rep": rep, "spent0": len(f) / spe,
            "info": {"finder_iters": len(f), "finder_stop": res.stop_reason, "lr_max": lr,
                     "sctune_suggest_valley": sb.max_lr, "sctune_suggest_valley_frac_0.5": sb_half.max_lr},
            "events": [{"trial": 0, "params": {"max_lr": lr}, "epochs_run": fitres.epochs_run, "status": status,
                        "val_acc": final.get(VAL_ACC), "test_acc": final.get(TEST_ACC) if status == "completed"
                        else None, "cost_epochs": cost, "wall_s": time.perf_counter() - t0}],
            "wall_s": time.perf_counter() - t0, "loadavg": loadavg()}


# -- analysis -----------------------------------------------------------------------------------

def incumbent_curve(events: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    """(cost_epochs, incumbent val acc, incumbent test acc) each time the incumbent changes. The incumbent is
    the completed trial with the best validation score among those of the longest schedule so far (what
    sctune's ``pick_best`` recommends; in the arms whose trials are all full-length, simply the best)."""
    best, out = (-math.inf, -math.inf), []
    for e in events:
        key = (e.get("epochs") or 0, e["val_acc"] if e["val_acc"] is not None else -math.inf)
        if e["status"] == "completed" and e["val_acc"] is not None and key > best:
            best = key
            out.append((e["cost_epochs"], e["val_acc"], e["test_acc"]))
    return out


def acc_at(curve: list[tuple[float, float, float]], cost_epochs: float) -> float | None:
    acc = None
    for c, _, t in curve:
        if c <= cost_epochs + 1e-9:
            acc = t
    return acc


def cost_to(curve: list[tuple[float, float, float]], target: float) -> float | None:
    for c, _, t in curve:
        if t is not None and t >= target - 1e-12:
            return c
    return None


def analyse(task_name: str, task: dict[str, Any], epochs: int, runs: dict[str, list[dict]],
            grid_fte: list[float]) -> dict[str, Any]:
    budget = task["budget_fte"]
    curves = {arm: [budget_points(r["by_budget"]) if "by_budget" in r else incumbent_curve(r["events"]) for r in rs]
              for arm, rs in runs.items()}
    final_acc = {arm: [acc_at(c, budget * epochs) for c in cs] for arm, cs in curves.items()}
    medians = {arm: stats(v)["median"] for arm, v in final_acc.items()}
    best_any = max((m for m in medians.values() if m is not None), default=None)
    target = None if best_any is None else best_any - TARGET_GAP
    out: dict[str, Any] = {"budget_fte": budget, "epochs_per_fte": epochs, "target_def":
                           "max over methods of the median (over repeats) test acc at the full budget, minus 0.3 points",
                           "best_any_median": best_any, "target": target, "methods": {}}
    for arm, cs in curves.items():
        at = {f"{g:g}": stats([acc_at(c, g * epochs) for c in cs]) for g in grid_fte}
        to_target = [None if target is None else cost_to(c, target) for c in cs]
        rs = runs[arm]
        n_trials = [len(r["events"]) for r in rs]
        pruned = [sum(e["status"] == "pruned" for e in r["events"]) for r in rs]
        diverged = [sum(e["status"] == "diverged" for e in r["events"]) for r in rs]
        out["methods"][arm] = {
            "test_acc_at_budget": stats(final_acc[arm]),
            "test_acc_at_fte": at,
            "fte_to_target": censored(stats([None if x is None else x / epochs for x in to_target])),
            # the same minus the method's own stage-1 cost: what the search itself needed after its bounds
            "search_fte_to_target": censored(stats([None if x is None else (x - r.get("spent0", 0.0)) / epochs
                                                    for x, r in zip(to_target, rs, strict=True)])),
            "reached_target": sum(x is not None for x in to_target),
            "first_result_fte": stats([c[0][0] / epochs if c else None for c in cs]),
            "stage1_fte": stats([r.get("spent0", 0.0) / epochs for r in rs]),
            "trials": stats(n_trials), "pruned": stats(pruned), "diverged": stats(diverged),
            "wall_s": stats([r.get("wall_s") for r in rs]),
            "curves_fte": [[(c / epochs, v, t) for c, v, t in cur] for cur in cs],
        }
    if "sctune" in curves:
        out["paired"] = {f"{g:g}": {arm: paired([acc_at(c, g * epochs) for c in curves["sctune"]],
                                               [acc_at(c, g * epochs) for c in cs])
                                    for arm, cs in curves.items() if arm != "sctune"} for g in grid_fte}
    return out


def censored(s: dict[str, Any]) -> dict[str, Any]:
    """``stats`` of a time to target, with ``median_all``: the median over every repeat, a repeat that never
    reached the target counted as never (None when the median repeat did not reach it). ``median`` (over the
    repeats that reached it) would rate an arm that reached the target once as well as one that reached it
    every time."""
    vals = sorted(s["values"]) + [math.inf] * s["missing"]
    n = len(vals)
    mid = math.inf if n == 0 else (vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2)
    return s | {"median_all": None if math.isinf(mid) else mid}


def paired(ours: list[float | None], theirs: list[float | None]) -> dict[str, Any]:
    """sctune minus another arm, repeat by repeat (repeat r seeds the data split, stage 1 and the sampler of
    both): the mean difference with a 95% t interval, and how many repeats each side won."""
    import numpy as np
    from scipy import stats as st

    d = [a - b for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None]
    out: dict[str, Any] = {"n": len(d), "diffs": d, "wins": sum(x > 1e-12 for x in d),
                           "ties": sum(abs(x) <= 1e-12 for x in d), "losses": sum(x < -1e-12 for x in d)}
    if len(d) < 2:
        return out | {"mean": d[0] if d else None, "ci95": None}
    mean = float(np.mean(d))
    if np.ptp(d) == 0:  # every repeat the same difference: no spread to put an interval on
        return out | {"mean": mean, "ci95": [mean, mean]}
    lo, hi = st.t.interval(0.95, len(d) - 1, loc=mean, scale=st.sem(d))
    return out | {"mean": mean, "ci95": [float(lo), float(hi)]}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.4), squeeze=False)
    colors = {"sctune": "C0", "random_halving": "C4", "random": "C2", "conventional": "C3", "fastai": "C1"}
    for ax, name in zip(axes[0], tasks, strict=True):
        r = results[name]
        budget = r["budget_fte"]
        xs = [x / 4 for x in range(0, int(budget * 4) + 1)]
        for arm, m in r["methods"].items():
            per_rep = []
            for cur in m["curves_fte"]:
                ys = []
                for x in xs:
                    y = None
                    for c, _, t in cur:
                        if c <= x + 1e-9:
                            y = t
                    ys.append(y)
                per_rep.append(ys)
            import numpy as np

            arr = np.array([[np.nan if y is None else 100 * y for y in ys] for ys in per_rep], dtype=float)
            with np.errstate(all="ignore"):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    med = np.nanmedian(arr, axis=0)
                    lo, hi = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0)
            ax.step(xs, med, where="post", color=colors.get(arm), label=f"{arm} (median of {len(per_rep)})")
            ax.fill_between(xs, lo, hi, step="post", color=colors.get(arm), alpha=0.15)
        if r.get("target") is not None:
            ax.axhline(100 * r["target"], color="k", ls=":", lw=1, label="target (best median - 0.3)")
        ax.set_xlabel("compute (full-training equivalents, range tests included)")
        ax.set_ylabel("test accuracy of incumbent (%)")
        ax.set_title(f"{name}: accuracy vs compute")
        vals = [v for m in r["methods"].values() for cur in m["curves_fte"] for _, _, v in cur if v is not None]
        if vals:
            top = 100 * max(vals)
            ax.set_ylim(max(top - 12, 100 * min(vals) - 1), top + 0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- driver -------------------------------------------------------------------------------------

def _analyse_all(tasks: dict[str, Any], runs: dict[str, Any], stage1: dict[str, Any]) -> dict[str, Any]:
    from sctune.service.space import load_space

    results: dict[str, Any] = {}
    for tname, task in tasks.items():
        epochs = load_space(REPO / task["space"], smoke=bool(task.get("smoke"))).base.epochs
        budget = task["budget_fte"]
        grid = sorted({g for g in (1, 2, 4, 8, 16, 24, 32, 40) if g <= budget} | {budget})
        results[tname] = analyse(tname, task, epochs, runs[tname], grid)
        results[tname]["stage1"] = stage1[tname]
        results[tname]["runs"] = runs[tname]
    return results


def reanalyse(path: Path) -> int:
    """Analysis and plot again from the raw runs a previous invocation stored (no training)."""
    import json

    payload = json.loads(path.read_text())
    tasks = payload["settings"]["tasks"]
    runs = {t: r["runs"] for t, r in payload["results"].items()}
    stage1 = {t: r["stage1"] for t, r in payload["results"].items()}
    payload["results"] = _analyse_all(tasks, runs, stage1)
    png = path.with_suffix(".png")
    plot(payload["results"], png)
    write_result(path.parent, path.stem, payload)
    log(f"re-analysed {path} and {png}")
    return 0


def _earlier(path: Path, tasks: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An earlier result file whose runs a new one keeps (``--keep-baselines``, ``--add-repeats``): (its
    payload, where it came from). It must hold the same tasks with the same settings."""
    import json

    old = json.loads(path.read_text())
    for t, task in tasks.items():
        if old["settings"]["tasks"].get(t) != task:
            raise SystemExit(f"{path}: task {t!r} differs from this run's; rerun every arm")
    rel = str(path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path)
    return old, {"file": rel, "git": old["machine"].get("git_commit"), "date_utc": old["machine"].get("date_utc")}


def _kept_baselines(path: Path, tasks: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Stage 1 and the non-halving arms' raw runs from an earlier result file, for ``--keep-baselines``: they
    do not depend on the halving search, so a change to it reruns only its two arms. The earlier file must
    hold the same tasks and repeats."""
    old, source = _earlier(path, tasks)
    if old["settings"]["repeats"] != repeats:
        raise SystemExit(f"{path}: holds {old['settings']['repeats']} repeats, this run {repeats}; rerun every arm")
    return {"runs": {t: old["results"][t]["runs"] for t in tasks},
            "stage1": {t: old["results"][t]["stage1"] for t in tasks},
            "from": source | {"arms": [a for a in ARMS if a not in HALVING_ARMS]}}


def _rerun_budgets(runs: list[dict[str, Any]], budgets: list[float]) -> list[dict[str, Any]]:
    """A halving arm's runs of an earlier file without the budgets to run again (``--halving-budgets``)."""
    return [r | {"by_budget": {g: v for g, v in r["by_budget"].items() if float(g) not in budgets}} for r in runs]


def _kept_repeats(path: Path, tasks: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Every arm's raw runs and stage 1 of the repeats an earlier result file holds, for ``--add-repeats``: repeat
    r seeds everything, so repeats 0..k-1 are the same whether run now or then, and a run with more repeats
    only needs the new ones. The earlier file must hold the same tasks and fewer repeats."""
    old, source = _earlier(path, tasks)
    k = old["settings"]["repeats"]
    if k >= repeats:
        raise SystemExit(f"{path}: already holds {k} repeats; --add-repeats needs --repeats above that")
    return {"repeats": k, "runs": {t: old["results"][t]["runs"] for t in tasks},
            "stage1": {t: old["results"][t]["stage1"] for t in tasks},
            "from": source | {"cpu": old["machine"].get("cpu"), "repeats": list(range(k)),
                              "baselines_from": old["settings"].get("baselines_from"),
                              "repeats_from": old["settings"].get("repeats_from")}}  # where ITS repeats came from


def halving_budgets(task: dict[str, Any]) -> list[float]:
    return sorted({g for g in HALVING_BUDGETS if g < task["budget_fte"]} | {task["budget_fte"]})


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, help="repeats per arm (default: 10, quick: 1)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (1 thread each)")
    p.add_argument("--tasks", nargs="*", help="subset of tasks (mnist1d digits mnist1d_1k breast_cancer)")
    p.add_argument("--budget-fte", type=float, help="override every task's compute budget (FTE)")
    p.add_argument("--reanalyse", type=Path, help="recompute the analysis and plot of an existing result file")
    p.add_argument("--keep-baselines", type=Path, metavar="RESULT",
                   help="rerun only the halving arms; take stage 1 and the other arms' runs (same tasks, repeats "
                        "and seeds) from this earlier result file, which the new file names")
    p.add_argument("--add-repeats", type=Path, metavar="RESULT",
                   help="keep every arm's runs of the repeats this earlier result file holds (same tasks, same "
                        "seeds) and run only the repeats up to --repeats; the new file names the earlier one")
    p.add_argument("--halving-budgets", type=float, nargs="+", metavar="FTE",
                   help="with --keep-baselines: rerun the halving arms at these budgets only, the others kept too")
    args = p.parse_args(argv)
    if args.keep_baselines and args.add_repeats:
        p.error("--keep-baselines and --add-repeats: use one")
    if args.halving_budgets and not args.keep_baselines:
        p.error("--halving-budgets needs --keep-baselines")
    if args.reanalyse:
        return reanalyse(args.reanalyse)
    conf = QUICK if args.quick else FULL
    repeats = args.repeats or conf["repeats"]
    tasks = {k: dict(v) for k, v in conf["tasks"].items() if not args.tasks or k in args.tasks}
    if args.budget_fte:
        for t in tasks.values():
            t["budget_fte"] = args.budget_fte
    out = out_dir(args)
    t_start = time.perf_counter()
    settings = {"tasks": tasks, "repeats": repeats, "workers": args.workers, "arms": ARMS,
                "conventional_space": CONVENTIONAL_SPACE, "fastai": FASTAI, "target_gap": TARGET_GAP,
                "execution": "in-process, one trial at a time; sctune and random_halving: the stage's own Ray "
                             "Searcher (sctune.service.searchers.make_searcher) asked directly; conventional and random: "
                             "optuna ask/tell as Ray's OptunaSearch, Ray's ASHAScheduler object for pruning; "
                             "sctune stage-1 logic (run_range_test + summarize_range_tests + plan.build_plan)"}
    kept = _kept_baselines(args.keep_baselines, tasks, repeats) if args.keep_baselines else None
    if kept:
        settings["baselines_from"] = kept["from"]
        if args.halving_budgets:
            settings["baselines_from"]["halving_budgets_rerun"] = args.halving_budgets
    added = _kept_repeats(args.add_repeats, tasks, repeats) if args.add_repeats else None
    first_rep = added["repeats"] if added else 0
    if added:
        settings["repeats_from"] = added["from"]
    payload = envelope(NAME, args, settings)
    runs: dict[str, dict[str, list]] = {t: {a: [None] * repeats for a in ARMS} for t in tasks}
    stage1: dict[str, list] = {t: [None] * repeats for t in tasks}
    if kept:
        for t in tasks:
            stage1[t] = kept["stage1"][t]
            for a in ARMS:
                if a not in HALVING_ARMS:
                    runs[t][a] = kept["runs"][t][a]
                elif args.halving_budgets:
                    runs[t][a] = _rerun_budgets(kept["runs"][t][a], args.halving_budgets)
    if added:
        for t in tasks:
            stage1[t][:first_rep] = added["stage1"][t]
            for a in ARMS:
                runs[t][a][:first_rep] = added["runs"][t][a]
    ctx = __import__("multiprocessing").get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futs: dict[Any, tuple] = {}

        def submit(fn: Callable, *a, key: tuple) -> None:
            futs[pool.submit(fn, *a)] = key

        for rep in range(first_rep, repeats):
            for tname, task in tasks.items():
                for g in halving_budgets(task):  # the halving arms' stage 1, planned for each budget
                    if args.halving_budgets and g not in args.halving_budgets:
                        continue
                    submit(job_range, task, rep, g, key=(tname, rep, "range", g))
                if kept:
                    continue
                submit(job_range, task, rep, key=(tname, rep, "range"))
                submit(job_search, task, rep, "conventional", None, key=(tname, rep, "conventional"))
                submit(job_fastai, task, rep, key=(tname, rep, "fastai"))
        while futs:
            done = next(as_completed(list(futs)))
            key = futs.pop(done)
            tname, rep, what = key[:3]
            res = done.result()
            if what == "range" and len(key) == 4:
                g = key[3]
                log(f"{tname} rep {rep}: stage 1 for {g:g} FTE: {res['n_tests']} range tests, "
                    f"{res['cost_epochs']:.1f} epochs, chosen {res['chosen']} (load {loadavg()})")
                for arm in HALVING_ARMS:
                    submit(job_search, tasks[tname], rep, arm, res, g, key=(tname, rep, arm, g))
            elif what == "range":
                stage1[tname][rep] = res
                log(f"{tname} rep {rep}: stage 1 {res['n_tests']} range tests, {res['cost_epochs']:.1f} epochs, "
                    f"chosen {res['chosen']} (load {loadavg()})")
                submit(job_search, tasks[tname], rep, "random", res, key=(tname, rep, "random"))
            elif res.get("budget_fte"):
                g = res["budget_fte"]
                slot = runs[tname][what][rep] = runs[tname][what][rep] or {
                    "arm": what, "rep": rep, "spent0": res["spent0"], "by_budget": {}, "wall_s": 0.0}
                slot["by_budget"][f"{g:g}"] = res
                slot["wall_s"] += res.get("wall_s") or 0.0
                if g == max(halving_budgets(tasks[tname])):  # trial counts: the run of the full budget
                    slot["events"], slot["info"], slot["spent0"] = res["events"], res.get("info"), res["spent0"]
                best = max((e["test_acc"] or 0 for e in res["events"]), default=0)
                log(f"{tname} rep {rep}: {what} at {g:g} FTE done, {len(res['events'])} trials, best test {best:.4f} "
                    f"(load {loadavg()})")
            else:
                runs[tname][what][rep] = res
                best = max((e["test_acc"] or 0 for e in res["events"]), default=0)
                log(f"{tname} rep {rep}: {what} done, {len(res['events'])} trials, best test {best:.4f} "
                    f"(load {loadavg()})")
    results = _analyse_all(tasks, runs, stage1)
    payload["results"] = results
    payload["wall_s"] = time.perf_counter() - t_start
    payload["loadavg_at_end"] = loadavg()
    png = out / f"{NAME}.png"
    out.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    payload["plot"] = str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png)
    path = write_result(out, NAME, payload)
    log(f"wrote {path} and {png}")
    for tname, r in results.items():
        for arm, m in r["methods"].items():
            a = m["test_acc_at_budget"]
            f = m["fte_to_target"]
            log(f"{tname:8s} {arm:12s} acc@{r['budget_fte']:g}FTE median {a['median']} "
                f"FTE-to-target median {f['median_all']} reached {m['reached_target']}/{a['n'] + a['missing']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
