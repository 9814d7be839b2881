"""A space file that names only its task is a complete experiment (sctune.service.autofill): the missing sections are
filled from the data, ``--stage plan`` says what and why, and the whole service runs on it, on data sctune has
never seen (scikit-learn's wine, tabular) and on a small image set (400 of the 8x8 digits), reaching at least
the test accuracy of the usual default (Adam, lr 1e-3, the same model and epochs).

Also here: a searched parameter the schedule overwrites is refused naming the key, and Adam's cyclical
momentum is its beta1."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest

from sctune.service.space import SpaceError, load_space, parse_space

REPO = Path(__file__).resolve().parent.parent

WINE_TASK = '''\
import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler


def load(task):
    x, y = load_wine(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(xtr)
    f = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte), 3, False
'''
TASKS = {"wine": "task: {dataset: wine_task:load, model: mlp}\n",
         "digits400": "task: {dataset: digits, model: digits_cnn, train_subset: 400}\n"}


def _project(tmp_path: Path, name: str) -> Path:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "wine_task.py").write_text(WINE_TASK)
    (project / f"{name}.yaml").write_text(TASKS[name])
    return project


def test_task_only_file_gets_defaults_scaled_to_the_data(tmp_path, monkeypatch):
    project = _project(tmp_path, "wine")
    monkeypatch.syspath_prepend(str(project))
    spec = load_space(project / "wine.yaml")
    notes = "\n".join(spec.filled)
    # 124 train+val samples: 15% would leave 19 to rank trials on; at least 30% is held out
    assert spec.base.task.val_frac == pytest.approx(0.3) and "val_frac" in notes
    assert spec.final.refit and "final.refit: true" in notes  # 30% held out: the answer trains on it too
    # 38 validation samples: accuracy ties trials a sample apart, the loss ranks them
    assert (spec.search.metric, spec.search.mode) == ("val/loss", "min") and "search.metric: val/loss" in notes
    assert spec.base.batch_size == 8 and "fixed.batch_size: 8" in notes  # 86 training samples
    assert spec.base.schedule == "onecycle" and spec.base.optimizer == "sgd"
    assert set(spec.space) == {"max_lr", "div_factor", "weight_decay", "dropout"}
    assert spec.space["max_lr"].scale == "max_lr_bound" and spec.space["weight_decay"].scale == "wd_prior"
    rt = spec.range_test
    steps = spec.base.epochs * (86 // spec.base.batch_size)
    assert len(rt.weight_decays) * rt.repeats * rt.num_iter <= 0.5 * steps  # stage 1's steps: half an FTE
    assert rt.num_iter // rt.eval_every >= 5  # a readable curve
    # a file with every section is untouched, and nothing is loaded for it
    assert load_space(REPO / "search_spaces" / "digits.yaml").filled == ()
    # --smoke works on the task-only file (a smoke section is filled too)
    assert load_space(project / "wine.yaml", smoke=True).search.num_samples == 4


def test_larger_validation_keeps_accuracy_and_the_train_split(tmp_path):
    """400 digits keep the full set's 216 validation samples (15%): accuracy ranks, and no refit."""
    spec = load_space(_project(tmp_path, "digits400") / "digits400.yaml")
    assert spec.filled and (spec.search.metric, spec.search.mode) == ("val/acc", "max")
    assert not spec.final.refit and spec.base.task.val_frac == pytest.approx(0.15)
    assert not any("val/loss" in n or "refit" in n for n in spec.filled)


