"""Benchmark 2: super-convergence in miniature (the paper's headline, METHOD.md section 5).

Tuned one-cycle (sctune's 1cycle: linear, 3 phases, div 4, cycle_frac 0.9, annihilation 1000, momentum
0.95 -> 0.85 -> 0.95) at budget B/8 against the paper's baseline, tuned piecewise-constant LR (x0.1 at
62.5% and 87.5% of the run, momentum 0.9), at B and at B/8, on MNIST-1D with all 3,400 training
signals and with a 1,000-sample subset (``train_subset``; the paper's gains are largest with little
data). Budgets are in *iterations* (the paper's convention: its 10k-sample runs kept the iteration
counts), B = 64 epochs of the full set = 1,664 iterations at batch 128.

Tuning, identical for every arm and budget: a 5 x 3 grid, LR (max_lr for one-cycle) over half-decade
steps x weight decay {5e-4, 1e-4, 1e-5}, one training seed (100), pick the best final *validation*
accuracy; then the picked configuration is retrained over 5 fresh seeds (0-4) and tested once each.
One-cycle is also tuned and tested at B/16, B/4 and B/2 to find the iteration ratio at which it
matches the baseline's final (B) accuracy.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from benchmarks.common import envelope, loadavg, log, out_dir, parser, stats, write_result

NAME = "super_convergence"
FULL = {
    "variants": {"mnist1d": None, "mnist1d_1k": 1000},
    "b_iters": 1664,
    "onecycle_fracs": [1 / 16, 1 / 8, 1 / 4, 1 / 2],
    "piecewise_fracs": [1 / 8, 1.0],
    "lr_grid": {"piecewise": [0.01, 0.03, 0.1, 0.3, 1.0], "onecycle": [0.03, 0.1, 0.3, 1.0, 3.0]},
    "wd_grid": [5e-4, 1e-4, 1e-5],
    "tune_seed": 100,
    "test_seeds": [0, 1, 2, 3, 4],
}
QUICK = {
    "variants": {"mnist1d_1k": 1000},
    "b_iters": 128,
    "onecycle_fracs": [1 / 8, 1 / 2],
    "piecewise_fracs": [1 / 8, 1.0],
    "lr_grid": {"piecewise": [0.1, 1.0], "onecycle": [0.3, 3.0]},
    "wd_grid": [1e-4],
    "tune_seed": 100,
    "test_seeds": [0, 1],
}
BATCH = 128


def _init() -> None:
    import torch

    torch.set_num_threads(1)


_DATA: dict[Any, Any] = {}


def _base(subset: int | None):
    from sctune.core.config import TrainConfig

    return TrainConfig().with_flat(dataset="mnist1d", model="mnist1d_cnn", batch_size=BATCH, train_subset=subset,
                                   optimizer="sgd")


def _data(subset: int | None):
    from sctune.core.data import load_dataset

    if subset not in _DATA:
        _DATA[subset] = load_dataset(_base(subset).task)
    return _DATA[subset]


def epochs_for(iters: float, subset: int | None) -> int:
    n = len(_data(subset).y_train)
    return max(1, round(iters / (n // BATCH)))


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One training run: returns final val/test accuracy and its real iteration count."""
    from sctune.core.train import TEST_ACC, VAL_ACC, fit

    _init()
    subset = job["subset"]
    data = _data(subset)
    epochs = epochs_for(job["iters"], subset)
    kw = {"schedule": job["schedule"], "weight_decay": job["wd"], "seed": job["seed"], "epochs": epochs}
    kw |= {"max_lr": job["lr"]} if job["schedule"] == "onecycle" else {"lr": job["lr"], "momentum": 0.9}
    cfg = _base(subset).with_flat(**kw)
    t0 = time.perf_counter()
    res = fit(cfg, data=data, test_at_end=True)
    final = res.final
    return job | {"epochs": epochs, "iters_run": res.epochs_run * (len(data.y_train) // BATCH),
                  "val_acc": final.get(VAL_ACC) if not res.diverged else 0.0,
                  "test_acc": final.get(TEST_ACC) if not res.diverged else None, "diverged": res.diverged,
                  "wall_s": time.perf_counter() - t0}


def match_ratio(oc: list[tuple[float, float]], target: float) -> dict[str, Any]:
    """Smallest budget fraction whose one-cycle mean reaches ``target``, and a log-linear interpolation."""
    oc = sorted(oc)
    reached = [f for f, acc in oc if acc >= target]
    if not reached:
        return {"matched": False, "smallest_fraction": None, "ratio": None, "ratio_interpolated": None,
                "note": f"one-cycle never reached the baseline's mean up to B x {oc[-1][0]:g}"}
    f = min(reached)
    interp = None
    i = [x for x, _ in oc].index(f)
    if i == 0:
        interp = 1 / f
    else:
        (f0, a0), (f1, a1) = oc[i - 1], oc[i]
        if a1 > a0:
            t = (target - a0) / (a1 - a0)
            interp = 1 / math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    return {"matched": True, "smallest_fraction": f, "ratio": 1 / f, "ratio_interpolated": interp}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    conf = QUICK if args.quick else FULL
    out = out_dir(args)
    payload = envelope(NAME, args, conf | {"batch_size": BATCH, "selection": "best final val acc, tune seed",
                                           "one_cycle": "sctune defaults: div 4, cycle_frac 0.9, annihilation "
                                                        "1000, momentum 0.95-0.85-0.95 (linear, 3 phases)",
                                           "piecewise": "x0.1 at 0.625 and 0.875 of the run, momentum 0.9"})
    t_start = time.perf_counter()
    arms = [("onecycle", f) for f in conf["onecycle_fracs"]] + [("piecewise", f) for f in conf["piecewise_fracs"]]
    tune_jobs = [{"variant": v, "subset": sub, "schedule": sch, "frac": f, "iters": conf["b_iters"] * f,
                  "lr": lr, "wd": wd, "seed": conf["tune_seed"], "phase": "tune"}
                 for v, sub in conf["variants"].items() for sch, f in arms
                 for lr in conf["lr_grid"][sch] for wd in conf["wd_grid"]]
    import multiprocessing

    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        tuned = list(pool.map(run_one, sorted(tune_jobs, key=lambda j: -j["iters"])))
        log(f"tuning done: {len(tuned)} runs (load {loadavg()})")
        picks = {}
        for v in conf["variants"]:
            for sch, f in arms:
                cands = [r for r in tuned if r["variant"] == v and r["schedule"] == sch and r["frac"] == f]
                best = max(cands, key=lambda r: (r["val_acc"], -r["lr"]))
                picks[(v, sch, f)] = best
        test_jobs = [{k: best[k] for k in ("variant", "subset", "schedule", "frac", "iters", "lr", "wd")}
                     | {"seed": s, "phase": "test"} for best in picks.values() for s in conf["test_seeds"]]
        tested = list(pool.map(run_one, sorted(test_jobs, key=lambda j: -j["iters"])))
    log(f"testing done: {len(tested)} runs (load {loadavg()})")
    results: dict[str, Any] = {}
    for v, sub in conf["variants"].items():
        rows = {}
        for sch, f in arms:
            runs = [r for r in tested if r["variant"] == v and r["schedule"] == sch and r["frac"] == f]
            pick = picks[(v, sch, f)]
            key = f"{sch}@B/{round(1 / f)}" if f < 1 else f"{sch}@B"
            rows[key] = {"schedule": sch, "fraction_of_B": f, "iterations": runs[0]["iters_run"],
                         "epochs": runs[0]["epochs"], "picked": {"lr": pick["lr"], "wd": pick["wd"],
                                                                   "tune_val_acc": pick["val_acc"]},
                         "test_acc": stats([r["test_acc"] for r in runs]),
                         "diverged": sum(r["diverged"] for r in runs),
                         "tuning_grid": [{"lr": r["lr"], "wd": r["wd"], "val_acc": r["val_acc"]}
                                         for r in tuned if r["variant"] == v and r["schedule"] == sch
                                         and r["frac"] == f]}
        base_key = "piecewise@B"
        target = rows[base_key]["test_acc"]["mean"]
        oc = [(r["fraction_of_B"], r["test_acc"]["mean"]) for r in rows.values()
              if r["schedule"] == "onecycle" and r["test_acc"]["mean"] is not None]
        oc8 = rows.get("onecycle@B/8", {}).get("test_acc", {})
        pw8 = rows.get("piecewise@B/8", {}).get("test_acc", {})
        results[v] = {"train_subset": sub, "train_size": len(_data(sub).y_train), "b_iterations": conf["b_iters"],
                      "arms": rows,
                      "headline": {
                          "onecycle_B8_minus_piecewise_B": None if target is None or oc8.get("mean") is None
                          else oc8["mean"] - target,
                          "onecycle_B8_minus_piecewise_B8": None if pw8.get("mean") is None
                          or oc8.get("mean") is None else oc8["mean"] - pw8["mean"]},
                      "match": match_ratio(oc, target) if target is not None else None}
        log(f"{v}: " + ", ".join(f"{k} {r['test_acc']['mean']:.4f}±{r['test_acc']['std']:.4f}"
                                  for k, r in rows.items() if r["test_acc"]["mean"] is not None))
    payload["results"] = results
    payload["wall_s"] = time.perf_counter() - t_start
    payload["loadavg_at_end"] = loadavg()
    path = write_result(out, NAME, payload)
    _plot(results, out / f"{NAME}.png")
    log(f"wrote {path}")
    return 0


def _plot(results: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (v, r) in zip(axes[0], results.items(), strict=True):
        for sch, color in (("onecycle", "C0"), ("piecewise", "C3")):
            pts = sorted((a["iterations"], a["test_acc"]["mean"], a["test_acc"]["std"]) for a in r["arms"].values()
                         if a["schedule"] == sch and a["test_acc"]["mean"] is not None)
            if pts:
                xs, ms, ss = zip(*pts, strict=True)
                ax.errorbar(xs, [100 * m for m in ms], yerr=[100 * s for s in ss], marker="o", capsize=3,
                            color=color, label=f"{sch} (tuned, mean ± std over seeds)")
        ax.set_xscale("log")
        ax.set_xlabel("training iterations")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{v} (train {r['train_size']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
