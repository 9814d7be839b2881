"""Interrupts, concurrent runs and process cleanup, done for real (issue #14).

Ctrl-C (SIGINT) and SIGTERM are sent to the driver's whole process group, as a terminal and a job scheduler
do; a second run of the same experiment is a second real CLI; a damaged checkpoint is random bytes written
over a trial's newest state file; the driver is SIGKILLed alone, so that only sctune's own watchdog can end
the Ray it started. Each experiment then resumes and finishes, every trial accounted for once.
Every Ray started here lives under a private RAY_TMPDIR; only processes of the test's own runs are killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
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
    pids_mentioning,
    run_cli,
    short_tmpdir,
    tb_event_files,
    tb_steps,
    tune_trials,
)

TRAIN_LOSS = "train/loss"

SPACE = """task: {dataset: digits, model: digits_cnn}
fixed: {epochs: 5, batch_size: 64}
range_test: {num_iter: 20, eval_every: 2, weight_decays: [0.0], repeats: 3}
search: {num_samples: 3, max_concurrent: 2, scheduler: none, seed: 0}
final: {seeds: 1}
space:
  max_lr: {type: float, low: 0.25, high: 1.0, log: true, scale: max_lr_bound}
  div_factor: {type: float, low: 3.0, high: 20.0, log: true}
