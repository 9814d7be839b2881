"""Reliability: faults survived, bad state refused, nothing lost (real Ray, tiny budgets).

Faults are injected through sctune's trial hook (``fault_util.fault_env``: rules in ``SCTUNE_FAULT_INJECT``,
inert unless set), by removing a Ray worker node, and by SIGKILLing the driver's process group. Every Ray
started here lives under a private RAY_TMPDIR, and only processes naming that directory are ever killed.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from fault_util import (
    Cli,
    cleanup_ray_tmp,
    cli_env,
    fault_env,
    listening_sockets,
    pids_mentioning,
    run_cli,
    short_tmpdir,
    tb_event_files,
    tb_session_status,
    tb_steps,
    tune_trials,
)

pytestmark = pytest.mark.ray

TRAIN_LOSS = "train/loss"  # logged once per epoch (val/acc is logged again at a run's end)

DIGITS = "task: {dataset: digits, model: digits_cnn}\n"


def _space(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def _summary(exp: Path) -> pd.DataFrame:
    df = pd.read_csv(exp / "summary.csv")
    assert df["trial_id"].is_unique, df["trial_id"].tolist()
    return df


def _tb_runs(exp: Path, stage: str) -> dict[str, Path]:
    root = exp / "tensorboard" / stage
    return {p.name: p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}


# -- 1 + 4 + 9: a trial that raises once, trials that diverge, the dashboard -----------------------------

FAULTY = DIGITS + """
fixed: {epochs: 4, batch_size: 64}
search: {num_samples: 4, max_concurrent: 2, scheduler: asha, grace_period: 2, reduction_factor: 2, seed: 0}
final: {seeds: 1}
space:
  max_lr: {choices: [10000.0, 0.5, 0.7, 0.9]}   # the first point (Smith's recipe, clipped into the space) is 1e4
  div_factor: {type: float, low: 3.0, high: 20.0, log: true}
"""


def test_trial_fault_retried_from_checkpoint_and_divergence_isolated(tmp_path, ray_tmp):
    """One trial raises after its epoch-2 checkpoint: Tune retries it from that checkpoint (its history
    goes 1, 2, 3, 4: no epoch twice) and the search completes. Trials at max_lr 1e4 diverge: stopped at
    once, marked ``diverged``, never the best. The local dashboard (--dashboard) listens on loopback only."""
    marker = tmp_path / "fault.once"
    env = cli_env(ray_tmp, **fault_env(f"search:epoch=2:once={marker}"))
    space = _space(tmp_path, "faulty", FAULTY)
    storage = tmp_path / "s"
    cli = Cli([space, "--stage", "search", "--lr-bounds", "0.25", "1.0", "--storage-path", storage,
               "--name", "faulty", "--dashboard"], env=env, log_dir=tmp_path, tag="faulty")
    try:
        # 9: while Ray runs, every listening socket of our Ray session is on loopback, the dashboard's too
        def dashboard_sockets():
            pids = [p for p in pids_mentioning(str(ray_tmp)) if "dashboard/dashboard.py" in _cmd(p)]
            return listening_sockets(pids)

        dash = cli.wait_until("the dashboard to listen", dashboard_sockets, timeout=180)
        session = listening_sockets(pids_mentioning(str(ray_tmp)))
        assert dash and all(ip in ("127.0.0.1", "::1") for _, ip, _ in dash), dash
        assert all(ip in ("127.0.0.1", "::1") for _, ip, _ in session), session
        rc = cli.wait(timeout=300)
    finally:
        cli.kill()
    assert rc == 0, cli.stderr[-3000:]
    exp = storage / "faulty"

    # 1: the fault happened once, to one trial, and that trial continued from its checkpoint
    assert marker.exists(), "the fault hook never fired"
    faulted = marker.read_text()
    trials = tune_trials(exp / "ray" / "search")
    assert len(trials) == 4 and all(t["status"] == "TERMINATED" for t in trials.values()), trials
    assert trials[faulted]["num_failures"] == 1, trials
    assert sum(t["num_failures"] for t in trials.values()) == 1, trials
    summary = _summary(exp)
    assert len(summary) == 4 and not (summary["status"] == "error").any(), summary
    row = summary.set_index("trial_id").loc[faulted]
    assert row["epochs_run"] >= 3, row  # it went on past the fault at epoch 2
    runs = _tb_runs(exp, "search")
    assert set(runs) == set(summary["trial_id"])
    steps = tb_steps(runs[faulted])
    assert steps == list(range(1, int(row["epochs_run"]) + 1)), f"retry did not continue from its checkpoint: {steps}"
    assert len(tb_event_files(runs[faulted])) >= 2  # a second process wrote the epochs after the retry
    assert tb_session_status(runs[faulted]) == ("STATUS_SUCCESS" if row["status"] == "completed"
                                                else "STATUS_UNKNOWN")  # aborted (pruned)

    # 4: divergence is stopped, marked, isolated
    huge = summary[summary["max_lr"] > 100]
    healthy = summary[summary["max_lr"] < 100]
    assert len(huge) >= 1 and len(healthy) >= 1, summary
    assert (huge["status"] == "diverged").all(), huge
    assert (huge["epochs_run"] == 1).all(), huge  # stopped at once, before ASHA's first rung (epoch 2)
    assert healthy["status"].isin(["completed", "pruned"]).all(), healthy
    assert (healthy["status"] == "completed").any(), healthy
    for tid in huge["trial_id"]:
        assert tb_session_status(runs[tid]) == "STATUS_FAILURE"
    from sctune.service.space import load_space
    from sctune.service.summaries import pick_best

    best = pick_best(summary, load_space(space))
    assert best["max_lr"] < 100 and best["status"] == "completed", best

    # 9: the printed TensorBoard command binds loopback only
    tb_line = next(ln for ln in cli.stdout.splitlines() if ln.startswith("TensorBoard:"))
    assert "--host 127.0.0.1" in tb_line and "--bind_all" not in tb_line, tb_line


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# -- 3: the driver SIGKILLed during stage 1, between stages, during stage 2; --resume each time -------------

CHAIN = DIGITS + """
fixed: {epochs: 4, batch_size: 64}
range_test: {num_iter: 20, eval_every: 2, weight_decays: [0.0], repeats: 3}
search: {num_samples: 3, max_concurrent: 2, scheduler: none, seed: 0}
final: {seeds: 1}
space:
  max_lr: {type: float, low: 0.25, high: 1.0, log: true, scale: max_lr_bound}
  div_factor: {type: float, low: 3.0, high: 20.0, log: true}
