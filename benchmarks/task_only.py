"""Benchmark 9: a newcomer's path. A space file with only ``task:``, the README's command, against Adam at lr 1e-3.

Per task (``TASKS``: a space file naming only its dataset and model) and search seed S: ``python -m
sctune.search FILE --seed S`` from a fresh interpreter, as the README's walk-through runs it (every missing
section filled from the data, all three stages through Ray, the default budget of 8 FTE unless ``--budget``),
then the baseline a newcomer compares with: Adam at lr 1e-3, constant, no weight decay or dropout, the same
model and batch size, trained by ``sctune.core.train.fit`` on the data the final fit trained on (train +
validation where it refit: a user without sctune trains on all of their training data) for as many epochs, at
the final fit's own seeds. Reported per run: the final fit's test accuracies, the baseline's, stage 1's
measured FTE, the run's total FTE and wall time.

``python -m benchmarks.task_only [--quick]``; results in ``benchmarks/results/task_only.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, envelope, loadavg, log, out_dir, parser, stats, write_result

NAME = "task_only"
TASKS = {"wine": "benchmarks/spaces/wine.yaml", "digits400": "benchmarks/spaces/digits400.yaml",
         "breast_cancer": "benchmarks/spaces/breast_cancer_task.yaml"}


def adam_baseline(spec, final: dict[str, Any]) -> list[float | None]:
    """Adam at lr 1e-3 (constant, no weight decay or dropout, ``spec``'s model and batch) on the data the final
    fit ``final`` (best.json's) trained on, for as many epochs, at its seeds: per seed the test accuracy (None:
    diverged)."""
    from sctune.core.train import fit

    cfg = spec.base.with_flat(optimizer="adam", schedule="constant", lr=1e-3, momentum=0.9, weight_decay=0.0,
                              dropout=0.0, train_on_val=bool(final["refit"]), epochs=int(final["epochs"]))
    out = []
    for seed in final["seeds"]:
        res = fit(cfg.replace(seed=int(seed)), test_at_end=True)
        out.append(None if res.diverged else float(res.final["test/acc"]))
    return out


def run_one(task: str, seed: int, extra: list[str], root: Path) -> dict[str, Any]:
    from sctune.service.space import load_space

    space = REPO / TASKS[task]
    name = f"{task}_s{seed}"
    cmd = [sys.executable, "-m", "sctune.search", str(space), "--seed", str(seed), "--storage-path", str(root),
           "--name", name, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    best = json.loads((root / name / "best.json").read_text())
    bounds = json.loads((root / name / "range_test" / "bounds.json").read_text())
    final = best["final"]
    ours = [None if r["diverged"] else r["test/acc"] for r in final["runs"]]
    adam = adam_baseline(load_space(space), final)
    log(f"{task} seed {seed}: sctune {ours}, Adam {adam} ({wall:.0f} s)")
    return {"task": task, "seed": seed, "sctune_test_acc": ours, "adam_test_acc": adam, "final_seeds": final["seeds"],
            "refit": final["refit"], "epochs": final["epochs"], "stage1_fte": bounds.get("cost_fte"),
            "total_fte": ((best.get("compute") or {}).get("spent_fte") or {}).get("total"), "wall_s": wall,
            "recommended": {k: best["config"].get(k) for k in ("max_lr", "div_factor", "weight_decay", "dropout",
                                                             "batch_size", "epochs")},
            "verdict": (best.get("anchors") or {}).get("sc_likely")}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", type=int, default=3, help="search seeds per task")
    p.add_argument("--budget", type=float, help="--budget for every run (default: the CLI's default)")
    args = p.parse_args(argv)
    if args.quick:
        settings = {"tasks": ["wine"], "seeds": 1, "extra": ["--smoke"]}
    else:
        settings = {"tasks": args.tasks, "seeds": args.seeds,
                    "extra": [] if args.budget is None else ["--budget", f"{args.budget:g}"]}
    payload = envelope(NAME, args, settings)
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="sctune-task-only-") as tmp:
        for task in settings["tasks"]:
            for seed in range(settings["seeds"]):
                runs.append(run_one(task, seed, settings["extra"], Path(tmp)))
    summary = {}
    for task in settings["tasks"]:
        mine = [r for r in runs if r["task"] == task]
        ours = [a for r in mine for a in r["sctune_test_acc"] if a is not None]
        adam = [a for r in mine for a in r["adam_test_acc"] if a is not None]
        summary[task] = {"sctune": stats(ours), "adam": stats(adam),
                         "stage1_fte": stats([r["stage1_fte"] for r in mine]),
                         "total_fte": stats([r["total_fte"] for r in mine]),
                         "wall_s": stats([r["wall_s"] for r in mine])}
        log(f"{task}: sctune {summary[task]['sctune']['mean']:.4f}, Adam {summary[task]['adam']['mean']:.4f}")
    payload["results"] = {"runs": runs, "summary": summary, "wall_s": time.perf_counter() - t0}
    payload["loadavg_at_end"] = loadavg()
    log(f"wrote {write_result(out_dir(args), NAME, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
