"""What the stages' trials add up to, as pure functions over plain rows (no Ray, no files).

``stages.py`` turns Tune's ``ResultGrid`` into rows (dicts of a trial's id, config, last metrics, error
line, checkpoint path) and calls these; their tests (``tests/test_summaries.py``) need no Ray.

* stage 1: ``range_bounds`` (bounds per curve and per weight decay, the chosen prior, the verdict: the
  content of bounds.json; its anchors from ``plan.stage1_anchors``), ``range_cost_fte``.
* stage 2: ``trial_status`` (completed, pruned, diverged, error), ``summarize_search`` (summary.csv),
  ``pick_best``, ``search_fte``.
* stage 3: ``final_fit_summary`` (the seeds' test accuracies: mean and spread).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..core.bounds import (
    LRBounds,
    aggregate_bounds,
    bounds_from_frame,
    bounds_kwargs,
    choose_weight_decay,
)
from ..core.train import tail_key
from .experiment import StageError, clean
from .plan import SearchPlan, stage1_anchors
from .space import SpaceSpec

# -- stage 1 -------------------------------------------------------------------------------------------


def range_cost_fte(per_trial: list[dict]) -> float | None:
    """Stage 1's cost in full-training equivalents: the sum of the range tests' measured costs."""
    costs = [row.get("cost_fte") for row in per_trial]
    measured = [c for c in costs if isinstance(c, (int, float)) and math.isfinite(c)]
    return float(sum(measured)) if measured else None


def _bounds_for(spec: SpaceSpec, df: pd.DataFrame, *, diverged: bool = False) -> LRBounds:
    return bounds_from_frame(df, method=spec.range_test.method,
                             **bounds_kwargs(spec.range_test, diverged=diverged))


def range_bounds(spec: SpaceSpec, curves: pd.DataFrame, per_trial: list[dict], *,
                 lr_bounds: tuple[float, float] | None = None, wd_prior: float | None = None) -> dict[str, Any]:
    """bounds.json's content: bounds per curve (added to ``per_trial``'s rows) and per weight decay, the
    chosen prior and the verdict. ``status`` is ``no_usable_bounds`` (and ``chosen`` None) when no weight
    decay gave bounds and the user gave none; ``no_bounds_message`` then says why."""
    per_wd: dict[str, Any] = {}
    bounds_by_label: dict[str, LRBounds] = {}
    diverged = {(row.get("weight_decay"), row.get("seed")): str(row.get("stop_reason") or "").startswith("diverged")
                for row in per_trial}
    for (wd, seed), df in curves.groupby(["weight_decay", "seed"], sort=True):
        b = _bounds_for(spec, df.reset_index(drop=True), diverged=diverged.get((wd, seed), False))
        bounds_by_label[f"wd={wd:g} seed={int(seed)}"] = b
        for row in per_trial:
            if row.get("weight_decay") == wd and row.get("seed") == seed:
                row["bounds"] = b.to_dict()
    for wd in sorted(curves["weight_decay"].unique(), reverse=True):
        results = [b for lbl, b in bounds_by_label.items() if lbl.startswith(f"wd={wd:g} ")]
        per_wd[f"{wd:g}"] = {"weight_decay": float(wd), **aggregate_bounds(results)}
    chosen = choose_weight_decay(per_wd)
    anchors = stage1_anchors(spec, chosen, lr_bounds=lr_bounds, wd_prior=wd_prior)
    if anchors is None:
        verdict, source = None, "range test"
    else:
        source = "user (--lr-bounds)" if lr_bounds is not None else "range test"
        if chosen is None or chosen.get("verdict") is None:
            verdict = {"possible": None, "message": "no usable range test: no verdict"}
        else:
            verdict = {**chosen["verdict"], "weight_decay": chosen["weight_decay"],
                       "lower_bound": chosen["lower_bound"], "still_learning": chosen["still_learning"]}
    return clean({
        "status": "ok" if anchors is not None else "no_usable_bounds",
        "source": source,
        "cost_fte": range_cost_fte(per_trial),
        "chosen": anchors.to_dict() if anchors is not None else None,
        "verdict": verdict,
        "per_weight_decay": per_wd,
        "trials": per_trial,
        "range_test": spec.range_test.to_dict(),
    })


def no_bounds_message(bounds: dict[str, Any]) -> str:
    """Why stage 1 cannot go on (``range_bounds`` gave no anchors), and what to do."""
    per_wd = bounds["per_weight_decay"]
    statuses = {k: v["status"] for k, v in per_wd.items()}
    msgs = "; ".join(f"wd={k}: {v['message']}" for k, v in per_wd.items())
    return (f"no range test yielded usable LR bounds ({statuses}). {msgs} "
            "Adjust range_test (start_lr/end_lr/num_iter) in the space file, or proceed with your own bounds: "
            "--lr-bounds MIN_LR MAX_LR [--wd-prior WD].")


# -- stage 2 -------------------------------------------------------------------------------------------

def is_pruned(result: dict[str, Any], max_epochs: int | None) -> bool:
    """A trial stopped (by the scheduler) before its last epoch without diverging."""
    return (max_epochs is not None and not result.get("diverged")
            and int(result.get("epoch", 0) or 0) < max_epochs)


def trial_status(metrics: dict[str, Any], error: str | None, max_epochs: int) -> str:
    """``error`` (the trial raised), ``diverged`` (its loss blew up), ``pruned`` (stopped before its last
    epoch), or ``completed``."""
    if error is not None:
        return "error"
    if metrics.get("diverged"):
        return "diverged"
    if is_pruned(metrics, max_epochs):
        return "pruned"
    return "completed"


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def summarize_search(rows: list[dict[str, Any]], spec: SpaceSpec, plan: SearchPlan) -> pd.DataFrame:
    """summary.csv: one row per trial (its searched config, the length of its complete schedule ``epochs``
    and its ``rung``, selection score, final metrics, status, epochs run, checkpoint). ``rows``: per trial
    ``trial_id``, ``config``, ``metrics`` (its last result), ``error`` (one line, or None), ``checkpoint``
    (a path, or None).

    Trials are sorted by rung (the longest schedules first), then by the selection score ``<metric>_tail``
    (mean of the last ``search.select_last`` evaluations); ``final_<metric>`` is the last epoch's value."""
    out = []
    metric = spec.search.metric
    select = tail_key(metric)
    rung_of = {e: i for i, e in enumerate(plan.rungs)}
    for row in rows:
        m = row.get("metrics") or {}
        config = row.get("config") or {}
        params = {k: v for k, v in config.items() if k in plan.dists}
        epochs = int(config.get("epochs", spec.base.epochs))
        out.append({"trial_id": row["trial_id"], **params, **plan.constants,
                    "epochs": epochs, "rung": rung_of.get(epochs, len(plan.rungs) - 1 if plan.rungs else 0),
                    "status": trial_status(m, row.get("error"), epochs),
                    "epochs_run": int(m.get("epoch", 0) or 0),
                    select: m.get(select, math.nan), f"final_{metric}": m.get(metric, math.nan),
                    "final_val/loss": m.get("val/loss", math.nan), "final_train/loss": m.get("train/loss", math.nan),
                    "is_recipe": all(_close(params.get(k), v) for k, v in plan.recipe.items()),
                    "node_id": m.get("node_id"),  # the Ray node of the trial's last result
                    "error": row.get("error") or "",
                    "checkpoint": row.get("checkpoint")})
    df = pd.DataFrame(out)
    if len(df):
        df = df.sort_values(["epochs", select], ascending=[False, spec.search.mode == "min"], na_position="last",
                            ignore_index=True)
    return df


