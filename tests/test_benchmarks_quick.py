"""The benchmarks' quick modes, end to end: each script runs and writes a well-formed result file.

Benchmarks, not timed tests: nothing here asserts on a timing, a ratio or an accuracy, only on the
structure of what the scripts write (see BENCHMARKS.md for the numbers and how to reproduce them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONPATH": str(REPO)}


def _run(name: str, out: Path, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out / f"{name}.json"
    assert path.is_file(), f"{name} wrote no {path.name}"
    data = json.loads(path.read_text())
    # the common envelope every result file carries
    assert data["benchmark"] == name and data["quick"] is True
    assert data["command"].startswith(".venv/bin/python -m benchmarks.")
    m = data["machine"]
    for key in ("date_utc", "cpu", "cpu_count", "versions", "git_commit", "loadavg_at_start"):
        assert key in m
    assert {"torch", "ray", "optuna"} <= set(m["versions"])
    assert len(data["loadavg_at_end"]) == 3
    assert isinstance(data["settings"], dict)
    return data["results"]


def _is_stats(d: dict) -> bool:
    return {"n", "median", "min", "max", "values"} <= set(d)


def check_search_efficiency(res: dict, out: Path) -> None:
    assert (out / "search_efficiency.png").is_file()
    for task in res.values():
        assert set(task["methods"]) == {"sctune", "random_halving", "random", "conventional", "fastai"}
        for m in task["methods"].values():
            assert _is_stats(m["test_acc_at_budget"]) and _is_stats(m["fte_to_target"])
            assert "median_all" in m["fte_to_target"]  # the median over all repeats, never-reached included
            assert all(_is_stats(v) for v in m["test_acc_at_fte"].values())
            for curve in m["curves_fte"]:
                assert all(len(point) == 3 for point in curve)
        assert "target" in task and task["stage1"][0]["iters"] > 0
        for per_arm in task["paired"].values():  # sctune against each other arm, repeat by repeat
            assert set(per_arm) == {"random_halving", "random", "conventional", "fastai"}
            assert all({"n", "mean", "wins", "ties", "losses"} <= set(p) for p in per_arm.values())


def check_fidelity_rank(res: dict, out: Path) -> None:
    for task in res.values():
        assert task["epochs"][-1] == max(task["epochs"]) and len(task["configs"]) >= 3
        assert set(task["lengths"]) == {str(e) for e in task["epochs"]}
        assert task["lengths"][str(task["epochs"][-1])]["spearman_vs_full"] == pytest.approx(1.0)
        assert "full_vs_full_other_seed_spearman" in task


def check_super_convergence(res: dict, out: Path) -> None:
    assert (out / "super_convergence.png").is_file()
    for v in res.values():
        assert {"onecycle@B/8", "piecewise@B", "piecewise@B/8"} <= set(v["arms"])
        for arm in v["arms"].values():
            assert _is_stats(arm["test_acc"]) and arm["iterations"] > 0 and "lr" in arm["picked"]
        assert {"matched", "ratio"} <= set(v["match"])
        assert set(v["headline"]) == {"onecycle_B8_minus_piecewise_B", "onecycle_B8_minus_piecewise_B8"}


def check_overhead(res: dict, out: Path) -> None:
    assert {"fit", "fit+checkpoint"} <= set(res["ratio_vs_bare"])
    assert all(_is_stats(v) for v in res["ratio_vs_bare"].values())
    assert {"bare", "fit", "fit+checkpoint", "ray_trial"} <= set(res["steady_samples_per_s"])
    assert set(res["ray"]["startup"]) == {"reuse_actors=True", "reuse_actors=False"}
    assert _is_stats(res["ray"]["startup_ratio_no_reuse_over_reuse"])


def check_data_path(res: dict, out: Path) -> None:
    assert set(res["samples_per_s"]) == {"DeviceLoader", "DataLoader(workers=0)", "DataLoader(workers=2)"}
    assert all(_is_stats(v) for v in res["ratio_deviceloader_over"].values())
    assert all(0 <= v["median"] <= 1 for v in res["resnet20_wait_share"].values())


def check_end_to_end(res: dict, out: Path) -> None:
    assert res["failed_runs"] == 0
    run = res["runs"][0]
    assert run["returncode"] == 0 and run["tree_peak_rss_mib"] > 0 and run["tree_peak_pss_mib"] > 0
    assert run["compute"]["iterations"]["range"] > 0
    assert _is_stats(res["wall_s"]) and _is_stats(res["range_share_of_iterations"])


def check_readme_examples(res: dict, out: Path) -> None:
    assert len(res["runs"]) == 1 and all(len(r["numbers"]) == len(r["lines"]) for r in res["runs"])
    assert all(s["runs_with_same_words"] <= s["of"] for s in res["spread"])


def check_recommended_lr(res: dict, out: Path) -> None:
    task = res["tasks"][0]
    rules = task["stage1"][0]["rules"]
    assert rules["learn_lr"] <= rules["top_lr"] and rules["recommended_max_lr"] < rules["max_lr"]
    grid = task["grid"]
    assert [g["max_lr"] for g in grid] == sorted(g["max_lr"] for g in grid)
    assert any(g["recommended_by_stage1_seeds"] for g in grid)  # the recommendation itself was trained
    assert all(g["n"] >= 1 for g in grid)


def check_task_only(res: dict, out: Path) -> None:
    (run,) = res["runs"]
    assert run["task"] == "wine" and len(run["sctune_test_acc"]) == len(run["adam_test_acc"]) == len(run["final_seeds"])
    assert 0 < run["stage1_fte"] <= run["total_fte"] and set(res["summary"]) == {"wine"}
    assert run["recommended"]["max_lr"] > 0 and run["recommended"]["batch_size"] == 8  # filled from the data
    assert run["refit"] is True  # 30% of wine's data held out for validation: the final fit trains on it too


CHECKS = {"search_efficiency": check_search_efficiency, "fidelity_rank": check_fidelity_rank,
          "super_convergence": check_super_convergence,
          "overhead": check_overhead, "data_path": check_data_path, "end_to_end": check_end_to_end,
          "readme_examples": check_readme_examples, "recommended_lr": check_recommended_lr,
          "task_only": check_task_only}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_benchmark_quick_mode(name: str, tmp_path: Path) -> None:
    CHECKS[name](_run(name, tmp_path), tmp_path)
