"""Benchmark 7: where in the range test's high band full one-cycle trainings are best.

Stage 1's max_lr is the top of the band where held-out accuracy stays high (Smith's reading). Issue 18 found
full trainings best well inside that band, not at its top. Per task, this runs stage 1 as the shipped space
file configures it (every weight decay x repeat range test, in process, shortened by ``budget.plan_compute``
as a run would; ``--stage1-seeds`` repeats of it), then full one-cycle trainings (``sctune.core.train.fit``, the
recipe point: div_factor 10, the chosen weight decay, the recipe's dropout) at max_lr on a log grid across
the band of the first stage-1 seed (log-fractions ``GRID_T`` of ``[learn_lr, top_lr]``, below and above it),
and at each stage-1 seed's ``recommended_max_lr`` itself, several seeds each. The result has the test accuracy
per LR and, per stage-1 seed, the LR each candidate rule (``RULES``) recommends, so a rule can be judged by
where it lands on the measured accuracy-vs-max_lr curve and by how much it moves between stage-1 seeds.

``python -m benchmarks.recommended_lr [--quick]``; results in ``benchmarks/results/recommended_lr.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, envelope, loadavg, log, out_dir, parser, write_result

NAME = "recommended_lr"
# name -> (space file, train_subset, range-test overrides): the shipped CPU spaces, MNIST-1D's 1,000-sample
# regime, and digits with a 0 -> 10 ramp (like issue 18's held-out task: the band then reaches LR ~4-8)
TASKS = {"digits": ("digits.yaml", None, {}), "mnist1d": ("mnist1d.yaml", None, {}),
         "mnist1d_1000": ("mnist1d.yaml", 1000, {}),
         "digits_ramp10": ("digits.yaml", None, {"end_lr": 10.0, "num_iter": 120, "eval_every": 8}),
         # a task-only file (every section filled from the data): a band 20x wide without the signature
         "wine": ("benchmarks/spaces/wine.yaml", None, {})}
# the grid: log-fractions of the band [learn_lr, top_lr] (< 0: below where the model learned; > 1: above the top)
GRID_T = (-1.5, -0.75, 0.0, 0.33, 0.67, 1.0, 1.3)


def _spec(space: str, subset: int | None, ramp: dict[str, Any]):
    from sctune.core.data import load_dataset
    from sctune.service.budget import plan_compute
    from sctune.service.space import load_space

    spec = load_space(REPO / space if "/" in space else REPO / "search_spaces" / space)
    if subset is not None:
        spec = dataclasses.replace(spec, base=spec.base.with_flat(train_subset=subset))
    if ramp:
        spec = dataclasses.replace(spec, range_test=spec.range_test.replace(**ramp))
    data = load_dataset(spec.base.task)
    spec, _ = plan_compute(spec, data.sizes())
    return spec, data


def _stage1(spec, data, seed: int) -> dict[str, Any]:
    """Stage 1 as ``stages.run_stage1`` derives it (``summaries.range_bounds``' per-WD aggregate + choice)."""
    from sctune.core.bounds import aggregate_bounds, choose_weight_decay
    from sctune.core.range_test import run_range_test

    rt = spec.range_test
    per_wd, curves = {}, {}
    for wd in rt.weight_decays:
        results = []
        for i in range(rt.repeats):
            res = run_range_test(spec.base, rt, weight_decay=wd, seed=seed + i, data=data)
            results.append(res.bounds())
            curves[f"{wd:g}/{seed + i}"] = {"lr": res.frame["lr"].tolist(), "acc": res.frame["acc"].tolist()}
        per_wd[f"{wd:g}"] = {"weight_decay": wd, **aggregate_bounds(results)}
    chosen = choose_weight_decay(per_wd)
    return {"seed": seed, "chosen": chosen, "curves": curves}


# Candidate rules, from the aggregate's learn_lr (the band's start) and max_lr (its top, backed off from a
# divergence): a point in log LR across the band, or a fraction of the top (not below the band's start).
RULES = {
    "log_0.25": lambda learn, top: learn * (top / learn) ** 0.25,
    "log_0.5 (geometric middle)": lambda learn, top: learn * (top / learn) ** 0.5,
    "log_0.75": lambda learn, top: learn * (top / learn) ** 0.75,
    "max(learn, top/2)": lambda learn, top: max(learn, top / 2),
    "max(learn, top/3)": lambda learn, top: max(learn, top / 3),
    "max(learn, top/4)": lambda learn, top: max(learn, top / 4),
    "top/4": lambda learn, top: top / 4,
    "top": lambda learn, top: top,
}


def _rules(chosen: dict[str, Any]) -> dict[str, float | None]:
    v = chosen.get("verdict") or {}
    learn, top = v.get("learn_lr"), chosen.get("max_lr")
    out: dict[str, float | None] = {"max_lr": top, "min_lr": chosen.get("min_lr"), "learn_lr": learn,
                                    "top_lr": v.get("top_lr"), "recommended_max_lr": chosen.get("recommended_max_lr")}
    for name, rule in RULES.items():
        out[name] = rule(learn, top) if learn and top else None
    return out


def _train(spec, data, chosen: dict[str, Any], max_lr: float, seed: int, epochs: int | None) -> dict[str, Any]:
    from sctune.core.train import fit
    from sctune.service.plan import recipe_point, resolve, stage1_anchors

    anchors = stage1_anchors(spec, chosen)
    dists, constants = resolve(spec, anchors)
    point = recipe_point(dists, anchors, divisor=spec.range_test.divisor) | constants
    point |= {"max_lr": max_lr, "div_factor": 10.0, "seed": seed}
    if epochs is not None:
        point["epochs"] = epochs
    cfg = spec.base.with_flat(**point)
    t0 = time.perf_counter()
    res = fit(cfg, data=data, test_at_end=True)
    f = res.final
    return {"max_lr": max_lr, "seed": seed, "test_acc": None if res.diverged else f.get("test/acc"),
            "val_acc": None if res.diverged else f.get("val/acc"), "diverged": res.diverged,
            "dropout": point.get("dropout"), "weight_decay": point.get("weight_decay"),
            "wall_s": time.perf_counter() - t0}


def run_task(name: str, *, seeds: int, stage1_seeds: int, grid_t: tuple[float, ...], epochs: int | None) -> dict:
    space, subset, ramp = TASKS[name]
    spec, data = _spec(space, subset, ramp)
    s1 = [_stage1(spec, data, seed) for seed in range(stage1_seeds)]
    for s in s1:
        s["rules"] = _rules(s["chosen"]) if s["chosen"] else None
        log(f"{name} stage1 seed {s['seed']}: {s['rules']}")
    ref = s1[0]["rules"]
    learn, top = ref["learn_lr"], ref["top_lr"]
    # the band grid, plus each stage-1 seed's recommended max_lr and its max_lr / 4 (the CLR min bound, the
    # recommendation's starting point) themselves (trained, not interpolated)
    points = {learn * (top / learn) ** t: t for t in grid_t}
    for s in s1:
        for key in ("recommended_max_lr", "top/4"):
            rec = (s["rules"] or {}).get(key)
            if rec is not None and all(abs(rec / lr - 1) > 1e-6 for lr in points):
                points[rec] = None
    grid = sorted(points)
    runs = []
    for lr in grid:
        for seed in range(seeds):
            r = _train(spec, data, s1[0]["chosen"], lr, seed, epochs)
            log(f"{name} max_lr {lr:.3g} seed {seed}: test {r['test_acc']} ({r['wall_s']:.1f}s)")
            runs.append(r)
    table = []
    for lr in grid:
        accs = [r["test_acc"] for r in runs if r["max_lr"] == lr and r["test_acc"] is not None]
        recommended_by = [s["seed"] for s in s1 if s["rules"] and s["rules"].get("recommended_max_lr") is not None
                          and abs(s["rules"]["recommended_max_lr"] / lr - 1) <= 1e-6]
        table.append({"t": points[lr], "max_lr": lr, "recommended_by_stage1_seeds": recommended_by,
                      "test_acc_mean": float(np.mean(accs)) if accs else None,
                      "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                      "n": len(accs)})
    return {"task": name, "space": space, "train_subset": subset, "epochs": epochs or spec.base.epochs,
            "range_test": {"num_iter": spec.range_test.num_iter, "eval_every": spec.range_test.eval_every,
                           "end_lr": spec.range_test.end_lr},
            "stage1": [{k: v for k, v in s.items() if k != "chosen"} | {"verdict": (s["chosen"] or {}).get(
                "verdict", {}).get("possible") if s["chosen"] else None} for s in s1],
            "grid": table, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", type=int, default=3, help="training seeds per grid LR")
    p.add_argument("--stage1-seeds", type=int, default=3, help="stage-1 repeats (for the rules' stability)")
    p.add_argument("--grid", type=float, nargs="+", default=list(GRID_T),
                   help="grid of max_lr as log-fractions of the band [learn_lr, top_lr]")
    p.add_argument("--keep", action="store_true",
                   help="keep the other tasks of the existing result file (each task records its own git commit "
                        "and date)")
    args = p.parse_args(argv)
    if args.quick:
        settings = {"tasks": ["digits"], "seeds": 1, "stage1_seeds": 1, "grid_t": (0.0, 0.5, 1.0), "epochs": 2}
    else:
        settings = {"tasks": args.tasks, "seeds": args.seeds, "stage1_seeds": args.stage1_seeds,
                    "grid_t": tuple(args.grid), "epochs": None}
    payload = envelope(NAME, args, settings)
    t0 = time.perf_counter()
    kept = []
    old_path = out_dir(args) / f"{NAME}.json"
    if args.keep and old_path.exists():
        old = json.loads(old_path.read_text())
        measured = {k: old["machine"].get(k) for k in ("git_commit", "date_utc")}
        kept = [{"measured": measured} | t for t in old["results"]["tasks"] if t["task"] not in settings["tasks"]]
    payload["results"] = {"tasks": list(kept)}
    measured = {k: payload["machine"].get(k) for k in ("git_commit", "date_utc")}
    for t in settings["tasks"]:  # written after each task: a long run keeps what it measured
        payload["results"]["tasks"].append({"measured": measured} | run_task(
            t, seeds=settings["seeds"], stage1_seeds=settings["stage1_seeds"], grid_t=settings["grid_t"],
            epochs=settings["epochs"]))
        payload["results"]["wall_s"] = time.perf_counter() - t0
        payload["loadavg_at_end"] = loadavg()
        path: Path = write_result(out_dir(args), NAME, payload)
    log(f"wrote {path}")
    for task in payload["results"]["tasks"]:
        best = max((g for g in task["grid"] if g["test_acc_mean"] is not None), key=lambda g: g["test_acc_mean"],
                   default=None)
        log(f"{task['task']}: best grid max_lr {best and best['max_lr']:.3g}; "
            + ", ".join(f"{g['max_lr']:.3g}: {g['test_acc_mean']}" for g in task["grid"]))
    return 0 if all(math.isfinite(g["max_lr"]) for t in payload["results"]["tasks"] for g in t["grid"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
