"""Stage 2's successive halving of complete schedules survives a killed driver: ``--resume`` continues the
same ladder (the searcher's books are saved with Tune's state), reruns nothing Tune recorded as finished and
never spends more than the budget (real Ray, tiny budgets)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fault_util import (
    Cli,
    cli_env,
    fault_env,
    pids_mentioning,
    run_cli,
    tb_steps,
    tune_trials,
)

pytestmark = pytest.mark.ray

TRAIN_LOSS = "train/loss"

# 4 epochs: rungs of 1, 2 and 4 epochs; no --budget: the default 8 FTE, the search's share of it spent as
# the recipe in full (the anchor), then a ladder of configurations at the shorter lengths the budget carries,
# the top half promoted, at least two in full (``fidelity.rungs_for_budget``, ``Promotion.planned``).
SPACE = """task: {dataset: digits, model: digits_cnn}
fixed: {epochs: 4, batch_size: 64}
range_test: {num_iter: 20, eval_every: 2, weight_decays: [0.0], repeats: 1}
search: {num_samples: 3, max_concurrent: 2, scheduler: halving, seed: 0}
final: {seeds: 1}
space:
  max_lr: {type: float, low: 0.25, high: 1.0, log: true, scale: max_lr_bound}
  div_factor: {type: float, low: 3.0, high: 20.0, log: true}
"""


def test_driver_killed_mid_ladder_resumes_the_same_ladder(tmp_path: Path, ray_tmp):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    storage = tmp_path / "s"
    exp = storage / "halving"
    env = cli_env(ray_tmp, **fault_env("search:delay=1"))  # trials long enough to be killed mid-run
    common = [space, "--storage-path", storage, "--name", "halving", "--lr-bounds", "0.25", "1.0"]

    def partly_done():
        trials = tune_trials(exp / "ray" / "search")
        done = {t: v for t, v in trials.items() if v["status"] == "TERMINATED"}
        if len(done) >= 2 and any(v["status"] == "RUNNING" for v in trials.values()):
            return {t: tb_steps(exp / "tensorboard" / "search" / t, TRAIN_LOSS) for t in done}
        return None

    cli = Cli(common, env=env, log_dir=tmp_path, tag="k")
    try:
        done_steps = cli.wait_until("two finished search trials and a running one", partly_done, timeout=300)
    finally:
        cli.kill()
    assert pids_mentioning(str(ray_tmp)) == [], "Ray processes of the killed driver survived"

    final = run_cli([*common, "--resume"], env=env, log_dir=tmp_path, tag="resume", timeout=400)
    assert final.proc.returncode == 0, final.stderr[-3000:]

    summary = pd.read_csv(exp / "summary.csv")
    assert set(summary["trial_id"]) == set(tune_trials(exp / "ray" / "search"))
    # the trials finished before the kill were not run again
    for tid, steps in done_steps.items():
        assert tb_steps(exp / "tensorboard" / "search" / tid, TRAIN_LOSS) == steps, tid
    # the ladder as planned, across the kill: complete schedules, the top half promoted, the best in full,
    # and the whole run inside the default budget (no --budget: 8 FTE)
    assert summary["status"].eq("completed").all(), summary
    assert (summary["epochs_run"] == summary["epochs"]).all()
    assert summary.loc[summary["is_recipe"], "epochs"].tolist() == [4]  # the anchor: once, in full
    counts = summary.loc[~summary["is_recipe"], "epochs"].value_counts().sort_index().to_dict()
    lengths = list(counts)
    assert len(lengths) >= 2 and lengths[-1] == 4 and set(lengths) <= {1, 2, 4}, counts
    for short, long in zip(lengths, lengths[1:], strict=False):
        assert counts[long] <= max(1, counts[short] // 2), counts
    best = json.loads((exp / "best.json").read_text())
    assert best["trial_id"] in set(summary.loc[summary["epochs"] == 4, "trial_id"])
    compute = best["compute"]
    assert compute["budget_fte"] == 8 and compute["within_budget"], compute
    assert compute["spent_fte"]["search"] == summary["epochs_run"].sum() / 4
    assert json.loads((exp / "state.json").read_text())["done"] == ["range", "search", "final"]
