"""--resume runs the experiment it resumes; a full disk is a pause; storage that cannot hold an experiment,
and a task that fails, stop the run early (issue #20). Done for real: the CLI in its own process group, real
signals (SIGKILL to the driver alone, Ctrl-C to its group), a real tmpfs filled to the last byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from fault_util import (
    REPO,
    Cli,
    cleanup_ray_tmp,
    cli_env,
    fault_env,
    run_cli,
    short_tmpdir,
    tb_event_files,
    tb_session_status,
    tb_steps,
    tune_trials,
)

SPACE_AXES = """space:
  max_lr: {type: float, low: 0.25, high: 1.0, log: true, scale: max_lr_bound}
  div_factor: {type: float, low: 3.0, high: 20.0, log: true}
"""

# full size: 12 epochs, 8 trials, 2 final seeds; --smoke: 3 epochs, 3 trials, 1 seed
SMOKE_SPACE = """task: {dataset: digits, model: digits_cnn}
fixed: {epochs: 12, batch_size: 64}
range_test: {num_iter: 20, eval_every: 2, weight_decays: [0.0], repeats: 3}
search: {num_samples: 8, max_concurrent: 2, scheduler: none, seed: 0}
final: {seeds: 2}
smoke:
  fixed: {epochs: 3}
  search: {num_samples: 3}
  final: {seeds: 1}
