"""The README's "Your own data and models" project, written out of the README as it stands, and checks of a
finished smoke experiment on it (shared by test_user_task.py and test_job_submit.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
from fault_util import cleanup_ray_tmp, cli_env, short_tmpdir

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def readme_file(name: str) -> str:
    """The README code block whose first line is ``# NAME...``: a file of the walk-through."""
    for _lang, body in re.findall(r"```(python|yaml)\n(.*?)```", README, flags=re.S):
        if re.match(rf"# {re.escape(name)}\b", body):
            return body
    raise AssertionError(f"README.md has no ```python/yaml block starting with '# {name}'")


def write_project(root: Path) -> Path:
    """my_project/ as the README shows it: the user's module and the space file naming it."""
    project = root / "my_project"
    project.mkdir()
    (project / "my_task.py").write_text(readme_file("my_task.py"))
    (project / "space.yaml").write_text(readme_file("space.yaml"))
    return project


def smoke_spec(project: Path):
    """The budgets of space.yaml's smoke run (its task is resolved by the runs under test, not here: the
    user's module is importable in the project folder, not in the test process)."""
    import yaml

    from sctune.service.space import parse_space

    raw = yaml.safe_load((project / "space.yaml").read_text())
    return parse_space(raw | {"task": {"dataset": "digits", "model": "digits_cnn"}}, smoke=True)


def run_in(project: Path, args: list[str], *, timeout: float = 420, **env: str) -> subprocess.CompletedProcess:
    """A process in the project folder, as a user starts it; its own RAY_TMPDIR, cleaned up after.
    PYTHONPATH names this checkout, so the sctune under test is the one imported (as an install would be)."""
    ray_tmp = short_tmpdir("sctu")
    e = cli_env(ray_tmp, **env)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    try:
        return subprocess.run([sys.executable, *args], cwd=project, env=e, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        cleanup_ray_tmp(ray_tmp)


def check_three_stages(exp: Path, spec, *, dataset: str, model: str) -> None:
    """Stage outputs of a finished smoke experiment, by content."""
    bounds = json.loads((exp / "range_test" / "bounds.json").read_text())
    rt = spec.range_test
    assert bounds["status"] == "ok", bounds
    assert len(bounds["trials"]) == len(rt.weight_decays) * rt.repeats
    assert all("error" not in t for t in bounds["trials"]), bounds["trials"]
    assert 0 < bounds["chosen"]["min_lr_bound"] < bounds["chosen"]["max_lr_bound"] <= rt.end_lr
    summary = pd.read_csv(exp / "summary.csv")
    # stage 2 spends search.num_samples full trainings' worth as complete schedules (halving)
    assert summary["epochs_run"].sum() <= spec.search.num_samples * spec.base.epochs
    assert (summary["epochs"] == spec.base.epochs).any()
    assert summary["status"].isin(["completed", "pruned"]).all(), summary
    assert summary["error"].isna().all(), summary["error"]
    best = json.loads((exp / "best.json").read_text())
    assert best["config"]["dataset"] == dataset and best["config"]["model"] == model
    final = best["final"]
    assert final["n"] == spec.final.seeds == len(final["runs"])
    assert all(r["error"] is None for r in final["runs"])
    assert 0.8 < final["test_acc_mean"] <= 1.0  # breast cancer, 2 classes: far above the 0.63 majority class
    tb = exp / "tensorboard"
    runs = {p.parent.relative_to(tb).as_posix() for p in tb.rglob("events.out.tfevents.*")}
    assert sum(r.startswith("range/") for r in runs) == len(rt.weight_decays) * rt.repeats, runs
    assert sum(r.startswith("search/") for r in runs) == len(summary), runs
    assert sum(r.startswith("final/") for r in runs) == spec.final.seeds, runs
    assert json.loads((exp / "state.json").read_text())["done"] == ["range", "search", "final"]


def check_clean_output(stderr: str, *, users_ray: bool = False) -> None:
    """No tracebacks and no Tune complaints about result files sctune turns off. ``users_ray``: a Ray the user
    started with its defaults (log_to_driver) relays its workers' own logs, e.g. a worker's SIGTERM traceback
    when Tune stops an actor between stages; those are the user's choice, not sctune's output."""
    if not users_ray:
        assert "Traceback" not in stderr, stderr[-4000:]
    assert " failed: " not in stderr and "RayTaskError" not in stderr, stderr[-4000:]
    assert "Failed to fetch metrics" not in stderr and "Could not fetch metrics" not in stderr, stderr[-4000:]
    assert "unknown dataset" not in stderr, stderr[-4000:]


# The plain baseline a new user compares with: Adam at its default lr 1e-3, constant, no weight decay, the same
# network, epochs, batch size and train/validation/test split (the space file's `fixed:` and task), trained by
# sctune.core.train.fit so evaluation is the same as the final fit's. AdamW with weight_decay 0 and betas
# (0.9, 0.999) (make_optimizer: the baseline momentum 0.9) is torch.optim.Adam step for step.
ADAM = """
import json, sys
import yaml
from sctune.service.space import parse_space
from sctune.core.train import fit

spec = parse_space(yaml.safe_load(open("space.yaml")), "space.yaml", smoke="--smoke" in sys.argv)
accs = []
for seed in json.loads(sys.argv[1]):
    cfg = spec.base.with_flat(optimizer="adamw", schedule="constant", lr=1e-3, momentum=0.9, weight_decay=0.0,
                              dropout=0.0, seed=seed)
    accs.append(fit(cfg, test_at_end=True).final["test/acc"])
print(json.dumps({"epochs": spec.base.epochs, "test_acc": accs}))
"""


def adam_baseline(project: Path, seeds: list[int], *, smoke: bool = False) -> dict:
    """Adam lr 1e-3 on the README project (run in its folder, as the user's module is imported there): per
    seed the test accuracy, and the epochs it trained."""
    p = run_in(project, ["-c", ADAM, json.dumps(seeds), *(["--smoke"] if smoke else [])])
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