def pick_best(summary: pd.DataFrame, spec: SpaceSpec) -> dict[str, Any]:
    """Best completed, finite, non-diverged trial by its selection score (mean of its last evaluations), among
    the trials of the longest complete schedule that has one (successive halving's highest rung reached).

    Exact ties on the score are common where validation is small (38 wine samples: one sample is 2.6 points
    of accuracy, and trials differ by whole samples); they are broken by the last validation loss, a finer
    reading of the same held-out data, rather than by the order the trials happened to finish in."""
    metric = tail_key(spec.search.metric)
    if metric not in summary:  # summary.csv of an experiment started before the score existed
        metric = f"final_{spec.search.metric}"
    ok = summary[(summary["status"] == "completed") & summary[metric].notna()]
    if ok.empty:
        raise StageError("no search trial completed without diverging; nothing to fit. "
                         "Check summary.csv and TensorBoard, narrow the space, and rerun.")
    if "epochs" in ok:
        ok = ok[ok["epochs"] == ok["epochs"].max()]
    by, ascending = [metric], [spec.search.mode == "min"]
    if "final_val/loss" in ok and metric != "final_val/loss":
        by, ascending = [*by, "final_val/loss"], [*ascending, True]
    row = ok.sort_values(by, ascending=ascending, kind="stable", na_position="last").iloc[0]
    return row.to_dict() | {"_score_column": metric}


def search_fte(summary: pd.DataFrame | None, spec: SpaceSpec) -> float:
    """FTE the search spent: every trial's epochs (pruned and diverged ones count what they ran; a complete
    schedule at 1/8 of the training costs 1/8 FTE)."""
    if summary is None or "epochs_run" not in summary:
        return 0.0
    return float(summary["epochs_run"].sum()) / spec.base.epochs


# -- stage 3 -------------------------------------------------------------------------------------------

def final_fit_summary(runs: list[dict[str, Any]], *, seeds: list[int], refit: bool, epochs: int) -> dict[str, Any]:
    """The final fit's seeds (``runs``: per seed its ``test/acc``, ``diverged``, ...): mean and sample spread
    of the test accuracy over the seeds that did not diverge."""
    accs = [r["test/acc"] for r in runs if r["test/acc"] is not None and not r["diverged"]]
    return clean({"runs": runs, "test_acc_mean": float(np.mean(accs)) if accs else None,
                  "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else (0.0 if accs else None),
                  "n": len(accs), "seeds": seeds, "refit": refit,
                  # with a refit the validation split was trained on: its accuracy is not held out
                  "val_is_training_data": refit,
                  "epochs": int(epochs)})
