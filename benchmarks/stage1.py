"""Benchmark 6: stage 1's judgment and cost, before and after the high-band rule.

Part A, the authors' curves (``../shared/reference/smith-topin/``, ResNet-56, LR 0 -> 3): max_lr, status and
the super-convergence verdict from ``sctune.core.bounds.smith_bounds`` now, and from the rule at the ``--before``
revision (its ``sctune/bounds.py`` read from git and run on the same data). The authors read all four as
super-convergence and trained at 0.1 -> 3.

Part B, every shipped space: stage 1 as it runs it (every weight decay x seed range test, here in process,
without Ray), with the space file now and at ``--before``: the chosen bounds, the verdict and the measured
cost in full-training equivalents (FTE: the range tests' steps over one full training's, scaled by their
measured evaluation share, ``RangeTestResult.cost_fte``). The "before" runs use today's range-test code
(which also evaluates the untrained model at row 0; the old rule is given the curve without that row).

The CIFAR spaces need their data and a GPU: for them the cost is built from measured components instead -
seconds per ResNet-56 training step and per evaluation (precise BatchNorm + held-out pass) on CIFAR-shaped
random tensors on this CPU - and max_lr/verdict are not run.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO, envelope, loadavg, log, out_dir, parser, write_result

NAME = "stage1"
BEFORE = "676bb6a"  # the last revision with the argmax-of-smoothed-accuracy rule
REFERENCE = REPO.parent / "shared" / "reference" / "smith-topin"
AUTHORS = ["range3Iter5kFig2b.csv", "range3Iter20kFig2b.csv", "range3Iter100kFig2b.csv", "range3Cifar100kFig8.csv"]
CPU_SPACES = ["digits.yaml", "mnist1d.yaml"]
GPU_SPACES = ["cifar10_resnet56.yaml", "cifar100_resnet56.yaml"]


def _git_show(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def old_bounds_module(rev: str):
    """``sctune/bounds.py`` as it was at `rev`, imported under another name (it depends on numpy/pandas only)."""
    path = Path(tempfile.mkdtemp()) / "bounds_before.py"
    path.write_text(_git_show(rev, "sctune/bounds.py"))
    spec = importlib.util.spec_from_file_location("bounds_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bounds_before"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _now(b) -> dict[str, Any]:
    v = b.verdict
    return {"status": b.status, "max_lr": b.max_lr, "lower_bound": b.lower_bound,
            "verdict": None if v is None else {True: "likely", False: "unlikely", None: "undetermined"}[v.possible],
            "message": b.message}


def _old(b) -> dict[str, Any]:
    v = b.verdict
    return {"status": b.status, "max_lr": b.max_lr,
            "verdict": None if v is None else ("likely" if v.possible else "unlikely"),
            "width_decades": None if v is None else v.width_decades}


def part_a(old) -> list[dict[str, Any]]:
    import pandas as pd

    from sctune.core.bounds import smith_bounds

    rows = []
    for name in AUTHORS:
        df = pd.read_csv(REFERENCE / name)
        rows.append({"curve": name, "now": _now(smith_bounds(df["lr"], df["test_acc"], ramp_end_lr=3.0)),
                     "before": _old(old.smith_bounds(df["lr"].to_numpy(), df["test_acc"].to_numpy()))})
        log(f"{name}: now {rows[-1]['now']['max_lr']} {rows[-1]['now']['verdict']}, "
            f"before {rows[-1]['before']['max_lr']} {rows[-1]['before']['verdict']}")
    return rows


def _stage1_in_process(spec, *, rule: str, old=None) -> dict[str, Any]:
    """Every (weight decay, seed) range test of `spec`, then the bounds as stage 1 derives them."""
    from sctune.core.bounds import aggregate_bounds, choose_weight_decay
    from sctune.core.data import load_dataset
    from sctune.core.range_test import run_range_test

    rt = spec.range_test
    data = load_dataset(spec.base.task)
    per_wd: dict[str, Any] = {}
    cost, n_tests, steps = 0.0, 0, 0
    t0 = time.perf_counter()
    for wd in rt.weight_decays:
        results = []
        for i in range(rt.repeats):
            res = run_range_test(spec.base, rt, weight_decay=wd, seed=spec.search.seed + i, data=data)
            cost += res.cost_fte
            n_tests += 1
            steps += len(res.frame)
            if rule == "now":
                results.append(res.bounds())
            else:  # the old rule never saw row 0's accuracy: the old range test did not evaluate there
                f = res.frame.copy()
                f.loc[0, ["acc", "val_loss"]] = math.nan
                results.append(old.bounds_from_frame(f, method="smith", divisor=rt.divisor))
        agg = (aggregate_bounds if rule == "now" else old.aggregate_bounds)(results)
        per_wd[f"{wd:g}"] = {"weight_decay": wd, **agg}
    if rule == "now":
        chosen = choose_weight_decay(per_wd)
        verdict = None if chosen is None or chosen["verdict"] is None else chosen["verdict"]["possible"]
        verdict = {True: "likely", False: "unlikely", None: "undetermined"}[verdict] if chosen else None
    else:  # before: the WD whose median max_lr was largest; likely when its plateau spanned >= 1 decade
        usable = [v for v in per_wd.values() if v["status"] == "ok"]
        chosen = max(usable, key=lambda v: (v["max_lr"], v.get("width_decades") or 0.0)) if usable else None
        verdict = None if chosen is None else ("likely" if (chosen.get("width_decades") or 0) >= 1.0 else "unlikely")
    return {"tests": n_tests, "steps": steps, "cost_fte": cost, "wall_s": time.perf_counter() - t0,
            "max_lr": None if chosen is None else chosen["max_lr"],
            "wd_prior": None if chosen is None else chosen["weight_decay"], "verdict": verdict,
            "statuses": {k: v["status"] for k, v in per_wd.items()}}


def part_b(old, spaces: list[str], *, quick: bool) -> list[dict[str, Any]]:
    from sctune.service.space import load_space, parse_space

    rows = []
    for name in spaces:
        now_spec = load_space(REPO / "search_spaces" / name, smoke=quick)
        before_spec = parse_space(yaml.safe_load(_git_show(BEFORE, f"search_spaces/{name}")), name, smoke=quick)
        row = {"space": name, "now": _stage1_in_process(now_spec, rule="now"),
               "before": _stage1_in_process(before_spec, rule="before", old=old)}
        log(f"{name}: now {row['now']['cost_fte']:.2f} FTE max_lr {row['now']['max_lr']} {row['now']['verdict']}; "
            f"before {row['before']['cost_fte']:.2f} FTE max_lr {row['before']['max_lr']} {row['before']['verdict']}")
        rows.append(row)
    return rows


def _component_seconds(spec, *, steps: int) -> dict[str, float]:
    """Seconds per training step and per range-test evaluation of `spec`'s model on CIFAR-shaped tensors."""
    import torch
    from torch import nn

    from sctune.core.models import build_model
    from sctune.core.train import evaluate, make_optimizer, recalibrate_bn

    torch.manual_seed(0)
    bs = spec.base.batch_size
    model = build_model(spec.base.task.model, num_classes=10, input_shape=(3, 32, 32))
    opt = make_optimizer(model, spec.base, lr=0.1)
    x, y = torch.randn(bs, 3, 32, 32), torch.randint(0, 10, (bs,))
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    rt = spec.range_test
    xv, yv = torch.randn(rt.eval_samples, 3, 32, 32), torch.randint(0, 10, (rt.eval_samples,))
    xr = torch.randn(rt.recal_samples, 3, 32, 32)
    t = time.perf_counter()
    recalibrate_bn(model, xr)
    evaluate(model, xv, yv)
    return {"step_s": sum(times[1:]) / steps, "eval_s": time.perf_counter() - t}


