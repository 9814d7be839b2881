"""`ray job submit` of a smoke search to a real head node, the way docs/cluster.md runs it on AWS.

A head is started with `ray start --head` on 127.0.0.1 (dashboard/Jobs API on a free port, its own
temp dir, token auth with the token in RAY_AUTH_TOKEN), the working tree is uploaded with
`--working-dir`, and `python -m sctune.search --smoke` runs as the job's driver on the head. The
test polls `ray job status` with a deadline, checks every output file, and stops the head it
started (only that head: see tests/ray_util.py).

Needs the Jobs API, i.e. `ray[default]` (the dev extra installs it).
"""

from __future__ import annotations

import json
import re
import sys
import time

import pandas as pd
import pytest
from ray_util import ROOT, ray_head

from sctune.service.space import load_space

pytestmark = [pytest.mark.slow, pytest.mark.ray]

pytest.importorskip("aiohttp", reason="`ray job submit` needs the Jobs API: pip install 'ray[default]'")

SPACE = "search_spaces/digits.yaml"
# The working-dir upload: the tree without environments, caches and results. Ray also skips
# .gitignore'd paths; listing them keeps the upload small even where .gitignore is absent.
# what a job from this repository's root does not need: the venv and git, results, caches, and the benchmarks'
# committed results (3.7 MB of raw trials in search_efficiency.json alone)
EXCLUDES = [".venv", ".git", "sctune_results", "*.egg-info", "**/__pycache__", ".pytest_cache", ".ruff_cache",
            "build", "dist", "benchmarks/results"]
MAX_UPLOAD_MIB = 5.0
JOB_TIMEOUT_S = 420  # the smoke search takes ~1 min here; a loaded CI box gets headroom
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def head():
    """One head for the module's jobs (they run one after another): started once, stopped after the last."""
    with ray_head(num_cpus=2) as h:
        yield h


def _status(head, job_id: str) -> str:
    out = head.ray_cli("job", "status", "--address", head.dashboard_url, job_id)
    text = out.stdout + out.stderr
    # Ray 2.60 prints "Status for job 'ID': RUNNING" while it runs, and "Job 'ID' succeeded" (failed,
    # stopped) once it has ended.
    m = re.search(r"Status for job '[^']+': (\w+)", text) or re.search(r"Job '[^']+' (succeeded|failed|stopped)",
                                                                         text)
    if m:
        return m.group(1).upper()
    if out.returncode != 0:
        raise AssertionError(f"`ray job status` failed:\n{out.stdout}\n{out.stderr}")
    return "UNKNOWN"


def _logs(head, job_id: str) -> str:
    out = head.ray_cli("job", "logs", "--address", head.dashboard_url, job_id)
    return (out.stdout + out.stderr)[-6000:]