"""


def _range_run(exp: Path, config: dict) -> Path:
    from sctune.present import tensorboard as tb

    return exp / "tensorboard" / tb.run_name("range", wd=float(config["weight_decay"]), seed=int(config["seed"]))


@pytest.mark.slow
def test_driver_killed_at_three_points_resumes_without_rerunning(tmp_path, ray_tmp):
    """SIGKILL the driver's whole process group (Ray included) during the range tests, as stage 1 ends,
    and during the search; ``--resume`` each time. Trials Tune recorded as finished never run again, a
    trial killed mid-run continues from its checkpoint, the searcher stops at num_samples, and the
    outputs are complete: one summary row and one TensorBoard run per trial, each stage done once."""
    space = _space(tmp_path, "chain", CHAIN)
    storage = tmp_path / "s"
    exp = storage / "chain"
    # delays keep every stage long enough to be killed in the middle of it
    env = cli_env(ray_tmp, **fault_env("range:delay=1;search:delay=1"))
    common = [space, "--storage-path", storage, "--name", "chain", "--lr-bounds", "0.25", "1.0"]

    def killed(tag: str, args: list, what: str, predicate, timeout: float = 240):
        cli = Cli(args, env=env, log_dir=tmp_path, tag=tag)
        try:
            snap = cli.wait_until(what, predicate, timeout=timeout)
        finally:
            cli.kill()
        assert pids_mentioning(str(ray_tmp)) == [], "Ray processes of the killed driver survived"
        return snap

    # K1: during stage 1, once Tune has recorded a finished range test and others are unfinished
    def range_partly_done():
        trials = tune_trials(exp / "ray" / "range")
        done = {t: v for t, v in trials.items() if v["status"] == "TERMINATED"}
        if done and len(done) < len(trials):
            return {t: [p.name for p in tb_event_files(_range_run(exp, v["config"]))] for t, v in done.items()}
        return None

    range_done = killed("k1", common, "a finished range test", range_partly_done)
    assert all(files for files in range_done.values()), range_done

    # K2: between stages, the moment stage 1's bounds.json exists
    killed("k2", [*common, "--resume"], "bounds.json", lambda: (exp / "range_test" / "bounds.json").exists())

    # K3: during stage 2, once a trial finished and another is running past its second checkpoint
    def search_partly_done():
        trials = tune_trials(exp / "ray" / "search")
        done = [t for t, v in trials.items() if v["status"] == "TERMINATED"]
        running = [t for t, v in trials.items() if v["status"] == "RUNNING" and v["epoch"] >= 2]
        if done and running:
            return trials | {"_steps": {t: tb_steps(exp / "tensorboard" / "search" / t, TRAIN_LOSS) for t in trials}}
        return None

    at_k3 = killed("k3", [*common, "--resume"], "a finished and a running search trial", search_partly_done)
    steps_k3 = at_k3.pop("_steps")
    # 6: the checkpoint Tune recorded last for a running trial goes missing (one checkpoint per epoch)
    # (read from Tune's state as the kill left it: it may have saved once more after the snapshot)
    after_kill = tune_trials(exp / "ray" / "search")
    lost_tid, lost = next((t, v) for t, v in after_kill.items() if v["status"] == "RUNNING" and v["epoch"] >= 2
                          and v["checkpoint"])
    (trial_dir,) = (exp / "ray" / "search").glob(f"*_{lost_tid}_*")
    shutil.rmtree(trial_dir / lost["checkpoint"])

    final = run_cli([*common, "--resume"], env=env, log_dir=tmp_path, tag="resume", timeout=300)
    assert final.proc.returncode == 0, final.stderr[-3000:]
    assert pids_mentioning(str(ray_tmp)) == []

    # stage 1: the range tests recorded as finished at K1 were not run again
    range_trials = tune_trials(exp / "ray" / "range")
    assert len(range_trials) == 3 and all(v["status"] == "TERMINATED" for v in range_trials.values())
    for tid, files in range_done.items():
        now = [p.name for p in tb_event_files(_range_run(exp, range_trials[tid]["config"]))]
        assert now == files, f"range test {tid} ran again after --resume: {files} -> {now}"
    bounds = json.loads((exp / "range_test" / "bounds.json").read_text())
    assert bounds["status"] == "ok" and len(bounds["trials"]) == 3, bounds

    # stage 2: the searcher stopped at num_samples; finished trials kept; the running one continued
    summary = _summary(exp)
    search_trials = tune_trials(exp / "ray" / "search")
    assert len(summary) == 3 and set(summary["trial_id"]) == set(search_trials), (summary, search_trials)
    assert summary["status"].isin(["completed"]).all(), summary
    assert set(at_k3) <= set(search_trials)
    trial_dirs = [p for p in (exp / "ray" / "search").iterdir() if p.is_dir() and p.name.startswith("train_trial_")]
    assert len(trial_dirs) == 3, trial_dirs
    runs = _tb_runs(exp, "search")
    assert set(runs) == set(summary["trial_id"]), "TensorBoard runs of trials the resumed search does not know"
    for tid, v in at_k3.items():
        steps = tb_steps(runs[tid], TRAIN_LOSS)
        if v["status"] == "TERMINATED":
            assert steps == steps_k3[tid], f"finished trial {tid} ran again: {steps_k3[tid]} -> {steps}"
        elif v["epoch"] >= 1:  # the driver had recorded a checkpoint: resumed from it, epoch 1 ran once
            assert steps.count(1) == 1 and sorted(set(steps)) == [1, 2, 3, 4], (tid, v, steps)
        else:  # killed before the driver recorded any checkpoint of it: it restarts, and completes
            assert sorted(set(steps)) == [1, 2, 3, 4], (tid, v, steps)
    assert "is missing; it resumes from its previous good checkpoint" in final.stderr, final.stderr[-3000:]
    for tid in runs:
        assert tb_session_status(runs[tid]) == "STATUS_SUCCESS", tid

    # every stage done exactly once, all outputs there and consistent
    state = json.loads((exp / "state.json").read_text())
    assert state["done"] == ["range", "search", "final"], state
    best = json.loads((exp / "best.json").read_text())
    assert best["trial_id"] in set(summary["trial_id"]) and best["final"]["n"] == 1, best
    assert (exp / "report.md").is_file() and (exp / "range_test" / "curves.csv").is_file()
    assert len(_tb_runs(exp, "final")) == 1


LAST_EPOCH = DIGITS + """
fixed: {epochs: 3, batch_size: 64}
range_test: {num_iter: 20, eval_every: 2, weight_decays: [0.0], repeats: 1}
search: {num_samples: 1, max_concurrent: 1, scheduler: none, seed: 0}
final: {seeds: 1}
space:
  max_lr: {type: float, low: 0.25, high: 1.0, log: true, scale: max_lr_bound}