def test_plan_prints_what_was_filled_in(tmp_path, monkeypatch, capsys):
    from sctune.search import main

    project = _project(tmp_path, "wine")
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    assert main(["wine.yaml", "--stage", "plan", "--storage-path", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    filled = [ln for ln in out.splitlines() if ln.startswith("[plan] filled in: ")]
    assert any("fixed.batch_size" in ln for ln in filled) and any(ln.startswith("[plan] filled in: space:")
                                                                  for ln in filled), out
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("schedule,key", [("onecycle", "lr"), ("onecycle", "momentum"), ("piecewise", "max_lr"),
                                          ("constant", "milestones_frac")])
def test_a_searched_parameter_the_schedule_ignores_is_refused(schedule, key):
    raw = {"task": {"dataset": "digits", "model": "digits_cnn"}, "fixed": {"schedule": schedule},
           "space": {key: {"type": "float", "low": 0.1, "high": 0.5}}}
    with pytest.raises(SpaceError, match=rf"space\.{key}: is not used by schedule '{schedule}'"):
        parse_space(raw, "s.yaml")


def test_searched_lr_is_refused_with_exit_2_before_ray(tmp_path, capsys):
    from sctune.search import main

    f = tmp_path / "s.yaml"
    f.write_text("task: {dataset: digits, model: digits_cnn}\nspace: {lr: {low: 0.01, high: 0.1}}\n")
    assert main([str(f), "--storage-path", str(tmp_path / "res")]) == 2
    assert "space.lr: is not used by schedule 'onecycle'" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


def test_adam_cycles_beta1_opposite_to_the_lr():
    import torch

    from sctune.core.config import TrainConfig
    from sctune.core.schedules import build_schedule
    from sctune.core.train import make_optimizer

    cfg = TrainConfig(epochs=2, optimizer="adam").with_flat(max_lr=0.01, max_momentum=0.95, min_momentum=0.85)
    opt = make_optimizer(torch.nn.Linear(3, 2), cfg)
    assert type(opt) is torch.optim.Adam
    sched = build_schedule(opt, cfg, steps_per_epoch=10)
    lrs, beta1 = [], []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        beta1.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    peak = lrs.index(max(lrs))
    assert beta1[0] == pytest.approx(0.95) and beta1[peak] == pytest.approx(0.85)


# -- end to end ----------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
# digits400 (360 test samples, no refit); wine (54, refit) runs through the CLI in benchmark 9's quick mode
# (tests/test_benchmarks_quick.py), and its defaults are checked above
@pytest.mark.parametrize("name", ["digits400"])
def test_task_only_file_runs_end_to_end_and_beats_adam(tmp_path, monkeypatch, name):
    from user_task_util import run_in

    from benchmarks.task_only import adam_baseline

    project = _project(tmp_path, name)
    storage = tmp_path / "results"
    # --budget 12: the default 8 FTE leaves the final fit one seed (a fifth of the budget), and a comparison
    # with Adam needs the seed spread of both sides; 12 keeps two
    p = run_in(project, ["-m", "sctune.search", f"{name}.yaml", "--storage-path", str(storage), "--name", "run",
                         "--budget", "12"], timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "[plan] filled in: " in p.stderr
    exp = storage / "run"
    bounds = json.loads((exp / "range_test" / "bounds.json").read_text())
    assert bounds["cost_fte"] < 1.0, bounds["cost_fte"]  # stage 1 under 1 FTE, measured
    best = json.loads((exp / "best.json").read_text())
    ours = [float(r["test/acc"]) for r in best["final"]["runs"] if not r["diverged"]]
    assert len(ours) >= 2, best["final"]
    monkeypatch.syspath_prepend(str(project))
    spec = load_space(project / f"{name}.yaml")
    # Adam at lr 1e-3 on the data the final fit trained on, as many epochs, the final fit's seeds
    base = adam_baseline(spec, best["final"])
    # a tolerance from the seed spread (two standard deviations of either side), at least one test sample
    n_test = {"wine": 54, "digits400": 360}[name]
    tol = max(2 * statistics.stdev(ours), 2 * statistics.stdev(base), 1 / n_test)
    print(f"{name}: sctune {statistics.mean(ours):.4f} +- {statistics.stdev(ours):.4f}, "
          f"Adam 1e-3 {statistics.mean(base):.4f} +- {statistics.stdev(base):.4f}, stage 1 {bounds['cost_fte']:.2f} FTE")
    assert re.search(r"^\[final\]", p.stderr, flags=re.M), p.stderr[-2000:]
    sys.modules.pop("wine_task", None)  # imported by the baseline: the next case's project has its own
    # small data refits (autofill.REFIT_VAL_FRAC): wine's validation is 30% of its training data, digits400's is not
    assert best["final"]["refit"] is (name == "wine"), best["final"]
    assert statistics.mean(ours) >= statistics.mean(base) - tol - 1e-9, (ours, base)