def _wait(head, job_id: str) -> tuple[str, str]:
    """Poll the job until it ends or JOB_TIMEOUT_S passes (then stop it): its last status and driver log."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = _status(head, job_id)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(3)
        status = _status(head, job_id)
    logs = _logs(head, job_id)
    if status not in TERMINAL:
        head.ray_cli("job", "stop", "--address", head.dashboard_url, job_id)
    return status, logs


def _head_node_ids(head) -> set[str]:
    out = head.ray_cli("list", "nodes", "--address", head.dashboard_url, "--format", "json", "--detail")
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout[out.stdout.index("["):])
    return {n["node_id"] for n in nodes if n.get("state") == "ALIVE"}


def test_job_submit_smoke_search_on_local_head(tmp_path, head):
    spec = load_space(ROOT / SPACE, smoke=True)
    storage = (tmp_path / "results").resolve()
    job_id = f"sctune-test-{int(time.time())}"
    # Token auth is really on: a client without RAY_AUTH_MODE=token sends no token and is
    # refused (401), and a wrong token is refused (403).
    no_mode = head.ray_cli("job", "list", "--address", head.dashboard_url,
                           env={k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"})
    assert no_mode.returncode != 0 and "Unauthorized" in no_mode.stdout + no_mode.stderr
    wrong = head.ray_cli("job", "list", "--address", head.dashboard_url,
                         env=head.env | {"RAY_AUTH_TOKEN": "0" * 64})
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr

    # The entrypoint runs in a shell on the head with the head's environment: name the venv's
    # python explicitly (PATH there need not lead to it). Its cwd is the uploaded working dir,
    # so `-m sctune.search` imports the uploaded code, and trial workers get the same tree.
    entry = [sys.executable, "-m", "sctune.search", SPACE, "--smoke", "--storage-path", str(storage),
             "--name", "job"]
    sub = head.ray_cli("job", "submit", "--address", head.dashboard_url, "--submission-id", job_id,
                       "--no-wait", "--working-dir", str(ROOT),
                       "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", *entry, timeout=120)
    text = sub.stdout + sub.stderr
    assert sub.returncode == 0, text
    assert f"Job '{job_id}' submitted successfully" in text, text
    pkg = re.search(r"Uploading package gcs://(_ray_pkg_\w+)\.zip", text)
    assert pkg, text

    status, logs = _wait(head, job_id)
    assert status == "SUCCEEDED", f"job {job_id} ended {status} (limit {JOB_TIMEOUT_S}s); driver log tail:\n{logs}"
    # what the head unpacked from the upload: the working tree without the excluded folders
    (unpacked,) = {p.resolve() for p in (head.tmp / "ray").glob(  # session_latest links to session_<date>
        f"session_*/runtime_resources/working_dir_files/{pkg.group(1)}")}
    files = [p for p in unpacked.rglob("*") if p.is_file()]
    mib = sum(p.stat().st_size for p in files) / 2**20
    assert mib < MAX_UPLOAD_MIB, f"working-dir upload is {mib:.1f} MiB: excludes missed"
    top = {p.relative_to(unpacked).parts[0] for p in files}
    assert "sctune" in top and "search_spaces" in top and not top & {".venv", ".git"}, top
    head_nodes = _head_node_ids(head)
    assert not (head.tmp / "home" / ".ray" / "auth_token").exists()  # the token never touched a file

    assert len(head_nodes) == 1
    exp = storage / "job"
    # stage 1: every range test ran, on this head's node (the driver joined the cluster the job
    # runs on via RAY_ADDRESS, it did not start a Ray of its own)
    bounds = json.loads((exp / "range_test" / "bounds.json").read_text())
    assert bounds["status"] == "ok", bounds
    assert bounds["chosen"]["max_lr_bound"] > bounds["chosen"]["min_lr_bound"] > 0
    n_range = len(spec.range_test.weight_decays) * spec.range_test.repeats
    assert len(bounds["trials"]) == n_range
    assert {t.get("node_id") for t in bounds["trials"]} == head_nodes, bounds["trials"]
    # stage 2
    summary = pd.read_csv(exp / "summary.csv")
    # stage 2 spends search.num_samples full trainings' worth as complete schedules (halving)
    assert summary["epochs_run"].sum() <= spec.search.num_samples * spec.base.epochs, summary
    assert (summary["epochs"] == spec.base.epochs).any(), summary
    assert set(summary["node_id"]) == head_nodes
    assert summary["status"].isin(["completed", "pruned", "diverged"]).all(), summary
    # stage 3
    best = json.loads((exp / "best.json").read_text())
    final = best["final"]
    assert len(final["runs"]) == spec.final.seeds
    assert final["n"] >= 1 and final["test_acc_mean"] is not None and 0 < final["test_acc_mean"] <= 1
    assert best["value"] is not None and best["searched"]
    # TensorBoard: a run per range test, per search trial and per final seed
    tb = exp / "tensorboard"
    runs = {p.parent.relative_to(tb).as_posix() for p in tb.rglob("events.out.tfevents.*")}
    assert sum(r.startswith("range/") for r in runs) == n_range, runs
    assert sum(r.startswith("search/") for r in runs) == len(summary), runs
    assert sum(r.startswith("final/") for r in runs) == spec.final.seeds, runs
    for stage in ("range", "search", "final"):
        assert (exp / "ray" / stage).is_dir()
    assert (exp / "report.md").exists()
    assert "Recommended configuration" in logs, logs


def test_job_submit_of_a_user_project_runs_its_own_task(tmp_path, head):
    """The README's project folder (my_task.py + space.yaml naming my_task:breast_cancer, my_task:TabularNet)
    submitted as a user submits it to a cluster, `ray job submit --working-dir my_project`: the module travels
    with the working dir to the driver and to every trial worker, and the three stages run on it."""
    from user_task_util import check_three_stages, smoke_spec, write_project

    project = write_project(tmp_path)
    spec = smoke_spec(project)
    storage = (tmp_path / "results").resolve()
    job_id = f"sctune-user-{int(time.time())}"
    # the driver's cwd is the uploaded project folder: `space.yaml` and `import my_task` resolve there
    entry = [sys.executable, "-m", "sctune.search", "space.yaml", "--smoke", "--storage-path", str(storage),
             "--name", "job"]
    sub = head.ray_cli("job", "submit", "--address", head.dashboard_url, "--submission-id", job_id,
                       "--no-wait", "--working-dir", str(project), "--", *entry, timeout=120)
    text = sub.stdout + sub.stderr
    assert sub.returncode == 0 and f"Job '{job_id}' submitted successfully" in text, text
    status, logs = _wait(head, job_id)
    assert status == "SUCCEEDED", f"job {job_id} ended {status} (limit {JOB_TIMEOUT_S}s); driver log tail:\n{logs}"
    head_nodes = _head_node_ids(head)
    check_three_stages(storage / "job", spec, dataset="my_task:breast_cancer", model="my_task:TabularNet")
    assert set(pd.read_csv(storage / "job" / "summary.csv")["node_id"]) == head_nodes
    assert "Recommended configuration" in logs and "Traceback" not in logs, logs