"""


@pytest.mark.slow
def test_trial_finished_before_tune_recorded_it_resumes_as_completed(tmp_path, ray_tmp):
    """The race the kill tests hit now and then, made certain: a trial wrote its last epoch's checkpoint,
    then the driver died while Tune's saved state still said "running, epoch 2", and the checkpoint that
    state names went missing. On --resume the trial falls back to its newest good checkpoint, the last
    epoch's: nothing is left to train, and it must still end as a completed trial, not a pruned one."""
    from sctune.service.trainables import CHECKPOINT_FILE

    space = _space(tmp_path, "last", LAST_EPOCH)
    storage = tmp_path / "s"
    exp = storage / "last"
    search = exp / "ray" / "search"
    env = cli_env(ray_tmp, **fault_env("search:delay=2"))  # 2 s after every epoch's report: time to look
    common = [space, "--storage-path", storage, "--name", "last", "--lr-bounds", "0.25", "1.0"]

    snap = tmp_path / "snapshot"
    snap.mkdir()

    def at_epoch_2():  # one read of Tune's newest state, parsed from the copy: what we check is what we keep
        files = sorted(search.glob("experiment_state-*.json"))
        if not files:
            return None
        try:
            text = files[-1].read_text()
            (snap / files[-1].name).write_text(text)
            trials = list(tune_trials(snap).values())
        except (OSError, ValueError):  # caught mid-write
            return None
        finally:
            for f in snap.iterdir():
                f.unlink()
        if len(trials) == 1 and trials[0]["status"] == "RUNNING" and trials[0]["epoch"] == 2:
            return files[-1], text
        return None

    def last_checkpoint_written():
        return next((c for c in search.glob("*/checkpoint_000002") if (c / CHECKPOINT_FILE).is_file()), None)

    cli = Cli(common, env=env, log_dir=tmp_path, tag="race")
    try:
        state_file, stale = cli.wait_until("the trial at epoch 2", at_epoch_2, timeout=240)
        cli.wait_until("the last epoch's checkpoint", last_checkpoint_written, timeout=120)
    finally:
        cli.kill()
    assert pids_mentioning(str(ray_tmp)) == []
    for f in search.glob("experiment_state-*.json"):  # Tune's state as it was at epoch 2 ...
        f.unlink()
    state_file.write_text(stale)
    (trial_dir,) = [p for p in search.iterdir() if p.is_dir() and p.name.startswith("train_trial_")]
    shutil.rmtree(trial_dir / "checkpoint_000001")  # ... and the checkpoint it names, gone

    final = run_cli([*common, "--resume"], env=env, log_dir=tmp_path, tag="resume", timeout=300)
    assert final.proc.returncode == 0, final.stderr[-3000:]
    summary = _summary(exp)
    assert summary["status"].tolist() == ["completed"] and summary["epochs_run"].tolist() == [3], summary
    assert json.loads((exp / "best.json").read_text())["trial_id"] == summary["trial_id"][0]