""" + SPACE_AXES

DISK_SPACE = """task: {dataset: digits, model: digits_cnn}
fixed: {epochs: 5, batch_size: 64}
range_test: {num_iter: 20, eval_every: 2, weight_decays: [0.0], repeats: 3}
search: {num_samples: 3, max_concurrent: 2, scheduler: none, seed: 0}
final: {seeds: 1}
""" + SPACE_AXES


def _resume_command(stderr: str) -> list[str]:
    """The resume command sctune printed, as argv (``python`` is this interpreter)."""
    line = next(ln for ln in reversed(stderr.splitlines()) if "resume with: python -m sctune.search" in ln.lower())
    cmd = shlex.split(line[line.lower().index("resume with: ") + len("resume with: "):])
    assert cmd[:3] == ["python", "-m", "sctune.search"], cmd
    return cmd[3:]


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "Aborted" not in err, err[-3000:]


# -- --resume keeps the experiment's options --------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
def test_smoke_killed_then_ctrl_c_resumes_as_smoke_with_the_printed_command(tmp_path, ray_tmp):
    """A --smoke run: its driver SIGKILLed in stage 2, resumed (without --smoke), Ctrl-C'd, and resumed again
    with exactly the command it printed. state.json still says smoke; every search trial completed at the
    smoke budget (3 epochs, not relabelled pruned against 12), the search's FTE is in 3-epoch units, the
    final fit ran the smoke's one seed for 3 epochs. A conflicting flag on resume is refused, naming it.
    TensorBoard: no search trial logs an epoch twice, and the final fit's val/acc and test/acc are written
    once at its last step."""
    space = tmp_path / "space.yaml"
    space.write_text(SMOKE_SPACE)
    storage = tmp_path / "s"
    exp = storage / "sm"
    env = cli_env(ray_tmp, **fault_env("search:delay=1.5"))
    first = Cli([space, "--smoke", "--storage-path", storage, "--name", "sm", "--lr-bounds", "0.25", "1.0"],
                env=env, log_dir=tmp_path, tag="first")
    try:
        cli_ok = first.wait_until("a search trial's first checkpoint", lambda: any(
            v["epoch"] >= 1 for v in tune_trials(exp / "ray" / "search").values()), timeout=400)
        assert cli_ok
        os.kill(first.proc.pid, signal.SIGKILL)  # the driver alone: the kill -9 of the issue
        first.proc.wait(timeout=30)
    finally:
        first.kill()
    state = json.loads((exp / "state.json").read_text())
    assert state["smoke"] is True and state["options"]["smoke"] is True, state

    # a conflicting flag: refused before Ray starts, naming the flag
    for flag, value in (("--seed", "7"), ("--num-samples", "8"), ("--refit", None)):
        argv = ["--resume", "--name", "sm", "--storage-path", str(storage), flag] + ([value] if value else [])
        p = subprocess.run([sys.executable, "-m", "sctune.search", *argv], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2 and flag in p.stderr and "--resume keeps it" in p.stderr, (flag, p.stderr)

    second = Cli(["--resume", "--name", "sm", "--storage-path", storage], env=env, log_dir=tmp_path, tag="second")
    try:
        second.wait_until("the search to go on", lambda: sum(
            v["status"] == "TERMINATED" for v in tune_trials(exp / "ray" / "search").values()) >= 1, timeout=400)
        os.killpg(second.proc.pid, signal.SIGINT)
        rc = second.wait(180)
    finally:
        second.kill()
    err = second.stderr
    assert rc == 130, err[-3000:]
    _no_traceback(err)
    assert json.loads((exp / "state.json").read_text())["smoke"] is True

    last = run_cli(_resume_command(err), env=env, log_dir=tmp_path, tag="last", timeout=600)
    assert last.proc.returncode == 0, last.stderr[-3000:]
    state = json.loads((exp / "state.json").read_text())
    assert state["smoke"] is True and state["options"]["num_samples"] == 3, state
    assert state["done"] == ["range", "search", "final"], state
    summary = pd.read_csv(exp / "summary.csv")
    assert len(summary) == 3, summary
    assert (summary["epochs_run"] == 3).all() and (summary["status"] == "completed").all(), summary
    best = json.loads((exp / "best.json").read_text())
    assert best["compute"]["spent_fte"]["search"] == pytest.approx(3.0), best["compute"]  # 3 trials x 3/3 epochs
    runs = best["final"]["runs"]
    assert len(runs) == 1 and runs[0]["epochs"] == 3, runs

    for trial_id in summary["trial_id"].astype(str):
        steps = tb_steps(exp / "tensorboard" / "search" / trial_id)
        assert sorted(steps) == sorted(set(steps)), (trial_id, steps)  # a resumed trial logs no epoch twice
    final_runs = [p for p in (exp / "tensorboard" / "final").iterdir() if tb_event_files(p)]
    assert final_runs
    for run in final_runs:
        for tag in ("val/acc", "test/acc"):
            steps = tb_steps(run, tag)
            assert steps.count(max(steps)) == 1, (run, tag, steps)


def _fake_experiment(storage: Path, name: str, space_text: str, options: dict) -> Path:
    from sctune.service.safeguards import space_sha256

    exp = storage / name
    exp.mkdir(parents=True)
    (exp / "space.yaml").write_text(space_text)
    (exp / "state.json").write_text(json.dumps({"done": ["range"], "smoke": options.get("smoke", False),
                                                "options": options, "space_sha256": space_sha256(exp / "space.yaml")}))
    return exp


def _cli(args: list, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    ray_tmp = short_tmpdir("sctres")
    try:
        p = subprocess.run([sys.executable, "-m", "sctune.search", *map(str, args)], cwd=REPO,
                           env=cli_env(ray_tmp, **env), capture_output=True, text=True, timeout=120)
        p.ray_started = (ray_tmp / "ray").exists()  # type: ignore[attr-defined]
        return p
    finally:
        cleanup_ray_tmp(ray_tmp)


def test_resume_refuses_another_space_file_or_an_edited_copy(tmp_path):
    """The space file given to --resume, and the experiment's own copy, must be the text it started with."""
    storage = tmp_path / "s"
    opts = {"smoke": True, "seed": 0, "num_samples": 3, "budget": None, "refit": False, "lr_bounds": None,
            "wd_prior": None}
    exp = _fake_experiment(storage, "e", SMOKE_SPACE, opts)
    other = tmp_path / "other.yaml"
    other.write_text(SMOKE_SPACE.replace("epochs: 12", "epochs: 20"))
    p = _cli([other, "--resume", "--name", "e", "--storage-path", storage, "--stage", "plan"], tmp_path)
    assert p.returncode == 2 and str(other) in p.stderr and "differs from the space file" in p.stderr, p.stderr
    p = _cli(["--resume", "--name", "e", "--storage-path", storage, "--stage", "plan"], tmp_path)
    assert p.returncode == 0, p.stderr  # the plan of the experiment as it started: the smoke budgets
    assert "3 trials" in p.stdout, p.stdout
    (exp / "space.yaml").write_text(SMOKE_SPACE + "# edited\n")
    p = _cli(["--resume", "--name", "e", "--storage-path", storage, "--stage", "plan"], tmp_path)
    assert p.returncode == 2 and "changed since the experiment started" in p.stderr, p.stderr
    assert not p.ray_started