def part_c(spaces: list[str], *, quick: bool) -> list[dict[str, Any]]:
    from sctune.service.space import load_space, parse_space

    rows = []
    for name in spaces:
        row: dict[str, Any] = {"space": name}
        for label, spec in (("now", load_space(REPO / "search_spaces" / name)),
                            ("before", parse_space(yaml.safe_load(_git_show(BEFORE, f"search_spaces/{name}")), name))):
            task = spec.base.task
            n_train = task.train_subset or 50_000
            n_train = int(n_train * (1 - task.val_frac))
            full_steps = spec.base.epochs * (n_train // spec.base.batch_size)  # DeviceLoader drops the last batch
            comp = _component_seconds(spec, steps=1 if quick else 2)
            rt = spec.range_test
            n_tests = len(rt.weight_decays) * rt.repeats
            evals = rt.num_iter // rt.eval_every + 1
            per_test = (rt.num_iter * comp["step_s"] + evals * comp["eval_s"]) / (full_steps * comp["step_s"])
            row[label] = {"tests": n_tests, "steps": n_tests * rt.num_iter, "full_training_steps": full_steps,
                          **comp, "cost_fte": n_tests * per_test}
        log(f"{name}: now {row['now']['cost_fte']:.2f} FTE, before {row['before']['cost_fte']:.2f} FTE "
            "(from measured step/eval seconds)")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--before", default=BEFORE, help="git revision of the previous rule and space files")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as in a 1-CPU trial
    old = old_bounds_module(args.before)
    load0 = loadavg()
    result = envelope(NAME, args, {"before": args.before, "threads": 1})
    result["authors_curves"] = part_a(old)
    result["spaces"] = part_b(old, CPU_SPACES[:1] if args.quick else CPU_SPACES, quick=args.quick)
    result["gpu_spaces"] = part_c(GPU_SPACES[:1] if args.quick else GPU_SPACES, quick=args.quick)
    result["loadavg"] = {"start": load0, "end": loadavg()}
    path = write_result(out_dir(args), NAME, result)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
