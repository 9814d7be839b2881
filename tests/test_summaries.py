"""sctune.service.summaries: what the stages' trials add up to, on plain rows, without Ray."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sctune.core.train import tail_key
from sctune.service.experiment import StageError
from sctune.service.plan import Anchors, build_plan, stage1_anchors
from sctune.service.space import parse_space
from sctune.service.summaries import (
    final_fit_summary,
    is_pruned,
    pick_best,
    range_bounds,
    search_fte,
    summarize_search,
    trial_status,
)

SPEC = parse_space({
    "task": {"dataset": "digits", "model": "digits_cnn"},
    "fixed": {"epochs": 4},
    "range_test": {"weight_decays": [0.0, 1e-4], "repeats": 1, "end_lr": 3.0},
    "search": {"select_last": 2},
    "space": {"max_lr": {"type": "float", "low": 0.25, "high": 1.0, "log": True, "scale": "max_lr_bound"},
              "weight_decay": {"type": "float", "low": 0.1, "high": 10.0, "log": True, "scale": "wd_prior"}},
}, "test.yaml")
ANCHORS = Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=1e-4)
PLAN = build_plan(SPEC, ANCHORS)
SEL = tail_key("val/acc")


def _row(tid, *, epoch, score=None, diverged=False, error=None, max_lr=1.0, **extra):
    metrics = {"epoch": epoch, "diverged": diverged, "val/acc": score, SEL: score} | extra
    return {"trial_id": tid, "config": {"max_lr": max_lr, "weight_decay": 1e-4, "seed": 3}, "metrics": metrics,
            "error": error, "checkpoint": f"/ckpt/{tid}"}


def test_trial_status_classifies_each_way_a_trial_ends():
    assert trial_status({"epoch": 4}, None, 4) == "completed"
    assert trial_status({"epoch": 2}, None, 4) == "pruned"
    assert trial_status({"epoch": 1, "diverged": True}, None, 4) == "diverged"  # stopped early, but not pruned
    assert trial_status({"epoch": 4}, "RuntimeError: boom", 4) == "error"  # an error wins over everything
    assert trial_status({}, "RuntimeError: boom", 4) == "error"
    assert not is_pruned({"epoch": 1, "diverged": 1}, 4) and is_pruned({"epoch": 3}, 4)
    assert not is_pruned({"epoch": 1}, None)  # no epoch budget (range tests, final fit): nothing is pruned


def test_summarize_search_sorts_by_the_tail_score_and_keeps_only_searched_parameters():
    rows = [_row("mid", epoch=4, score=0.90), _row("pruned", epoch=2, score=0.95),
            _row("best", epoch=4, score=0.97, max_lr=PLAN.recipe["max_lr"]),
            _row("nan", epoch=1, diverged=True), _row("err", epoch=0, error="ValueError: x")]
    df = summarize_search(rows, SPEC, PLAN)
    assert list(df["trial_id"]) == ["best", "pruned", "mid", "nan", "err"]  # unscored trials last
    assert list(df["status"]) == ["completed", "pruned", "completed", "diverged", "error"]
    assert "seed" not in df and set(PLAN.dists) <= set(df.columns)
    assert PLAN.recipe["weight_decay"] == 1e-4  # the anchors' prior: the rows' weight decay
    assert list(df["is_recipe"]) == [True, False, False, False, False]  # Smith's recipe: the first point
    assert df.loc[4, "error"] == "ValueError: x" and df.loc[0, "error"] == ""
    assert df.loc[0, "checkpoint"] == "/ckpt/best" and df.loc[1, "epochs_run"] == 2
    # mode min: the lowest score first
    low = summarize_search(rows, SPEC.with_search(mode="min"), PLAN)
    assert low.loc[0, "trial_id"] == "mid"
    assert summarize_search([], SPEC, PLAN).empty


def test_pick_best_takes_the_best_completed_trial_never_a_pruned_one():
    df = summarize_search([_row("a", epoch=4, score=0.90), _row("p", epoch=3, score=0.99),
                           _row("b", epoch=4, score=0.93)], SPEC, PLAN)
    best = pick_best(df, SPEC)
    assert best["trial_id"] == "b" and best["_score_column"] == SEL


def test_pick_best_breaks_an_exact_tie_by_the_lower_validation_loss():
    # 38 validation samples: two trials both at 37/38; the one that finished first is not therefore the best
    tied = [_row("first", epoch=4, score=37 / 38, **{"val/loss": 0.31}),
            _row("second", epoch=4, score=37 / 38, **{"val/loss": 0.12}), _row("worse", epoch=4, score=36 / 38)]
    assert pick_best(summarize_search(tied, SPEC, PLAN), SPEC)["trial_id"] == "second"
    # the score still comes first: a lower loss does not beat a higher accuracy
    better = [*tied, _row("higher", epoch=4, score=38 / 38, **{"val/loss": 0.5})]
    assert pick_best(summarize_search(better, SPEC, PLAN), SPEC)["trial_id"] == "higher"


def test_pick_best_refuses_when_nothing_completed():
    df = summarize_search([_row("p", epoch=2, score=0.99), _row("d", epoch=1, diverged=True),
                           _row("e", epoch=4, score=0.9, error="OSError: x")], SPEC, PLAN)
    with pytest.raises(StageError, match="no search trial completed"):
        pick_best(df, SPEC)


def test_search_fte_counts_what_pruned_and_diverged_trials_ran():
    df = summarize_search([_row("a", epoch=4, score=0.9), _row("p", epoch=2, score=0.8),
                           _row("d", epoch=1, diverged=True)], SPEC, PLAN)
    assert search_fte(df, SPEC) == pytest.approx((4 + 2 + 1) / 4)
    assert search_fte(None, SPEC) == 0.0


def test_final_fit_summary_leaves_diverged_seeds_out_of_the_mean():
    runs = [{"test/acc": 0.9, "diverged": False}, {"test/acc": 0.8, "diverged": False},
            {"test/acc": 0.1, "diverged": True}, {"test/acc": None, "diverged": False}]
    out = final_fit_summary(runs, seeds=[1, 2, 3, 4], refit=True, epochs=5)
    assert out["n"] == 2 and out["test_acc_mean"] == pytest.approx(0.85)
    assert out["test_acc_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert out["val_is_training_data"] is True and out["epochs"] == 5
    one = final_fit_summary(runs[:1], seeds=[1], refit=False, epochs=5)
    assert one["test_acc_std"] == 0.0 and not one["val_is_training_data"]
    assert final_fit_summary([], seeds=[], refit=False, epochs=5)["test_acc_mean"] is None


def test_stage1_anchors_user_bounds_win_and_the_wd_prior_falls_back_in_order():
    chosen = {"weight_decay": 1e-4, "max_lr": 2.0, "min_lr": 0.5, "lower_bound": True,
              "high_band": None}
    a = stage1_anchors(SPEC, chosen)
    assert (a.max_lr_bound, a.min_lr_bound, a.wd_prior) == (2.0, 0.5, 1e-4)
    assert a.max_lr_lower_bound and a.ramp_end_lr == SPEC.range_test.end_lr
    assert stage1_anchors(SPEC, chosen, wd_prior=0.0).wd_prior == 0.0
    user = stage1_anchors(SPEC, chosen, lr_bounds=(0.1, 1.0))
    assert (user.min_lr_bound, user.max_lr_bound, user.wd_prior) == (0.1, 1.0, 1e-4)
    assert not user.max_lr_lower_bound
    assert stage1_anchors(SPEC, None, lr_bounds=(0.1, 1.0)).wd_prior == SPEC.base.reg.weight_decay
    assert stage1_anchors(SPEC, None) is None


def _curve(wd: float, *, peak_lr: float) -> pd.DataFrame:
    lr = np.geomspace(1e-3, 3.0, 120)
    acc = np.clip(0.1 + 0.85 * np.exp(-((np.log(lr) - np.log(peak_lr)) ** 2) / 2.0), 0, 1)
    acc[lr > 2 * peak_lr] = 0.1
    loss = 2.3 * (1 - acc) + 0.05
    return pd.DataFrame({"weight_decay": wd, "seed": 0, "step": np.arange(len(lr)), "lr": lr, "loss": loss,
                         "smooth_loss": loss, "acc": acc, "val_loss": loss})


def test_range_bounds_choose_the_weight_decay_that_lets_the_lr_go_highest():
    curves = pd.concat([_curve(0.0, peak_lr=0.1), _curve(1e-4, peak_lr=0.5)], ignore_index=True)
    per_trial = [{"weight_decay": 0.0, "seed": 0, "cost_fte": 0.25}, {"weight_decay": 1e-4, "seed": 0,
                                                                       "cost_fte": 0.5}]
    out = range_bounds(SPEC, curves, per_trial)
    assert out["status"] == "ok" and out["source"] == "range test" and out["cost_fte"] == pytest.approx(0.75)
    assert out["chosen"]["wd_prior"] == 1e-4
    per_wd = out["per_weight_decay"]
    assert out["chosen"]["max_lr_bound"] == per_wd["0.0001"]["max_lr"] > per_wd["0"]["max_lr"]
    assert all("bounds" in row for row in out["trials"])  # each curve's own bounds, per trial
    assert out["verdict"]["weight_decay"] == 1e-4
    assert not any(isinstance(v, float) and math.isnan(v) for v in out["chosen"].values())  # strict JSON
    # both values, each with its reason: the band's top (the search's upper end) and the first point's max_lr
    chosen, wd = out["chosen"], per_wd["0.0001"]
    assert chosen["recipe_max_lr"] == wd["recommended_max_lr"] < chosen["max_lr_bound"]
    assert chosen["recipe_reason"] == wd["recommended_reason"] and "band" in chosen["recipe_reason"]
    assert chosen["max_lr_reason"] == wd["max_lr_reason"] and chosen["max_lr_reason"].startswith("the top of the band")
    assert chosen["sc_likely"] is out["verdict"]["possible"]
    assert Anchors(**chosen) == Anchors.from_dict(chosen)  # bounds.json's chosen round-trips