def test_state_corruption_warning_prints_once(tmp_path):
    storage = tmp_path / "s"
    exp = _fake_experiment(storage, "e", SMOKE_SPACE, {})
    (exp / "state.json").write_text('{"done": ["ran')
    p = _cli(["--resume", "--name", "e", "--storage-path", storage, "--stage", "plan"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("is corrupted") == 1, p.stderr


# -- storage that cannot hold an experiment ---------------------------------------------------------

@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}): needs root and mount rights")
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)


def test_read_only_storage_is_refused_before_ray(tmp_path):
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        p = _cli(["--storage-path", ro / "results", "--smoke"], tmp_path)
    assert p.returncode == 2, p.stderr
    assert "--storage-path" in p.stderr and ("not writable" in p.stderr or "cannot create" in p.stderr), p.stderr
    assert "Traceback" not in p.stderr and not p.ray_started


# -- a full disk ---------------------------------------------------------------------------------

def _fill(path: Path, leave: int = 0) -> Path:
    ballast = path / "ballast"
    free = shutil.disk_usage(path).free
    with open(ballast, "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(0, free - leave))
    return ballast


@pytest.mark.ray
@pytest.mark.slow
def test_full_disk_is_a_pause_and_resume_completes(tmp_path, ray_tmp):
    """The storage path is a 10 MB tmpfs; once a search trial has a checkpoint it is filled to the last byte.
    The run stops as on an interrupt: exit 28, one line naming the path and the space needed, no traceback.
    Resumed while still full: refused before stage 2 starts (exit 28, the free-space check). Space freed:
    the printed resume command finishes the experiment, stage 1 not redone, every search trial once."""
    space = tmp_path / "space.yaml"
    space.write_text(DISK_SPACE)
    env = cli_env(ray_tmp, **fault_env("search:delay=1.5"))
    with _tmpfs(tmp_path / "disk", "10m") as disk:
        exp = disk / "full"
        cli = Cli([space, "--storage-path", disk, "--name", "full", "--lr-bounds", "0.25", "1.0"], env=env,
                  log_dir=tmp_path, tag="run")
        try:
            cli.wait_until("a search checkpoint", lambda: list((exp / "ray" / "search").glob("*/checkpoint_*")),
                           timeout=400)
            ballast = _fill(disk)
            rc = cli.wait(300)
        finally:
            cli.kill()
        err = cli.stderr
        assert rc == 28, err[-3000:]
        lines = [ln for ln in err.splitlines() if "no space left on device" in ln]
        assert len(lines) == 1 and str(exp) in lines[0] and "needs about" in lines[0], err[-3000:]
        assert "stage 2 (search)" in lines[0], lines
        _no_traceback(err)
        assert json.loads((exp / "state.json").read_text())["done"] == ["range"]
        bounds_mtime = (exp / "range_test" / "bounds.json").stat().st_mtime_ns
        resume = _resume_command(err)

        # 300 KB freed: room for the lock and state.json, not for stage 2 (~3 MB of checkpoints)
        os.truncate(ballast, ballast.stat().st_size - 300 * 1024)
        still_full = run_cli(resume, env=env, log_dir=tmp_path, tag="full", timeout=300)
        assert still_full.proc.returncode == 28, still_full.stderr[-3000:]
        line = [ln for ln in still_full.stderr.splitlines() if "no space left on device" in ln]
        assert len(line) == 1 and "needs about" in line[0] and "stage 2 (search)" in line[0], still_full.stderr
        assert "[search] 0/" not in still_full.stderr, "stage 2 started on a full disk"
        _no_traceback(still_full.stderr)

        ballast.unlink()
        done = run_cli(resume, env=env, log_dir=tmp_path, tag="resume", timeout=600)
        assert done.proc.returncode == 0, done.stderr[-3000:]
        state = json.loads((exp / "state.json").read_text())
        assert state["done"] == ["range", "search", "final"], state
        assert (exp / "range_test" / "bounds.json").stat().st_mtime_ns == bounds_mtime, "stage 1 was redone"
        summary = pd.read_csv(exp / "summary.csv")
        assert len(summary) == 3 and summary["trial_id"].is_unique, summary
        assert (summary["status"] == "completed").all(), summary
        assert json.loads((exp / "best.json").read_text())["final"]["runs"]


# -- a task that fails ----------------------------------------------------------------------------

WORKER_ONLY_LOADER = '''
import sys

import torch
from sklearn.datasets import load_digits


def load(task):
    """Loads in the driver, fails in every Ray worker (data only the driver's machine can see)."""
    if "default_worker" in sys.argv[0]:
        raise FileNotFoundError("/data/cells.npz: only on the driver's machine")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:1400], y[:1400], x[1400:], y[1400:], 10, False
'''


@pytest.mark.ray
@pytest.mark.slow
def test_failure_seen_only_in_workers_stops_the_stage_at_the_first(tmp_path, ray_tmp):
    """A dataset that loads in the driver but not in the workers: the stage stops at its first failure (exit 3,
    the user's exception in the message), without retrying it or running the other range tests to failure."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "sct_worker_only.py").write_text(WORKER_ONLY_LOADER)
    space = tmp_path / "space.yaml"
    space.write_text(DISK_SPACE.replace("dataset: digits", "dataset: sct_worker_only:load")
                     .replace("repeats: 3", "repeats: 6"))
    env = cli_env(ray_tmp, PYTHONPATH=os.pathsep.join(filter(None, [str(pkg), os.environ.get("PYTHONPATH")])))
    res = run_cli([space, "--storage-path", tmp_path / "s", "--name", "w"], env=env, log_dir=tmp_path, tag="w",
                  timeout=400)
    err = res.stderr
    assert res.proc.returncode == 3, err[-3000:]
    assert "could not set up in its worker" in err and "/data/cells.npz: only on the driver's machine" in err, err
    trials = tune_trials(tmp_path / "s" / "w" / "ray" / "range")
    assert sum(v["num_failures"] for v in trials.values()) <= 2, trials  # max_concurrent: 2 ran at once
    assert sum(v["status"] == "TERMINATED" for v in trials.values()) == 0, trials


# -- TensorBoard notes ------------------------------------------------------------------------------

def test_orphaned_trial_records_get_a_note_and_an_ended_session(tmp_path):
    """A trial Tune never recorded (the driver was killed just after starting it) leaves a TensorBoard run and
    a trial folder that no result refers to: both get a note, and the run's session ends as aborted."""
    from sctune.present import tensorboard as tb
    from sctune.service.tune_state import ORPHAN_NOTE, note_orphans

    tb_dir, stage_dir = tmp_path / "tensorboard", tmp_path / "ray" / "search"
    for trial in ("aaaa0001", "bbbb0002"):
        logger = tb.TrialLogger(tb_dir, tb.run_name("search", trial=trial), hparams={"x": 1.0})
        logger.scalars({"val/acc": 0.5}, 1)
        logger.close()  # no session end: killed while running
        (stage_dir / f"train_trial_{trial}_1_x=1_2026-01-01").mkdir(parents=True)
    assert note_orphans(stage_dir, tb_dir, "search", {"aaaa0001"}) == ["bbbb0002"]
    assert (tb_dir / "search" / "bbbb0002" / ORPHAN_NOTE).exists()
    assert (stage_dir / "train_trial_bbbb0002_1_x=1_2026-01-01" / ORPHAN_NOTE).exists()
    assert not (tb_dir / "search" / "aaaa0001" / ORPHAN_NOTE).exists()
    assert tb_session_status(tb_dir / "search" / "bbbb0002") == "STATUS_UNKNOWN"  # aborted (as pruned trials)
    assert note_orphans(stage_dir, tb_dir, "search", {"aaaa0001"}) == []  # noted once


def test_restore_options_rules(tmp_path):
    """What --resume restores and what it refuses, rule by rule (the CLI cases above run it for real)."""
    from sctune.core.config import ConfigError
    from sctune.service.experiment import Options
    from sctune.service.safeguards import restore_options

    kept = {"options": {"smoke": True, "seed": 3, "num_samples": 4, "budget": 2.5, "refit": True,
                        "lr_bounds": None, "wd_prior": None}}
    o = restore_options(Options(name="e", resume=True), kept, tmp_path / "e")
    assert (o.smoke, o.seed, o.num_samples, o.budget, o.refit) == (True, 3, 4, 2.5, True)
    # the same values given again are no conflict; bounds may be added to an experiment that had none
    same = restore_options(Options(resume=True, smoke=True, seed=3, budget=2.5, lr_bounds=(0.1, 1.0)), kept,
                           tmp_path / "e")
    assert same.lr_bounds == (0.1, 1.0)
    for change in ({"seed": 4}, {"budget": 3.0}, {"refit": False}, {"num_samples": 5}):
        with pytest.raises(ConfigError) as err:
            restore_options(Options(resume=True, **change), kept, tmp_path / "e")
        assert err.value.path.startswith("--" + next(iter(change)).replace("_", "-")), err.value
    # an experiment started before options were recorded: smoke and budget, as it kept them
    old = restore_options(Options(resume=True), {"smoke": True, "budget": None}, tmp_path / "e")
    assert old.smoke is True and old.seed is None
    with pytest.raises(ConfigError):
        restore_options(Options(resume=True, lr_bounds=(0.2, 1.0)),
                        {"options": {"lr_bounds": [0.1, 1.0]}}, tmp_path / "e")


def test_backup_keeps_every_tune_state_file_and_restores_a_truncated_one(tmp_path):
    """Tune's stage state is JSON (experiment state) and pickles, two of them named ``*.json``
    (``search_gen_state-*.json``, ``basic-variant-state-*.json``). Each whole file gets a backup copy; one cut
    short by a full disk (here: emptied) is put back from it, and the stage reads as restorable again."""
    import ray.cloudpickle as cloudpickle

    from sctune.service.tune_state import BACKUP_DIR, backup_state, check_restorable

    stage = tmp_path / "search"
    stage.mkdir()
    session = "2026-12-06_04-29-55"
    files = {
        f"experiment_state-{session}.json": json.dumps({"trial_data": []}).encode(),
        f"search_gen_state-{session}.json": cloudpickle.dumps({"counter": 3, "finished": False}),
        f"searcher-state-{session}.pkl": cloudpickle.dumps({"points": [1, 2]}),
    }
    for name, data in files.items():
        (stage / name).write_bytes(data)
    backup_state(stage, {})
    assert sorted(p.name for p in (stage / BACKUP_DIR).iterdir()) == sorted(files)

    (stage / f"search_gen_state-{session}.json").write_bytes(b"")
    assert check_restorable(stage) is True
    assert (stage / f"search_gen_state-{session}.json").read_bytes() == files[f"search_gen_state-{session}.json"]
