"""Benchmark 3: overhead of sctune's machinery.

* Throughput (training samples/s over a whole trial: model build, every epoch's training steps and
  validation, and whatever the variant adds) of the same model and data, side by side, interleaved
  per repeat:
    - ``bare``: a plain PyTorch loop (randperm batches from tensors, SGD + torch OneCycleLR, a
      validation pass per epoch): what a user writes by hand;
    - ``fit``: ``sctune.core.train.fit`` with no callback;
    - ``fit+checkpoint``: ``fit`` with the trainable's per-epoch work minus Ray: a deep-copied
      resumable state (``state_fn``) written with ``torch.save`` every epoch;
    - ``ray_trial``: sctune's real ``train_trial`` through a one-trial Ray Tune ``Tuner``
      (per-epoch ``tune.report`` with a checkpoint, TensorBoard logging) on an already started Ray:
      CPU of the whole process tree (driver, Ray's daemons, the worker) during ``Tuner.fit()``, its
      wall time, and the trial's own ``time_total_s``.
  Whole-trial numbers include one-off set-up (imports, dataset load, TensorBoard writer); the
  ``steady`` numbers are seconds per epoch after the first (Ray: ``time_this_iter_s`` of reports 2..E).
* Ray per-trial start-up with and without ``reuse_actors``: ``Tuner.fit()`` wall time minus the time
  spent inside the trials, divided by the number of trials (one trial at a time, 1-epoch trials), and
  the CPU seconds the whole process tree (driver, Ray's daemons, workers) used per trial.

The machine is shared, so every variant is also measured in CPU seconds (``time.process_time`` with
one torch thread; for Ray, ``CpuTracker`` over the driver's whole process tree): samples per
CPU-second is far less sensitive to other jobs than samples per wall-second.

* The CPU cost of one range-test iteration (the space file's settings: held-out evaluation every
  ``eval_every`` steps with BatchNorm recalibration) in training iterations of ``fit``.

The range-test stage's share of a default run's compute is measured by ``benchmarks.end_to_end``.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CpuTracker,
    envelope,
    loadavg,
    log,
    out_dir,
    parser,
    ratio_stats,
    stats,
    write_result,
)

NAME = "overhead"
FULL = {"task": {"dataset": "mnist1d", "model": "mnist1d_cnn", "epochs": 20, "batch_size": 128}, "repeats": 5,
        "startup": {"trials": 4, "repeats": 3, "dataset": "digits", "model": "digits_cnn"}}
QUICK = {"task": {"dataset": "digits", "model": "digits_cnn", "epochs": 2, "batch_size": 64}, "repeats": 1,
         "startup": {"trials": 2, "repeats": 1, "dataset": "digits", "model": "digits_cnn"}}


def bare_loop(data, *, epochs: int, batch_size: int, max_lr: float, seed: int) -> tuple[float, list[float]]:
    """A hand-written PyTorch loop on the same model/data; returns wall seconds and epoch end times."""
    import torch
    from torch import nn

    from sctune.core.models import build_model

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model("mnist1d_cnn" if data.x_train.dim() == 3 else "digits_cnn", num_classes=data.num_classes,
                        input_shape=data.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=max_lr, momentum=0.95, weight_decay=1e-4)
    n = len(data.y_train)
    steps = n // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=epochs * steps, pct_start=0.45,
                                                anneal_strategy="linear", three_phase=True, div_factor=4.0,
                                                final_div_factor=1000.0)
    crit = nn.CrossEntropyLoss()
    ends = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n)
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = crit(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            _ = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
        ends.append(time.perf_counter() - t0)
    return time.perf_counter() - t0, ends


def sctune_fit(cfg, data, *, checkpoint: bool) -> tuple[float, list[float]]:
    import torch

    from sctune.core.train import fit

    ends: list[float] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        def on_epoch(metrics, state_fn):
            if checkpoint:
                torch.save(state_fn(), Path(d) / "state.pt")
            ends.append(time.perf_counter() - t0)
            return False

        fit(cfg, data=data, on_epoch=on_epoch)
    return time.perf_counter() - t0, ends


def steady(ends: list[float]) -> float | None:
    """Seconds per epoch after the first (set-up and first-epoch costs excluded)."""
    if len(ends) < 2:
        return None
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def _tuner(trainable, param_space: dict, *, root: Path, stage: str, reuse: bool, callbacks: list):
    from ray import tune

    from sctune.service.experiment import ExperimentPaths
    from sctune.service.stages import stage_run_config

    return tune.Tuner(trainable, param_space=param_space,
                      tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse),
                      run_config=stage_run_config(ExperimentPaths(root), stage, callbacks, max_failures=0))


def _collector():
    """A Tune callback keeping every result's ``time_this_iter_s`` (sctune turns Tune's CSV logger off)."""
    from ray import tune

    class Collect(tune.Callback):
        def __init__(self):
            self.iter_s: dict[str, list[float]] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.iter_s.setdefault(trial.trial_id, []).append(float(result.get("time_this_iter_s", math.nan)))

    return Collect()


def ray_trials(base: dict[str, Any], seeds: list[int], *, reuse: bool, root: Path, stage: str) -> dict[str, Any]:
    """Run ``len(seeds)`` trials of sctune's train_trial one at a time; wall and in-trial times."""
    from ray import tune

    from sctune.service.trainables import train_trial

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base, tb_logdir=str(root / "tb"), stage="search", cpus=1),
        {"cpu": 1, "gpu": 0})
    collect = _collector()
    tuner = _tuner(trainable, {"seed": tune.grid_search(seeds)}, root=root, stage=stage, reuse=reuse,
                   callbacks=[collect])
    tracker = CpuTracker().start()
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    cpu = tracker.stop()
    inside = [float(r.metrics.get("time_total_s", math.nan)) for r in grid]
    per_epoch = [sum(v[1:]) / (len(v) - 1) for v in collect.iter_s.values() if len(v) > 1]
    errors = [str(r.error)[:300] for r in grid if r.error is not None]
    return {"wall_s": wall, "tree_cpu_s": cpu, "trial_time_total_s": inside, "steady_s_per_epoch": per_epoch,
            "errors": errors}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    conf = QUICK if args.quick else FULL
    out = out_dir(args)
    payload = envelope(NAME, args, conf)
    t_start = time.perf_counter()

    from sctune.service.ray_session import quiet_ray_env

    quiet_ray_env(False)
    import torch

    torch.set_num_threads(1)
    from sctune.core.config import TrainConfig
    from sctune.core.data import load_dataset
    from sctune.core.range_test import run_range_test
    from sctune.service.space import load_space

    t = conf["task"]
    cfg = TrainConfig().with_flat(dataset=t["dataset"], model=t["model"], epochs=t["epochs"],
                                  batch_size=t["batch_size"], max_lr=0.5, weight_decay=1e-4)
    data = load_dataset(cfg.task)
    spe = (len(data.y_train) // t["batch_size"]) * t["batch_size"]  # training samples per epoch
    samples = t["epochs"] * spe
    # warm-up (first-call costs: allocator, kernels)
    bare_loop(data, epochs=1, batch_size=t["batch_size"], max_lr=0.5, seed=0)
    sctune_fit(cfg.with_flat(epochs=1), data, checkpoint=False)

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_init_s = time.perf_counter() - t0
    variants = ("bare", "fit", "fit+checkpoint", "ray_trial")
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    per_epoch: dict[str, list] = {k: [] for k in variants}
    ray_inside: list[float] = []
    ray_raw: list[dict] = []
    loads = []
    rt_cost: list[float] = []
    startup: dict[str, list] = {"reuse_actors=True": [], "reuse_actors=False": []}
    startup_cpu: dict[str, list] = {k: [] for k in startup}
    startup_raw: dict[str, list] = {k: [] for k in startup}
    try:
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            for r in range(conf["repeats"]):
                order = list(variants[r % 4:] + variants[:r % 4])  # rotate: load drift spreads evenly
                for v in order:
                    if v == "ray_trial":
                        res = ray_trials(cfg.to_flat(), [r], reuse=True, root=root / f"thr{r}", stage=f"thr{r}")
                        wall[v].append(res["wall_s"])
                        cpu[v].append(res["tree_cpu_s"])
                        per_epoch[v].append(res["steady_s_per_epoch"][0] if res["steady_s_per_epoch"] else None)
                        ray_inside.append(res["trial_time_total_s"][0])
                        ray_raw.append(res)
                        continue
                    c0 = time.process_time()
                    if v == "bare":
                        w, ends = bare_loop(data, epochs=t["epochs"], batch_size=t["batch_size"], max_lr=0.5, seed=r)
                    else:
                        w, ends = sctune_fit(cfg.with_flat(seed=r), data, checkpoint=v == "fit+checkpoint")
                    cpu[v].append(time.process_time() - c0)
                    wall[v].append(w)
                    per_epoch[v].append(steady(ends))
                loads.append(loadavg())
                log(f"repeat {r}: " + ", ".join(f"{k} {wall[k][-1]:.2f}s wall {cpu[k][-1]:.2f}s cpu" for k in variants)
                    + f" (load {loads[-1]})")

            # CPU cost of a range-test iteration (held-out evaluation every eval_every steps, BN
            # recalibration) in training iterations: benchmark 1 counts iterations only.
            rt_spec = load_space(Path(__file__).resolve().parent.parent / "search_spaces" / f"{t['dataset']}.yaml",
                                 smoke=args.quick)
            steps = len(data.y_train) // t["batch_size"]
            for r in range(conf["repeats"]):
                c0 = time.process_time()
                res = run_range_test(cfg, rt_spec.range_test, weight_decay=1e-4, seed=r, data=data)
                rt_cpu = time.process_time() - c0
                n_iter = len(res.frame)
                ep = max(1, round(n_iter / steps))
                c0 = time.process_time()
                sctune_fit(cfg.with_flat(seed=r, epochs=ep), data, checkpoint=False)
                fit_cpu = time.process_time() - c0
                rt_cost.append((rt_cpu / n_iter) / (fit_cpu / (ep * steps)))
            log(f"range-test iteration / training iteration CPU cost: {rt_cost}")

            # start-up per trial, with and without reuse_actors
            s = conf["startup"]
            scfg = TrainConfig().with_flat(dataset=s["dataset"], model=s["model"], epochs=1, batch_size=64)
            for r in range(s["repeats"]):
                for reuse in ((True, False) if r % 2 == 0 else (False, True)):
                    key = f"reuse_actors={reuse}"
                    res = ray_trials(scfg.to_flat(), list(range(s["trials"])), reuse=reuse,
                                     root=root / f"su{r}{reuse}", stage=f"su{r}{int(reuse)}")
                    inside = sum(x for x in res["trial_time_total_s"] if math.isfinite(x))
                    startup[key].append((res["wall_s"] - inside) / s["trials"])
                    startup_cpu[key].append(res["tree_cpu_s"] / s["trials"])
                    startup_raw[key].append(res | {"loadavg": loadavg()})
                    log(f"start-up {key}: {startup[key][-1]:.2f}s wall/trial, {startup_cpu[key][-1]:.2f} CPU-s/trial "
                        f"(load {loadavg()})")
    finally:
        ray.shutdown()

    thr = {k: [samples / w for w in v] for k, v in wall.items()}
    thr_inside = [samples / x for x in ray_inside if math.isfinite(x) and x > 0]
    cpu_thr = {k: [samples / c for c in v] for k, v in cpu.items()}
    steady_thr = {k: [None if x is None else spe / x for x in v] for k, v in per_epoch.items()}
    payload["results"] = {
        "samples_per_trial": samples,
        "train_size": len(data.y_train),
        "wall_s": {k: stats(v) for k, v in wall.items()},
        "cpu_s": {k: stats(v) for k, v in cpu.items()},
        "samples_per_s": {k: stats(v) for k, v in thr.items()} | {"ray_trial (inside trial)": stats(thr_inside)},
        "samples_per_cpu_s": {k: stats(v) for k, v in cpu_thr.items()},
        "ratio_vs_bare": {k: ratio_stats(thr[k], thr["bare"]) for k in variants if k != "bare"}
        | {"ray_trial (inside trial)": ratio_stats(thr_inside, thr["bare"][:len(thr_inside)])},
        "cpu_ratio_vs_bare": {k: ratio_stats(cpu_thr[k], cpu_thr["bare"]) for k in variants if k != "bare"},
        "steady_samples_per_s": {k: stats(v) for k, v in steady_thr.items()},
        "steady_ratio_vs_bare": {k: ratio_stats(steady_thr[k], steady_thr["bare"]) for k in variants if k != "bare"},
        "range_test_iteration_cost_in_training_iterations": stats(rt_cost),
        "ray_init_s": ray_init_s,
        "ray": {
            "trials": ray_raw,
            "startup": {k: stats(v) for k, v in startup.items()},
            "startup_ratio_no_reuse_over_reuse": ratio_stats(startup["reuse_actors=False"],
                                                             startup["reuse_actors=True"]),
            "startup_cpu_s_per_trial": {k: stats(v) for k, v in startup_cpu.items()},
            "startup_cpu_ratio_no_reuse_over_reuse": ratio_stats(startup_cpu["reuse_actors=False"],
                                                                 startup_cpu["reuse_actors=True"]),
            "startup_raw": startup_raw,
        },
        "loadavg_per_repeat": loads,
    }
    payload["wall_s"] = time.perf_counter() - t_start
    payload["loadavg_at_end"] = loadavg()
    path = write_result(out, NAME, payload)
    log(f"wrote {path}")
    for k, v in payload["results"]["cpu_ratio_vs_bare"].items():
        log(f"CPU throughput ratio {k}: median {v['median']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