# -- 4: a range test whose loss diverges is cut; bounds come from finite points only ------------------------

@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core runner are ~10x slower, not faster
    yield
    torch.set_num_threads(n)


def test_diverging_range_test_is_cut_and_bounds_use_finite_points(one_thread):
    from sctune.core.bounds import bounds_from_frame, bounds_kwargs
    from sctune.core.config import RangeTestConfig, TaskConfig, TrainConfig
    from sctune.core.range_test import run_range_test

    cfg = TrainConfig(task=TaskConfig(dataset="digits", model="digits_cnn"), batch_size=64)
    rt = RangeTestConfig(start_lr=1e-3, end_lr=1e5, num_iter=80, step_mode="exp", eval_every=2, eval_samples=512,
                         recal_samples=256, weight_decays=(0.0,), repeats=1)
    res = run_range_test(cfg, rt, weight_decay=0.0, seed=0)
    assert res.diverged and len(res.frame) < rt.num_iter, res.stop_reason  # cut, not run to 1e5
    b = res.bounds()
    assert b.status == "ok", b.message
    cut_lr = float(res.frame["lr"].iloc[-1])
    assert b.max_lr < cut_lr and b.min_lr < b.max_lr
    # a tail of NaN/inf losses (a run that went non-finite) changes nothing: only finite points count
    tail = pd.DataFrame({"step": [len(res.frame), len(res.frame) + 1], "lr": [cut_lr * 2, cut_lr * 4],
                         "loss": [math.inf, math.nan], "smooth_loss": [math.nan] * 2, "acc": [0.99, 0.99],
                         "val_loss": [math.nan] * 2})
    b2 = bounds_from_frame(pd.concat([res.frame, tail], ignore_index=True), method="smith",
                           **bounds_kwargs(rt, diverged=True))
    assert (b2.status, b2.max_lr, b2.min_lr) == (b.status, b.max_lr, b.min_lr)
    assert json.dumps(b2.to_dict(), allow_nan=False)  # strict JSON: no NaN leaks into bounds.json