"""


def _setup(tmp_path: Path, name: str) -> tuple[list, Path]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    storage = tmp_path / "s"
    return [space, "--storage-path", storage, "--name", name, "--lr-bounds", "0.25", "1.0"], storage / name


def _marker_of(ray_tmp: Path) -> str | None:
    """The per-run marker sctune put in the environment of the Ray it started (read from its GCS)."""
    for pid in pids_mentioning(str(ray_tmp)):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"SCTUNE_RUN_MARKER="):
                return item.split(b"=", 1)[1].decode()
    return None


def _marked(marker: str) -> list[int]:
    from sctune.service.lifecycle import marked_pids, pid_alive

    return [p for p in marked_pids(marker) if pid_alive(p)]


def _wait_gone(ray_tmp: Path, marker: str | None, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = pids_mentioning(str(ray_tmp)) + (_marked(marker) if marker else [])
        if not left:
            return []
        time.sleep(0.2)
    return left


def _interrupt(cli: Cli, sig: int, timeout: float = 120) -> int:
    os.killpg(cli.proc.pid, sig)  # the whole process group, as a terminal's Ctrl-C or a scheduler's SIGTERM
    return cli.wait(timeout)


def _no_crash(err: str) -> None:
    assert "Traceback" not in err and "Aborted" not in err and "*** SIGTERM received" not in err, err[-3000:]


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_in_search_is_a_pause_one_run_per_experiment_damaged_checkpoint_named(tmp_path, ray_tmp):
    """Ctrl-C to the driver's group in stage 2, once a trial finished and another is past its second
    checkpoint: exit 130 with a resume line, the search not recorded as done, nothing counted as pruned.
    Meanwhile a second run and a --resume of the same experiment are refused (exit 2, naming the holder)
    without starting Ray. The interrupted trial's newest checkpoint is then overwritten with random bytes:
    --resume names the trial and the file, the trial continues from its previous checkpoint, and the
    experiment finishes with each trial once."""
    common, exp = _setup(tmp_path, "pause")
    env = cli_env(ray_tmp, **fault_env("search:delay=1"))
    cli = Cli(common, env=env, log_dir=tmp_path, tag="run")
    try:
        cli.wait_until("the search to run", lambda: tune_trials(exp / "ray" / "search"), timeout=300)
        marker = _marker_of(ray_tmp)
        assert marker and _marked(marker), "no process carries the run's marker"

        # two more runs of the same experiment while it runs: refused, naming the holder, no Ray started
        other_tmp = short_tmpdir("sctint2")
        try:
            for tag, extra in (("second", []), ("resume2", ["--resume"])):
                other = run_cli([*common, *extra], env=cli_env(other_tmp), log_dir=tmp_path, tag=tag, timeout=120)
                assert other.proc.returncode == 2, (tag, other.stderr[-2000:])
                assert f"in use by process {cli.proc.pid} on host {socket.gethostname()}" in other.stderr, other.stderr
                assert "Traceback" not in other.stderr and not (other_tmp / "ray").exists(), other.stderr
        finally:
            cleanup_ray_tmp(other_tmp)
        assert cli.proc.poll() is None, "the refused runs disturbed the running one"

        def mid_search():  # a trial finished, another is past its second checkpoint with epochs to go
            trials = tune_trials(exp / "ray" / "search")
            done = [t for t, v in trials.items() if v["status"] == "TERMINATED"]
            running = [t for t, v in trials.items() if v["status"] == "RUNNING" and 2 <= v["epoch"] <= 3]
            return done if done and running else None

        done = cli.wait_until("a finished and a running search trial", mid_search, timeout=300)
        rc = _interrupt(cli, signal.SIGINT)
    finally:
        cli.kill()
    err = cli.stderr
    assert rc == 130, err[-3000:]
    _no_crash(err)
    (line,) = [ln for ln in err.splitlines() if "interrupted in stage 2 (search) after" in ln]
    assert f"Resume with: python -m sctune.search --resume --name pause --storage-path {exp.parent}" in line, line
    assert _wait_gone(ray_tmp, marker) == [], "Ray processes outlived the interrupted driver"
    state = json.loads((exp / "state.json").read_text())
    assert state["done"] == ["range"], state  # the interrupted stage is not done
    assert not (exp / "summary.csv").exists() and not (exp / "best.json").exists()
    trials = tune_trials(exp / "ray" / "search")
    unfinished = {t: v for t, v in trials.items() if v["status"] != "TERMINATED"}
    assert unfinished, f"Tune recorded every trial as finished: {trials}"
    tid, at = next((t, v) for t, v in unfinished.items() if v["epoch"] >= 2)
    steps_done = {t: tb_steps(exp / "tensorboard" / "search" / t, TRAIN_LOSS) for t in done}

    # a damaged checkpoint: random bytes in the interrupted trial's newest state file, the one Tune's saved
    # state names (what --resume restores from; Tune may save once more as the driver stops, so it is read
    # from the state, not guessed from the epoch)
    (trial_dir,) = (exp / "ray" / "search").glob(f"*_{tid}_*")
    assert at["checkpoint"], at
    damaged = trial_dir / at["checkpoint"] / "state.pt"
    older = [c for c in trial_dir.glob("checkpoint_*") if c.name < at["checkpoint"] and (c / "state.pt").is_file()]
    assert damaged.is_file() and older, (damaged, older)
    damaged.write_bytes(os.urandom(4096))

    res = run_cli([*common, "--resume"], env=env, log_dir=tmp_path, tag="resume", timeout=400)
    err = res.stderr
    assert res.proc.returncode == 0, err[-3000:]
    _no_crash(err)
    assert f"trial {tid}: its latest checkpoint {damaged} cannot be read" in err, err[-3000:]
    assert f"[search] trial {tid}: damaged checkpoint:" in err and "1 resumed from an older checkpoint" in err, err
    summary = pd.read_csv(exp / "summary.csv")
    final_trials = tune_trials(exp / "ray" / "search")
    assert summary["trial_id"].is_unique and set(summary["trial_id"]) == set(final_trials), (summary, final_trials)
    assert len(summary) == 3 and (summary["status"] == "completed").all(), summary  # none pruned
    assert all(v["num_failures"] == 0 for v in final_trials.values()), final_trials
    for t, steps in steps_done.items():  # finished trials did not run again
        assert tb_steps(exp / "tensorboard" / "search" / t, TRAIN_LOSS) == steps, t
    steps = tb_steps(exp / "tensorboard" / "search" / tid, TRAIN_LOSS)
    # resumed from another checkpoint of its own (the one before, or one written after Tune's last record), not
    # from scratch (epoch 1 ran once), and completed
    m = re.search(rf"damaged checkpoint: {re.escape(str(damaged))} unreadable \(\w+\); resumed from "
                  r"(checkpoint_\d{6}) \(epoch (\d+)\)", err)
    assert m and m.group(1) != at["checkpoint"] and int(m.group(2)) >= 2, err[-3000:]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5] and steps.count(1) == 1, steps
    assert json.loads((exp / "state.json").read_text())["done"] == ["range", "search", "final"]
    assert (exp / "best.json").is_file() and not (exp / ".sctune.lock").read_text()


def _range_runs(exp: Path, trials: dict) -> dict[str, list[str]]:
    """TensorBoard event files of the given range-test trials, by trial id."""
    from sctune.present import tensorboard as tb

    return {t: [f.name for f in tb_event_files(exp / "tensorboard" / tb.run_name(
        "range", wd=float(v["config"]["weight_decay"]), seed=int(v["config"]["seed"])))] for t, v in trials.items()}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("twice", [False, True], ids=["sigterm", "sigterm_then_ctrl_c"])
def test_sigterm_in_range_stage_is_a_pause(tmp_path, ray_tmp, twice):
    """SIGTERM to the driver's group during the range tests: exit 143 with a resume line (no native abort,
    no traceback), no bounds computed from the finished ones, stage 1 not done; --resume runs only the
    unfinished range tests and every range test is counted once. A second signal (Ctrl-C) stops at once,
    without waiting for the running range tests, and leaves the same state (not resumed again here)."""
    common, exp = _setup(tmp_path, "term")
    common += ["--stage", "range"]
    env = cli_env(ray_tmp, **fault_env("range:delay=4"))
    cli = Cli(common, env=env, log_dir=tmp_path, tag="run")
    try:
        def mid_range():
            trials = tune_trials(exp / "ray" / "range")
            states = [v["status"] for v in trials.values()]
            return "TERMINATED" in states and "RUNNING" in states

        cli.wait_until("a finished and a running range test", mid_range, timeout=300)
        if twice:
            os.killpg(cli.proc.pid, signal.SIGTERM)
            cli.wait_until("the first signal to be taken", lambda: "SIGTERM received: stopping" in cli.stderr,
                           timeout=30, interval=0.05)
            rc = _interrupt(cli, signal.SIGINT, timeout=60)
        else:
            rc = _interrupt(cli, signal.SIGTERM)
    finally:
        cli.kill()
    err = cli.stderr
    assert rc == 143, err[-3000:]
    _no_crash(err)
    assert "SIGTERM: interrupted in stage 1 (range) after 1/3 range tests" in err or \
        "SIGTERM: interrupted in stage 1 (range) after 2/3 range tests" in err, err[-3000:]
    assert "--resume --name term" in err
    assert not (exp / "range_test" / "bounds.json").exists(), "bounds computed from an interrupted stage"
    assert json.loads((exp / "state.json").read_text())["done"] == []
    finished = {t: v for t, v in tune_trials(exp / "ray" / "range").items() if v["status"] == "TERMINATED"}
    assert 1 <= len(finished) < 3, finished
    if twice:
        return  # the state the second signal leaves is the one the first leaves, resumed just below
    runs_before = _range_runs(exp, finished)

    res = run_cli([*common, "--resume"], env=env, log_dir=tmp_path, tag="resume", timeout=400)
    assert res.proc.returncode == 0, res.stderr[-3000:]
    trials = tune_trials(exp / "ray" / "range")
    assert len(trials) == 3 and all(v["status"] == "TERMINATED" for v in trials.values()), trials
    bounds = json.loads((exp / "range_test" / "bounds.json").read_text())
    assert len(bounds["trials"]) == 3 and len({(t["weight_decay"], t["seed"]) for t in bounds["trials"]}) == 3
    assert _range_runs(exp, finished) == runs_before, "a finished range test ran again"
    assert json.loads((exp / "state.json").read_text())["done"] == ["range"]


@pytest.mark.ray
@pytest.mark.slow
def test_driver_sigkill_leaves_no_ray_process_and_its_lock_is_taken_over(tmp_path, ray_tmp):
    """SIGKILL of the driver alone (not its group): the watchdog ends every process of the Ray it started
    (found by the run's marker in their environment, trial workers and agents included). The dead driver's
    lock is detected as stale (its pid is gone) and --resume takes it over and finishes the stage."""
    common, exp = _setup(tmp_path, "k9")
    common += ["--stage", "range", "--dashboard"]  # the dashboard starts Ray's agents too
    env = cli_env(ray_tmp, **fault_env("range:delay=4"))
    cli = Cli(common, env=env, log_dir=tmp_path, tag="run")
    try:
        cli.wait_until("running range tests", lambda: any(
            v["status"] == "RUNNING" for v in tune_trials(exp / "ray" / "range").values()), timeout=300)
        marker = _marker_of(ray_tmp)
        assert marker, "the Ray sctune started carries no marker"
        workers = [p for p in _marked(marker) if "ray::" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        assert workers, "no trial worker found"
        os.kill(cli.proc.pid, signal.SIGKILL)
        cli.proc.wait(timeout=30)
        left = _wait_gone(ray_tmp, marker, timeout=30)
    finally:
        cli.kill()
    assert left == [], f"Ray processes outlived the killed driver by 30 s: {left}"
    owner = json.loads((exp / ".sctune.lock").read_text())
    assert owner["pid"] == cli.proc.pid  # the killed driver could not release it

    res = run_cli([*common, "--resume"], env=cli_env(ray_tmp, **fault_env("range:delay=1")),
                  log_dir=tmp_path, tag="resume", timeout=400)
    assert res.proc.returncode == 0, res.stderr[-3000:]
    assert f"taking over the lock of {exp} left by process {cli.proc.pid}" in res.stderr, res.stderr[-3000:]
    trials = tune_trials(exp / "ray" / "range")
    assert len(trials) == 3 and all(v["status"] == "TERMINATED" for v in trials.values()), trials
    assert len(json.loads((exp / "range_test" / "bounds.json").read_text())["trials"]) == 3


# -- the lock on its own (no Ray) ---------------------------------------------------------------------

HOLD = """import sys, time
from pathlib import Path
from sctune.service.lifecycle import ExperimentLock
ExperimentLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_refuses_a_live_holder_and_takes_over_stale_records(tmp_path):
    from sctune.service.lifecycle import LOCK_NAME, ExperimentLock, LockedError, holder, start_ticks

    exp = tmp_path / "exp"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(exp)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"in use by process {proc.pid} on host {socket.gethostname()}"):
            ExperimentLock(exp).acquire()
        assert str(proc.pid) in holder(exp)
    finally:
        proc.kill()
        proc.wait()
    # the holder died without releasing: its record names a pid that is gone -> stale, taken over
    assert json.loads((exp / LOCK_NAME).read_text())["pid"] == proc.pid
    assert holder(exp) is None
    with ExperimentLock(exp):
        assert json.loads((exp / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (exp / LOCK_NAME).read_text() == ""  # released: record cleared

    # without an flock (a filesystem that has none), the record decides: a live process on this host holds it,
    # unless its pid now belongs to another process (start time differs), or the record is another host's
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"pid": live.pid, "host": socket.gethostname(), "ticks": start_ticks(live.pid), "started": 0,
                  "command": "sleeper"}
        (exp / LOCK_NAME).write_text(json.dumps(record))
        assert str(live.pid) in holder(exp)
        with pytest.raises(LockedError, match=f"in use by process {live.pid}"):
            ExperimentLock(exp).acquire()
        (exp / LOCK_NAME).write_text(json.dumps(record | {"ticks": "1"}))  # a recycled pid
        assert holder(exp) is None
        ExperimentLock(exp).acquire().release()
        (exp / LOCK_NAME).write_text(json.dumps(record | {"host": "elsewhere"}))
        assert holder(exp) is None
        ExperimentLock(exp).acquire().release()
    finally:
        live.kill()
        live.wait()


def test_lock_of_a_refused_fresh_run_leaves_nothing_behind(tmp_path):
    from sctune.service.lifecycle import ExperimentLock

    exp = tmp_path / "fresh"
    ExperimentLock(exp).acquire().release()
    assert not exp.exists()


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
    (["--wd-prior", "-0.1"], "--wd-prior: must be >= 0, got -0.1"),
    (["--lr-bounds", "1", "0.1"], "--lr-bounds: need 0 < MIN_LR < MAX_LR"),
])
def test_option_rules_refused_before_torch_or_ray_load(tmp_path, args, message):
    """Options are refused by their own rules before the space file is read (which imports torch to check
    dataset and model names): as fast as any other bad input."""
    code = ("import sys; from sctune.search import main; "
            f"rc = main({args!r} + ['--storage-path', {str(tmp_path / 's')!r}]); "
            "print(rc, 'torch' in sys.modules, 'ray' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["2", "False", "False"], (p.stdout, p.stderr)
    assert message in p.stderr
    assert not (tmp_path / "s").exists()


def test_space_loader_is_a_safe_loader_that_refuses_duplicate_keys_at_any_level():
    import yaml

    from sctune.service.space import DuplicateKeyError, StrictSafeLoader, safe_load_strict

    assert issubclass(StrictSafeLoader, yaml.SafeLoader)
    with pytest.raises(yaml.YAMLError):  # still plain YAML only: Python tags refused
        safe_load_strict("a: !!python/object/apply:os.system ['true']\n")
    cases = {"a: 1\na: 2\n": "a", "a: {b: 1, b: 2}\n": "a.b", "a:\n  - {c: 1}\n  - {c: 1, c: 2}\n": "a[1].c",
             "a: &x {b: 1}\nd:\n  <<: *x\n  e: 2\n  e: 3\n": "d.e"}
    for text, path in cases.items():
        with pytest.raises(DuplicateKeyError) as e:
            safe_load_strict(text)
        assert e.value.path == path, text
    # merge keys and equal keys in different mappings are fine
    assert safe_load_strict("a: &x {b: 1}\nd:\n  <<: *x\n  b: 2\n") == {"a": {"b": 1}, "d": {"b": 2}}
