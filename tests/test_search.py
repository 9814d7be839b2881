"""The search service end to end on real Ray: the smoke pipeline's outputs, asserted by content."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from sctune.core.bounds import PEAK_ACC_TIE
from sctune.present.tensorboard import experiment_logdir
from sctune.service.fidelity import rung_epochs
from sctune.service.plan import Anchors, resolve
from sctune.service.space import load_space

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.ray

SPEC = load_space(REPO / "search_spaces" / "digits.yaml", smoke=True)


@pytest.fixture(scope="module")
def run(smoke_run):
    assert smoke_run.returncode == 0, f"CLI failed:\n{smoke_run.stderr[-4000:]}"
    return smoke_run


def _json(run, rel):
    return json.loads((run.root / rel).read_text())


def test_cli_prints_best_config_accuracy_and_tensorboard_command(run):
    best = _json(run, "best.json")
    assert "Recommended configuration" in run.stdout
    assert f"{best['value']:.4f}" in run.stdout
    assert f"tensorboard --logdir {run.root / 'tensorboard'} --host 127.0.0.1 --port 6006" in run.stdout
    assert "--bind_all" not in run.stdout
    # progress lines for the three stages, no Ray console noise
    for stage in ("[range]", "[search]", "[final]"):
        assert stage in run.stderr
        # piped (not a terminal): a line per finished trial, else at most one per progress.INTERVAL_S
        assert sum(ln.startswith(stage) for ln in run.stderr.splitlines()) <= 20, run.stderr
    assert "Traceback" not in run.stderr
    assert re.search(r"^\[final\] .*mean test/acc", run.stderr, flags=re.M), run.stderr  # not the best seed
    # the clock runs from the experiment's start: the final stage's time is not below the search's
    times = {st: [_seconds(m) for m in re.findall(rf"^\[{st}\] .*\| ((?:\d+m)?\d+s)(?: \| ETA|$)", run.stderr, flags=re.M)]
             for st in ("range", "search", "final")}
    assert times["final"] and times["search"] and times["final"][-1] >= times["search"][-1] >= times["range"][-1], times


def _seconds(text: str) -> int:
    m, _, s = text.rstrip("s").rpartition("m")
    return int(m or 0) * 60 + int(s)


def test_bounds_json_per_weight_decay_with_spread_and_chosen_prior(run):
    bounds = _json(run, "range_test/bounds.json")
    rt = SPEC.range_test
    assert bounds["status"] == "ok"
    per_wd = bounds["per_weight_decay"]
    assert set(per_wd) == {f"{w:g}" for w in rt.weight_decays}
    for entry in per_wd.values():
        assert entry["n_total"] == rt.repeats
        if entry["status"] == "ok":
            spread = entry["spread"]["max_lr"]
            assert spread["min"] <= entry["max_lr"] <= spread["max"]
            assert entry["min_lr"] == pytest.approx(entry["max_lr"] / rt.divisor)
    chosen = bounds["chosen"]
    ok = {k: v for k, v in per_wd.items() if v["status"] == "ok"}
    # the prior is a usable WD whose accuracy peaked highest (ties within PEAK_ACC_TIE: the more confident)
    prior = per_wd[f"{chosen['wd_prior']:g}"]
    assert prior["status"] == "ok"
    assert prior["peak_acc"] >= max(v["peak_acc"] for v in ok.values()) - PEAK_ACC_TIE
    assert chosen["max_lr_bound"] == pytest.approx(prior["max_lr"])
    assert rt.start_lr < chosen["max_lr_bound"] <= rt.end_lr
    verdict = bounds["verdict"]
    assert verdict["possible"] in (True, False, None) and verdict["message"]
    assert verdict["weight_decay"] == chosen["wd_prior"]
    if verdict["possible"] is not None:
        assert verdict["possible"] == (verdict["headroom"] >= rt.sc_min_headroom
                                       and verdict["coverage"] >= rt.sc_min_coverage)
    # stage 1's measured cost: the range tests' steps against one full training, plus their evaluations
    steps = sum(t["steps"] for t in bounds["trials"])
    assert bounds["cost_fte"] == pytest.approx(sum(t["cost_fte"] for t in bounds["trials"]))
    assert bounds["cost_fte"] > steps / (SPEC.base.epochs * 23)  # 23 batches of 64 in digits' 85% split
    assert len(bounds["trials"]) == len(rt.weight_decays) * rt.repeats


def test_curves_csv_holds_every_range_test_step(run):
    curves = pd.read_csv(run.root / "range_test/curves.csv")
    rt = SPEC.range_test
    assert list(curves.columns[:2]) == ["weight_decay", "seed"]
    assert {"step", "lr", "loss", "smooth_loss", "acc", "val_loss"} <= set(curves.columns)
    groups = curves.groupby(["weight_decay", "seed"])
    assert len(groups) == len(rt.weight_decays) * rt.repeats
    for _, g in groups:
        assert g["step"].tolist() == list(range(len(g)))
        assert len(g) <= rt.num_iter
        # Smith's linear ramp: lr(step) = start + (end - start) * step / (num_iter - 1)
        expected = rt.start_lr + (rt.end_lr - rt.start_lr) * g["step"] / (rt.num_iter - 1)
        assert (g["lr"] - expected).abs().max() < 1e-9
        evaluated = g.dropna(subset=["acc"])
        # row 0 holds the untrained model's accuracy; then every eval_every steps
        assert evaluated["step"].iloc[0] == 0
        assert ((evaluated["step"].iloc[1:] + 1) % rt.eval_every == 0).all()
    png = (run.root / "range_test/range_test.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_summary_has_one_row_per_trial_inside_the_resolved_space(run):
    summary = pd.read_csv(run.root / "summary.csv")
    bounds = _json(run, "range_test/bounds.json")
    anchors = Anchors(**bounds["chosen"])
    dists, constants = resolve(SPEC, anchors)
    # no budget: search.num_samples full trainings' worth of epochs, spent as complete schedules
    assert summary["epochs_run"].sum() <= SPEC.search.num_samples * SPEC.base.epochs
    assert len(summary) > SPEC.search.num_samples  # shorter schedules: more trials than full ones would fit
    assert summary["trial_id"].is_unique
    assert set(summary["status"]) <= {"completed", "pruned", "diverged", "error"}
    completed = summary[summary["status"] == "completed"]
    assert len(completed) >= 1
    assert (completed["epochs_run"] == completed["epochs"]).all()  # every schedule ran to its end
    assert set(summary["epochs"]) <= set(rung_epochs(SPEC.base.epochs))
    assert completed["val/acc_tail"].between(0.0, 1.0).all()
    assert "best_val/acc" not in summary  # an epoch's maximum over a run selects noise; it is not shown
    pruned = summary[summary["status"] == "pruned"]
    assert (pruned["epochs_run"] < pruned["epochs"]).all()
    for name, d in dists.items():
        assert summary[name].between(d.low * (1 - 1e-9), d.high * (1 + 1e-9)).all(), name
    # weight decay on both sides of the stage-1 prior: inside [1e-3, 10] x prior
    prior = anchors.wd_prior or min(w for w in SPEC.range_test.weight_decays if w > 0)  # 0: smallest tested
    assert summary["weight_decay"].between(prior * 1e-3 * (1 - 1e-9), prior * 10 * (1 + 1e-9)).all()
    # Smith's recipe is the anchor: trained once, at the full length, never at a shorter schedule
    assert summary["is_recipe"].sum() == 1
    assert summary.loc[summary["is_recipe"], "epochs"].tolist() == [SPEC.base.epochs]
    for name in constants:
        assert (summary[name] == constants[name]).all()
    # sorted longest schedule first, then best first by the selection score
    assert summary["epochs"].tolist() == sorted(summary["epochs"], reverse=True)
    for _, rung in summary.groupby("epochs"):
        scores = rung["val/acc_tail"].dropna().tolist()
        assert scores == sorted(scores, reverse=True)


def test_stage_2_trains_rungs_of_complete_schedules_and_promotes_the_top_half(run):
    summary = pd.read_csv(run.root / "summary.csv")
    rungs = rung_epochs(SPEC.base.epochs)
    assert len(rungs) >= 2 and summary["epochs"].max() == SPEC.base.epochs  # the best went on to the full length
    key = ["max_lr", "weight_decay", "div_factor"]
    ladder = summary[~summary["is_recipe"]]  # the anchor starts at the full length
    used = 0
    for short, long in zip(rungs, rungs[1:], strict=False):
        below = ladder[ladder["epochs"] == short]
        above = ladder[ladder["epochs"] == long]
        if below.empty:  # a rung the budget leaves out (``fidelity.rungs_for_budget``)
            continue
        used += 1
        # only the top half goes on (at least the best); promotion is asynchronous, so the top half of the
        # results finished when it was decided (``tests/test_fidelity.py`` checks that rule)
        assert len(above) <= max(1, len(below) // 2)
        for _, row in above.iterrows():  # each promoted configuration ran the shorter schedule before
            assert any(all(row[k] == pytest.approx(t[k]) for k in key) for _, t in below.iterrows()), row.to_dict()
    assert used >= 1 and len(ladder[ladder["epochs"] == SPEC.base.epochs]) >= 2, ladder  # a halving, two in full


def test_best_json_matches_the_best_completed_trial_and_final_fit(run):
    best = _json(run, "best.json")
    summary = pd.read_csv(run.root / "summary.csv")
    completed = summary[summary["status"] == "completed"]
    completed = completed[completed["epochs"] == completed["epochs"].max()]  # the longest schedule reached
    top = completed.sort_values("val/acc_tail", ascending=False, kind="stable").iloc[0]
    assert best["trial_id"] == top["trial_id"]
    assert best["metric"] == "val/acc_tail" and best["value"] == pytest.approx(top["val/acc_tail"])
    # compute in FTE, per stage: the search's is the epochs its trials ran
    spent = best["compute"]["spent_fte"]
    assert spent["search"] == pytest.approx(summary["epochs_run"].sum() / SPEC.base.epochs)
    assert spent["total"] == pytest.approx(spent["range"] + spent["search"] + spent["final"])
    for k, v in best["searched"].items():
        assert best["config"][k] == pytest.approx(v)
        assert top[k] == pytest.approx(v)
    final = best["final"]
    assert final["n"] == SPEC.final.seeds == len(final["runs"])
    accs = [r["test/acc"] for r in final["runs"]]
    assert final["test_acc_mean"] == pytest.approx(sum(accs) / len(accs))
    assert 0.5 < final["test_acc_mean"] <= 1.0  # digits: far above chance (0.1)
    assert all(r["epochs"] == SPEC.base.epochs for r in final["runs"])


def test_report_md_is_readable_and_complete(run):
    report = (run.root / "report.md").read_text()
    bounds = _json(run, "range_test/bounds.json")
    best = _json(run, "best.json")
    assert bounds["verdict"]["message"] in report
    assert "![range test](range_test/range_test.png)" in report
    assert best["trial_id"] in report
    assert f"{best['final']['test_acc_mean']:.4f}" in report
    assert "--host 127.0.0.1" in report


def test_tensorboard_has_a_run_per_trial(run):
    logdir = experiment_logdir(run.root)
    rt = SPEC.range_test
    range_runs = sorted(p.relative_to(logdir).as_posix() for p in (logdir / "range").glob("wd=*/seed=*"))
    assert len(range_runs) == len(rt.weight_decays) * rt.repeats
    assert len(list((logdir / "search").iterdir())) == len(pd.read_csv(run.root / "summary.csv"))
    assert len(list((logdir / "final").iterdir())) == SPEC.final.seeds


def test_state_json_marks_all_stages_done(run):
    state = _json(run, "state.json")
    assert state["done"] == ["range", "search", "final"]
    assert state["smoke"] is True
    assert (run.root / "space.yaml").read_text() == (REPO / "search_spaces/digits.yaml").read_text()


@pytest.fixture
def users_ray():
    """A Ray the user started in this process (as a notebook does): sctune runs on it and leaves it running."""
    import ray

    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_python_api_runs_stage_by_stage(tmp_path, users_ray):
    """``run()`` drives one stage at a time; later stages read the earlier ones' outputs. Under a Ray the user
    started, every stage runs on it, and it is still there for the next call."""
    from sctune.search import run as sctune_run

    space = REPO / "search_spaces" / "digits.yaml"
    common = dict(name="api", storage_path=tmp_path, smoke=True, quiet=True)
    r1 = sctune_run(space, stage="range", **common)
    assert users_ray.is_initialized()
    assert r1.stages_run == ["range"] and r1.summary is None and r1.best is None
    assert r1.bounds["status"] == "ok"
    r2 = sctune_run(space, stage="search", num_samples=2, **common)
    assert r2.stages_run == ["search"] and users_ray.is_initialized()
    # 2 full trainings' worth: the recipe in full, then one more configuration in full (too little for a ladder)
    assert r2.summary["epochs_run"].sum() <= 2 * SPEC.base.epochs
    assert sorted(r2.summary["epochs"]) == [SPEC.base.epochs] * 2
    assert r2.summary["is_recipe"].sum() == 1
    assert r2.bounds == r1.bounds
    r3 = sctune_run(space, stage="final", **common)
    assert r3.stages_run == ["final"]
    assert r3.best["final"]["n"] == SPEC.final.seeds
    assert math.isfinite(r3.best["value"])