# -- 5: degenerate range-test curves: an explicit "no usable bounds", stage 2 does not start ----------------

def _curve(kind: str, n: int = 100) -> pd.DataFrame:
    lr = [3.0 * (i + 1) / n for i in range(n)]
    if kind == "flat":
        loss, acc = [2.3] * n, [0.1] * n
    elif kind == "rising":  # worse from the very first step: the ramp starts too high
        loss, acc = [2.3 + 0.05 * i for i in range(n)], [0.9 - 0.008 * i for i in range(n)]
    elif kind == "all_nan":
        loss, acc = [math.nan] * n, [math.nan] * n
    elif kind == "too_short":
        n, lr = 6, lr[:6]
        loss, acc = [2.3 - 0.1 * i for i in range(n)], [0.1 + 0.1 * i for i in range(n)]
    acc = [a if i % 5 == 4 or kind == "too_short" else math.nan for i, a in enumerate(acc)]
    return pd.DataFrame({"weight_decay": 0.0, "seed": 0, "step": range(n), "lr": lr, "loss": loss,
                         "smooth_loss": loss, "acc": acc, "val_loss": loss})


@pytest.mark.parametrize("kind", ["flat", "rising", "all_nan", "too_short"])
def test_degenerate_range_curves_give_no_usable_bounds(tmp_path, kind):
    from sctune.service.space import parse_space
    from sctune.service.stages import ExperimentPaths, StageError, summarize_range_tests

    spec = parse_space({"task": {"dataset": "digits", "model": "digits_cnn"},
                        "range_test": {"weight_decays": [0.0], "repeats": 1}}, "test.yaml")
    paths = ExperimentPaths(tmp_path)
    per_trial = [{"weight_decay": 0.0, "seed": 0}]
    with pytest.raises(StageError, match="no range test yielded usable LR bounds") as e:
        summarize_range_tests(spec, paths, _curve(kind), [dict(t) for t in per_trial])
    assert "--lr-bounds" in str(e.value)
    bounds = json.loads((tmp_path / "range_test" / "bounds.json").read_text())  # strict JSON
    assert bounds["status"] == "no_usable_bounds" and bounds["chosen"] is None, bounds
    assert bounds["per_weight_decay"]["0"]["status"] != "ok"
    # with the user's bounds it proceeds, and says where the bounds came from
    out = summarize_range_tests(spec, paths, _curve(kind), [dict(t) for t in per_trial], lr_bounds=(0.1, 1.0))
    assert out["status"] == "ok" and out["source"] == "user (--lr-bounds)"
    assert out["chosen"]["max_lr_bound"] == 1.0 and out["chosen"]["min_lr_bound"] == 0.1


# -- 9: checkpoints load with weights_only=True, space files with yaml.safe_load ----------------------------

SCTUNE = Path(__file__).resolve().parent.parent / "sctune"


