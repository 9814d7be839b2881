"""Compute budget, the plan printed before anything starts, selection by the tail score, and the final
fit's variants (refit on train + validation, the best trial tested as it is). Ray-free except where
Ray's own searcher classes are driven directly (no cluster is started)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from sctune.core.data import known_split_sizes, load_dataset, stratified_val_split
from sctune.core.train import tail_key, tail_mean
from sctune.service.budget import BudgetError, format_plan, plan_compute
from sctune.service.space import load_space

REPO = Path(__file__).resolve().parent.parent
DIGITS = load_space(REPO / "search_spaces" / "digits.yaml")
DIGITS_SIZES = {"train": 1221, "val": 216}  # load_dataset(digits).sizes(), checked below


def test_digits_sizes_are_what_load_dataset_gives():
    sizes = load_dataset(DIGITS.base.task).sizes()
    assert {k: sizes[k] for k in DIGITS_SIZES} == DIGITS_SIZES


def test_plan_without_budget_counts_every_stage_and_changes_nothing():
    spec, plan = plan_compute(DIGITS, DIGITS_SIZES)
    assert spec is DIGITS
    full = DIGITS.base.epochs * (1221 // 64)  # drop_last: 19 iterations per epoch
    assert plan["fte"]["iterations"] == full == 228
    rt = DIGITS.range_test
    assert plan["range"]["iterations"] == len(rt.weight_decays) * rt.repeats * rt.num_iter
    assert plan["range"]["fte"] == pytest.approx(plan["range"]["iterations"] / full)
    assert plan["final"]["fte"] == pytest.approx(DIGITS.final.seeds)
    assert plan["trimmed"] == {}


@pytest.mark.parametrize("budget", [2.0, 4.0, 8.0])
def test_a_budget_is_shared_and_never_exceeded(budget):
    spec, plan = plan_compute(DIGITS, DIGITS_SIZES, budget=budget)
    r, s, f = plan["range"]["fte"], plan["search"]["fte"], plan["final"]["fte"]
    assert r + s + f == pytest.approx(budget)
    assert s >= 1.0  # at least the recipe trial
    assert r <= 0.25 * budget + 1e-9 or (spec.range_test.repeats == 1 and len(spec.range_test.weight_decays) == 1)
    assert f <= 0.2 * budget + 1e-9
    # the trimmed spec is what runs: its stage 1 costs what the plan says
    assert spec.range_test.repeats * len(spec.range_test.weight_decays) * spec.range_test.num_iter / 228 \
        == pytest.approx(r)
    assert spec.final.seeds == plan["final"]["seeds"]
    lines = "\n".join(format_plan(plan))
    assert f"of a budget of {budget:g} FTE" in lines and "to fit the budget" in lines


def test_a_run_without_a_budget_gets_the_default_and_a_smoke_run_keeps_its_own():
    from sctune.service.budget import DEFAULT_BUDGET_FTE, make_plan

    assert DEFAULT_BUDGET_FTE <= 8  # issue 18: a default run spends at most ~8 FTE in all
    spec, plan = make_plan(DIGITS, default_budget=True)
    assert spec.search.budget == plan["budget_fte"] == DEFAULT_BUDGET_FTE and plan["budget_default"]
    total = plan["range"]["fte"] + plan["search"]["fte"] + plan["final"]["fte"]
    assert total == pytest.approx(DEFAULT_BUDGET_FTE)
    lines = "\n".join(format_plan(plan))
    assert "the default budget" in lines and "recipe point in full first, then complete one-cycles of 1/2 and all" in lines
    given, plan = make_plan(DIGITS.with_search(budget=12.0), default_budget=True)
    assert given.search.budget == 12.0 and not plan["budget_default"]  # a budget given wins
    smoke = load_space(REPO / "search_spaces" / "digits.yaml", smoke=True)
    spec, plan = make_plan(smoke, default_budget=False)  # --smoke: its num_samples, no default
    assert spec.search.budget is None and plan["budget_fte"] is None
    assert "search.num_samples full trainings' worth" in "\n".join(format_plan(plan))


def test_small_budgets_keep_the_weight_decay_nearest_the_authors_and_test_the_search_winner():
    spec, plan = plan_compute(DIGITS, DIGITS_SIZES, budget=2.0)
    assert spec.range_test.weight_decays == (1e-4,)  # the authors' ResNet-56 best, the config default
    assert spec.final.seeds == 0 and plan["final"]["fte"] == 0
    assert "tested as it is" in "\n".join(format_plan(plan))


def test_a_budget_too_small_for_one_trial_is_refused_with_the_minimum():
    with pytest.raises(BudgetError) as e:
        plan_compute(DIGITS, DIGITS_SIZES, budget=1.2, budget_key="--budget")
    assert e.value.path == "--budget"
    smallest = DIGITS.range_test.num_iter / 228 + 0 + 1  # one range test, no final fit, one search trial
    assert f"give at least {math.ceil(smallest * 10) / 10:g}" in str(e.value)


def test_budget_needs_the_dataset_size():
    with pytest.raises(BudgetError, match="dataset's size"):
        plan_compute(DIGITS, None, budget=4.0)


def test_the_paper_space_in_iterations():
    spec = load_space(REPO / "search_spaces" / "cifar10_resnet56.yaml")
    sizes = known_split_sizes(spec.base.task)
    assert sizes == {"train": 42_500, "val": 7_500}
    _, plan = plan_compute(spec, sizes)
    assert plan["fte"]["steps_per_epoch"] == 42
    assert plan["fte"]["iterations"] == 9_996  # ~ the paper's 10k at batch 1000, not 200 x 42 = 8,400
    assert plan["final"]["refit"] and plan["final"]["iterations_each"] == 10_000  # 200 x 50 on all 50k
    rt = spec.range_test  # (as shipped before issue #10: 12 x 5,000 iterations = 6.0 FTE)
    assert plan["range"]["iterations"] == len(rt.weight_decays) * rt.repeats * rt.num_iter
    assert plan["range"]["fte"] == pytest.approx(plan["range"]["iterations"] / 9_996)


def test_a_range_test_longer_than_half_a_training_is_shortened_with_its_evaluations_kept():
    # the paper's limited-data regime: the MNIST-1D space sized for 3,400 samples on 1,000 of them
    spec = load_space(REPO / "search_spaces" / "mnist1d.yaml")
    spec = type(spec)(spec.path, spec.base.with_flat(train_subset=1000), spec.range_test, spec.search,
                      spec.final, spec.space, spec.raw)
    rt0 = spec.range_test
    sizes = {"train": 1000, "val": 600}
    full = spec.base.epochs * (1000 // spec.base.batch_size)
    assert rt0.num_iter > rt0.max_fte * full  # as shipped, one test would cost more than half a training
    for budget in (None, 4.0):
        trimmed, plan = plan_compute(spec, sizes, budget=budget)
        rt = trimmed.range_test
        assert rt.num_iter <= math.ceil(rt0.max_fte * full)
        assert plan["range"]["iterations_each"] == rt.num_iter
        assert plan["range"]["fte"] <= len(rt.weight_decays) * rt.repeats * rt0.max_fte + 1e-9
        assert rt.num_iter // rt.eval_every >= rt0.num_iter // rt0.eval_every  # as many evaluations
        lines = "\n".join(format_plan(plan))
        assert f"range_test.num_iter {rt0.num_iter} -> {rt.num_iter}" in lines and "to fit range_test.max_fte" in lines
    # a user who wants the long test says so
    long = type(spec)(spec.path, spec.base, rt0.replace(max_fte=None), spec.search, spec.final, spec.space, spec.raw)
    assert plan_compute(long, sizes)[0].range_test.num_iter == rt0.num_iter


def test_shipped_range_tests_fit_half_a_training():
    for name in ("digits", "mnist1d", "cifar10_resnet56", "cifar100_resnet56"):
        spec = load_space(REPO / "search_spaces" / f"{name}.yaml")
        sizes = known_split_sizes(spec.base.task) or load_dataset(spec.base.task).sizes()
        assert plan_compute(spec, sizes)[1]["trimmed"] == {}, name  # their num_iter already fits


def test_known_split_sizes_follow_the_real_split_rule():
    y = torch.arange(50_000) % 10
    tr, va = stratified_val_split(y, 0.15, 0)
    sizes = known_split_sizes(load_space(REPO / "search_spaces" / "cifar10_resnet56.yaml").base.task)
    assert (len(tr), len(va)) == (sizes["train"], sizes["val"])


def test_refit_trains_on_train_plus_validation():
    task = DIGITS.base.task
    plain, both = load_dataset(task), load_dataset(task.replace(train_on_val=True))
    assert len(both.y_train) == len(plain.y_train) + len(plain.y_val)
    assert torch.equal(both.x_val, plain.x_val) and torch.equal(both.x_test, plain.x_test)
    rows = {tuple(r.tolist()) for r in both.x_train.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in plain.x_val.flatten(1)[:20])


# -- selection -------------------------------------------------------------------------------

def test_tail_mean():
    assert tail_mean([0.1, 0.5, 0.7, 0.9], 3) == pytest.approx(0.7)
    assert tail_mean([0.4], 3) == pytest.approx(0.4)
    assert math.isnan(tail_mean([], 3))


def test_pick_best_ranks_by_the_tail_not_the_last_epoch():
    from sctune.service.summaries import pick_best

    key = tail_key("val/acc")
    summary = pd.DataFrame([
        {"trial_id": "lucky", "status": "completed", key: 0.950, "final_val/acc": 0.995},
        {"trial_id": "steady", "status": "completed", key: 0.990, "final_val/acc": 0.990},
        {"trial_id": "pruned", "status": "pruned", key: 0.999, "final_val/acc": 0.999},
    ])
    best = pick_best(summary, DIGITS)
    assert best["trial_id"] == "steady" and best["_score_column"] == key


def test_progress_line_shows_only_finished_trials_scores_and_the_fte_spent(capsys):
    from sctune.present.progress import StageProgress

    key = tail_key("val/acc")
    p = StageProgress("search", None, metric=key, mode="max", epochs=3,
                      fte=(1.5, 4.0, 1 / 3))
    a = SimpleNamespace(trial_id="a", status="RUNNING", last_result={"epoch": 1, key: 0.99})
    b = SimpleNamespace(trial_id="b")
    p.on_trial_result(0, [], a, {"epoch": 1, key: 0.99})  # mid-run: not comparable with a finished trial
    assert p.best is None
    for e, v in ((1, 0.5), (2, 0.6), (3, 0.7)):
        p.on_trial_result(0, [], b, {"epoch": e, key: v})
    b.last_result, b.status = {"epoch": 3, key: 0.7}, "TERMINATED"
    p.on_trial_complete(0, [a, b], b)  # a finished trial always prints its line
    assert p.best == pytest.approx(0.7)
    assert p.fte_spent == pytest.approx(1.5 + (1 + 3) / 3)
    err = capsys.readouterr().err
    assert "best val/acc_tail 0.7000" in err and "0.99" not in err
    assert f"FTE {1.5 + 4 / 3:.2f}/4" in err


# -- the search's budget guard ------------------------------------------------------------------

def _inner_searcher():
    from ray.tune.search import Searcher

    class Counter(Searcher):
        def __init__(self):
            super().__init__(metric="m", mode="max")
            self.n = 0

        def suggest(self, trial_id):
            self.n += 1
            return {"x": self.n}

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

        def save(self, path):
            Path(path).write_text(str(self.n))

        def restore(self, path):
            self.n = int(Path(path).read_text())

    return Counter()


def test_budget_limiter_starts_trials_only_while_a_full_run_fits(tmp_path):
    from ray.tune.search import Searcher

    from sctune.service.searchers import BudgetLimiter

    lim = BudgetLimiter(_inner_searcher(), 2, budget_epochs=25, max_epochs=10)
    assert lim.suggest("t1") and lim.suggest("t2")  # 20 epochs committed
    assert lim.suggest("t3") is None  # 20 + 10 > 25, but running trials may still free some
    for e in (1, 2, 3):
        lim.on_trial_result("t1", {"epoch": e})
    lim.on_trial_complete("t1", {"epoch": 3})  # pruned at 3: gives back 7 epochs
    assert lim.suggest("t3")  # 3 + 10 + 10 = 23 <= 25
    assert lim.suggest("t4") is None
    lim.on_trial_complete("t2", {"epoch": 10})
    # the books survive Tune's save/restore (--resume)
    path = tmp_path / "searcher.pkl"
    lim.save(str(path))
    again = BudgetLimiter(_inner_searcher(), 2, budget_epochs=25, max_epochs=10)
    again.restore(str(path))
    assert again.ran == lim.ran and again.running == lim.running and again.searcher.n == 3
    lim.on_trial_complete("t3", {"epoch": 10})
    assert lim.suggest("t4") == Searcher.FINISHED  # nothing running and 23 + 10 > 25
    assert sum(lim.ran.values()) == 23 <= 25


# -- final fit: the best trial tested as it is ----------------------------------------------------

def test_best_trial_tested_from_its_checkpoint_matches_its_own_test_evaluation(tmp_path):
    from sctune.core.train import TEST_ACC, fit
    from sctune.service.stages import evaluate_search_trial
    from sctune.service.trainables import CHECKPOINT_FILE

    spec = load_space(REPO / "search_spaces" / "digits.yaml", smoke=True)
    params = {"max_lr": 0.5, "weight_decay": 1e-4}
    cfg = spec.base.with_flat(**params, epochs=2)
    spec = type(spec)(spec.path, cfg, spec.range_test, spec.search, spec.final, spec.space, spec.raw)

    def on_epoch(metrics, state_fn):
        torch.save(state_fn(), tmp_path / CHECKPOINT_FILE)

    run = fit(cfg, on_epoch=on_epoch, test_at_end=True)
    final = evaluate_search_trial(spec, params, {"checkpoint": str(tmp_path), "trial_id": "t"})
    assert final["n"] == 1 and final["runs"][0]["search_trial"] == "t"
    assert final["test_acc_mean"] == pytest.approx(run.final[TEST_ACC])


# -- the CLI's dry run ----------------------------------------------------------------------------

def _cli(*args, tmp_path):
    env = os.environ | {"PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "sctune.search", *args, "--storage-path", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def test_stage_plan_prints_iterations_and_fte_and_starts_nothing(tmp_path):
    r = _cli("--stage", "plan", "--budget", "4", "--name", "p", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 FTE = 12 epochs x 19 iterations = 228 iterations" in r.stdout
    assert "total:   4.00 FTE of a budget of 4 FTE" in r.stdout
    assert not (tmp_path / "p").exists()  # a dry run: no experiment folder, no Ray
    bad = _cli("--stage", "plan", "--budget", "1", tmp_path=tmp_path)
    assert bad.returncode == 2
    assert "--budget: 1 FTE cannot hold stage 1" in bad.stderr and "give at least" in bad.stderr


def test_budget_in_the_space_file_is_named_in_its_error(tmp_path):
    text = (REPO / "search_spaces" / "digits.yaml").read_text().replace(
        "  seed: 0\n", "  seed: 0\n  budget: 0.5\n", 1)
    space = tmp_path / "tight.yaml"
    space.write_text(text)
    r = _cli(str(space), "--stage", "plan", tmp_path=tmp_path)
    assert r.returncode == 2
    assert f"{space}: search.budget" in r.stderr
    neg = tmp_path / "neg.yaml"
    neg.write_text(text.replace("budget: 0.5", "budget: -1"))
    r = _cli(str(neg), "--stage", "plan", tmp_path=tmp_path)
    assert r.returncode == 2 and "search.budget: must be > 0" in r.stderr


def test_stage_1_cost_is_read_from_bounds_json_or_counted_from_its_curves(tmp_path):
    from sctune.service.budget import range_cost_fte
    from sctune.service.experiment import ExperimentPaths

    paths = ExperimentPaths(tmp_path)
    paths.range_dir.mkdir(parents=True)
    assert range_cost_fte({"cost_fte": 1.25}, paths, 228) == 1.25  # stage 1's own count wins
    # fallback: one curves.csv row per range-test step taken (a diverged test stops early and costs less)
    pd.DataFrame({"weight_decay": [0.0] * 100 + [1e-4] * 14, "seed": 0, "step": list(range(100)) + list(range(14))}
                 ).to_csv(paths.range_dir / "curves.csv", index=False)
    assert range_cost_fte({"chosen": {}}, paths, 228) == pytest.approx(114 / 228)
    assert range_cost_fte(None, paths, 228) is None