def test_every_torch_load_is_weights_only_and_yaml_is_safe():
    import re

    calls = []
    for f in sorted(SCTUNE.rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((f.name, text[m.start():i]))
        assert not re.search(r"yaml\.(unsafe_load|load|full_load)\(|Loader=", text), f.name
    assert calls, "no torch.load call found"
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path):

    import torch
    from ray import tune

    from sctune.service.trainables import CHECKPOINT_FILE, load_checkpoint_state, load_trial_state

    marker = tmp_path / "pwned"
    trial = tmp_path / "trial"
    good, evil = trial / "checkpoint_000000", trial / "checkpoint_000001"
    good.mkdir(parents=True)
    evil.mkdir()
    torch.save({"epoch": 1, "history": [], "model": {"w": torch.zeros(2)}}, good / CHECKPOINT_FILE)
    torch.save({"epoch": 2, "payload": _Evil(marker)}, evil / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_state(evil)
    assert not marker.exists()
    # a trial handed the refused checkpoint falls back to its previous good one, never runs the payload
    state = load_trial_state(tune.Checkpoint.from_directory(str(evil)))
    assert state is not None and state["epoch"] == 1
    # a truncated newest checkpoint, or a missing one, falls back the same way
    (evil / CHECKPOINT_FILE).write_bytes((good / CHECKPOINT_FILE).read_bytes()[:100])
    assert load_trial_state(tune.Checkpoint.from_directory(str(evil)))["epoch"] == 1
    shutil.rmtree(good)
    assert load_trial_state(tune.Checkpoint.from_directory(str(evil))) is None  # nothing usable: start over
    assert not marker.exists()


# -- 5 (CLI), 6, 7: a range test with no usable bounds, then --lr-bounds; the finished experiment is then
# -- reused (copied) for the corrupted-state and existing-name cases ----------------------------------------

DEGENERATE = DIGITS + """
fixed: {epochs: 3, batch_size: 64}
range_test: {start_lr: 0.0, end_lr: 1.0e-6, num_iter: 20, eval_every: 2, weight_decays: [0.0], repeats: 1}
search: {num_samples: 2, max_concurrent: 2, scheduler: none, seed: 0}
final: {seeds: 1}
space:
  max_lr: {type: float, low: 0.25, high: 1.0, log: true, scale: max_lr_bound}
"""


@pytest.fixture(scope="module")
def degenerate(tmp_path_factory):
    """Run 1: the LR ramp ends at 1e-6, nothing is learned: exit 3. Run 2: --resume with --lr-bounds."""
    tmp = tmp_path_factory.mktemp("degenerate")
    ray_tmp = short_tmpdir()
    try:
        space = _space(tmp, "degenerate", DEGENERATE)
        storage = tmp / "s"
        exp = storage / "degen"
        env = cli_env(ray_tmp)
        common = ["--storage-path", storage, "--name", "degen"]
        r1 = run_cli([space, *common], env=env, log_dir=tmp, tag="r1", timeout=300)
        after_r1 = {"files": sorted(str(p.relative_to(exp)) for p in exp.rglob("*")),
                    "bounds": json.loads((exp / "range_test" / "bounds.json").read_text()),
                    "state": json.loads((exp / "state.json").read_text()),
                    "range_tb": [p.name for p in exp.glob("tensorboard/range/*/*/*tfevents*")]}
        r2 = run_cli([*common, "--resume", "--lr-bounds", "0.1", "1.0"], env=env, log_dir=tmp, tag="r2",
                     timeout=300)
        yield {"exp": exp, "storage": storage, "space": space, "r1": r1, "after_r1": after_r1, "r2": r2,
               "env": env, "tmp": tmp}
    finally:
        cleanup_ray_tmp(ray_tmp)


def test_no_usable_bounds_exits_3_before_stage_2(degenerate):
    r1, after = degenerate["r1"], degenerate["after_r1"]
    assert r1.proc.returncode == 3, r1.stderr[-3000:]
    err = r1.stderr
    assert "no range test yielded usable LR bounds" in err and "--lr-bounds MIN_LR MAX_LR" in err, err
    assert "--resume --name degen" in err, err  # says how to go on without losing stage 1
    assert "Traceback" not in err, err
    assert after["bounds"]["status"] == "no_usable_bounds" and after["bounds"]["chosen"] is None
    assert after["bounds"]["per_weight_decay"]["0"]["status"] == "flat", after["bounds"]
    assert not any(f.startswith(("ray/search", "summary.csv", "best.json")) for f in after["files"]), after["files"]
    assert after["state"]["done"] == []


def test_user_lr_bounds_proceed_without_rerunning_range_tests(degenerate):
    r2, exp = degenerate["r2"], degenerate["exp"]
    assert r2.proc.returncode == 0, r2.stderr[-3000:]
    bounds = json.loads((exp / "range_test" / "bounds.json").read_text())
    assert bounds["status"] == "ok" and bounds["source"] == "user (--lr-bounds)", bounds
    assert bounds["chosen"]["max_lr_bound"] == 1.0 and bounds["chosen"]["min_lr_bound"] == 0.1
    assert [p.name for p in exp.glob("tensorboard/range/*/*/*tfevents*")] == degenerate["after_r1"]["range_tb"]
    assert len(_summary(exp)) == 2 and (exp / "best.json").is_file()
    assert json.loads((exp / "state.json").read_text())["done"] == ["range", "search", "final"]


def _cli_fast(args, env, tmp, tag):
    t0 = time.monotonic()
    cli = run_cli(args, env=env, log_dir=tmp, tag=tag, timeout=60)
    return cli, time.monotonic() - t0


def test_existing_experiment_without_resume_is_refused(degenerate, tmp_path):
    ray_tmp = short_tmpdir()
    try:
        env = cli_env(ray_tmp)
        cli, wall = _cli_fast([degenerate["space"], "--storage-path", degenerate["storage"], "--name", "degen"],
                              env, tmp_path, "exists")
        assert cli.proc.returncode == 2, cli.stderr
        assert "already exists" in cli.stderr and "--resume --name degen" in cli.stderr and "--name" in cli.stderr
        assert "Traceback" not in cli.stderr and not (ray_tmp / "ray").exists()
    finally:
        cleanup_ray_tmp(ray_tmp)


def test_truncated_state_json_without_resume_is_refused(degenerate, tmp_path):
    exp = tmp_path / "s" / "degen"
    shutil.copytree(degenerate["exp"], exp)
    text = (exp / "state.json").read_text()
    (exp / "state.json").write_text(text[: len(text) // 2])
    ray_tmp = short_tmpdir()
    try:
        cli, wall = _cli_fast(["--storage-path", exp.parent, "--name", "degen"], cli_env(ray_tmp), tmp_path, "state")
        assert cli.proc.returncode == 2, cli.stderr
        assert "state.json is corrupted" in cli.stderr and "--resume --name degen" in cli.stderr, cli.stderr
        assert "Traceback" not in cli.stderr and not (ray_tmp / "ray").exists()
    finally:
        cleanup_ray_tmp(ray_tmp)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_corrupted_outputs_rebuilt_corrupted_tune_state_refused(degenerate, tmp_path):
    """--resume with a truncated state.json, bounds.json and summary.csv, no best.json, and Ray Tune's state
    of stage 3 truncated: state, bounds and summary are rebuilt from Tune's records (no range test or trial
    runs again), then stage 3 stops with a clear message and exit code 3, never a traceback. (With only Tune's
    state cut short, its whole copy in .sctune-good is put back: the disk-full test.)"""
    src = degenerate["exp"]
    exp = tmp_path / "s" / "degen"
    shutil.copytree(src, exp)
    before_summary = _summary(src)
    before_bounds = json.loads((src / "range_test" / "bounds.json").read_text())
    tb_before = sorted(str(p.relative_to(src)) for p in src.glob("tensorboard/**/*tfevents*"))
    for f in ("state.json", "range_test/bounds.json", "summary.csv"):
        _truncate(exp / f)
    (exp / "best.json").unlink()
    # the state and the last whole copy sctune keeps of it (a full disk cuts only the former short)
    for f in [*(exp / "ray" / "final").glob("experiment_state-*.json"),
              *(exp / "ray" / "final" / ".sctune-good").glob("experiment_state-*.json")]:
        _truncate(f)
    ray_tmp = short_tmpdir()
    try:
        cli = run_cli(["--storage-path", exp.parent, "--name", "degen", "--resume", "--lr-bounds", "0.1", "1.0"],
                      env=cli_env(ray_tmp), log_dir=tmp_path, tag="corrupt", timeout=300)
    finally:
        cleanup_ray_tmp(ray_tmp)
    err = cli.stderr
    assert cli.proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err, err
    assert f"{exp / 'ray' / 'final'}" in err and "cannot be restored" in err and "--resume" in err, err
    assert "state.json is corrupted" in err and "bounds.json is unreadable" in err and "summary.csv is unreadable" \
        in err, err
    bounds = json.loads((exp / "range_test" / "bounds.json").read_text())
    assert bounds["chosen"] == before_bounds["chosen"] and bounds["status"] == "ok"
    summary = _summary(exp)
    assert sorted(summary["trial_id"]) == sorted(before_summary["trial_id"])
    assert json.loads((exp / "state.json").read_text())["done"] == ["range", "search"]
    tb_after = sorted(str(p.relative_to(exp)) for p in exp.glob("tensorboard/**/*tfevents*"))
    assert tb_after == tb_before, "a range test or trial ran again"


# -- 2: a worker node removed while trials run ------------------------------------------------------------

NODES = DIGITS + """
fixed: {epochs: 4, batch_size: 64}
search: {num_samples: 3, max_concurrent: 2, scheduler: none, seed: 0}
final: {seeds: 1}
space:
  max_lr: {type: float, low: 0.25, high: 1.0, log: true, scale: max_lr_bound}
"""

_SCTUNE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1",
               "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000", "RAY_DEDUP_LOGS": "1"}


NODE_EPOCH_DELAY_S = 5  # the slower of the two delays this test ran at (2 and 5 s): headroom on a loaded machine


@pytest.mark.slow
def test_worker_node_removed_mid_run_trials_resume_elsewhere(tmp_path, monkeypatch, ray_tmp):
    """A head with 0 CPUs and two 1-CPU workers; once both running trials have checkpointed, one worker is
    killed. Its trial is retried on the other worker from its checkpoint; every trial completes. Epochs are
    slowed (5 s after each) so that the removal lands mid-trial on a fast machine as on a loaded one."""
    import ray
    from ray.cluster_utils import Cluster

    from sctune.search import run

    # the nodes inherit this process's environment: sctune's Ray settings, a private RAY_TMPDIR, slow epochs
    slow = fault_env(f"search:delay={NODE_EPOCH_DELAY_S}")
    for k, v in {**_SCTUNE_ENV, "RAY_TMPDIR": str(ray_tmp), **slow}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    space = _space(tmp_path, "nodes", NODES)
    exp = tmp_path / "s" / "nodes"
    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    removed: dict = {}
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes(timeout=120)

        def remove_a_worker():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                dirs = [d for d in (exp / "ray" / "search").glob("train_trial_*") if d.is_dir()]
                # as soon as two trials (one per worker) hold a checkpoint, while they still have epochs to go
                if sum(any(d.glob("checkpoint_*")) for d in dirs) >= 2:
                    removed["node_id"] = workers[0].node_id
                    removed["at"] = {d.name.split("_")[2]: sorted(p.name for p in d.glob("checkpoint_*"))
                                     for d in dirs}
                    cluster.remove_node(workers[0], allow_graceful=False)
                    return
                time.sleep(0.05)

        remover = threading.Thread(target=remove_a_worker, daemon=True)
        remover.start()
        res = run(space, name="nodes", storage_path=tmp_path / "s", stage="search", lr_bounds=(0.25, 1.0),
                  address=cluster.address, quiet=True)
        remover.join(timeout=10)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    summary = _summary(exp)
    # Each trial sleeps NODE_EPOCH_DELAY_S after each of its 4 epochs, so two trials hold a checkpoint long before the
    # run ends: a node never removed means the trials did not run (e.g. their actors never started).
    assert removed, (f"no worker node was removed: two trials never held a checkpoint at once (epoch delay "
                     f"{NODE_EPOCH_DELAY_S} s); summary:\n{summary.to_string()}")
    assert len(summary) == 3 and (summary["status"] == "completed").all(), summary
    assert len(res.summary) == 3
    trials = tune_trials(exp / "ray" / "search")
    hit = [t for t, v in trials.items() if v["num_failures"] >= 1]
    assert hit, f"no trial was running on the removed node: {trials}"
    survivor = next(w.node_id for w in cluster.worker_nodes) if cluster.worker_nodes else None
    for tid in hit:
        row = summary.set_index("trial_id").loc[tid]
        assert row["node_id"] != removed["node_id"], (survivor, row)  # finished elsewhere
        steps = tb_steps(exp / "tensorboard" / "search" / tid, TRAIN_LOSS)
        assert steps.count(1) == 1 and sorted(set(steps)) == [1, 2, 3, 4], (tid, steps)  # from its checkpoint


# -- the fault hook itself --------------------------------------------------------------------------------

def test_fault_hook_is_inert_unless_set_and_fires_once(tmp_path, monkeypatch):
    import subprocess
    import sys

    from fault_util import FAULT_ENV, InjectedFault
    from fault_util import inject_fault as _inject_fault

    monkeypatch.delenv(FAULT_ENV, raising=False)
    _inject_fault("search", 2, "t1")  # inert
    marker = tmp_path / "once"
    monkeypatch.setenv(FAULT_ENV, f"range:epoch=1;search:epoch=2:once={marker}")
    _inject_fault("search", 1, "t1")  # other epoch
    _inject_fault("final", 2, "t1")  # other stage
    with pytest.raises(InjectedFault):
        _inject_fault("search", 2, "t1")
    assert marker.read_text() == "t1"
    _inject_fault("search", 2, "t1")  # once: the retry passes
    _inject_fault("search", 2, "t2")  # and so does every other trial
    with pytest.raises(InjectedFault):
        _inject_fault("range", 1, "r1")  # no once: every time
    monkeypatch.setenv(FAULT_ENV, "search:epoch=2:bogus=1")
    with pytest.raises(ValueError, match="bogus"):
        _inject_fault("search", 2, "t1")
    # action=exit: the worker process dies on the spot
    # ...through sctune's own hook, in a fresh process as a Ray worker would be
    env = dict(os.environ, **fault_env("search:epoch=1:action=exit"))
    p = subprocess.run([sys.executable, "-c", "from sctune.service.trainables import trial_hook; "
                        "trial_hook()('search', 1, 't'); print('survived')"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 17 and "survived" not in p.stdout, (p.returncode, p.stdout, p.stderr[-1000:])
