"""A space file that names only its task is a complete experiment: every missing section is filled here with
defaults scaled to the data, each with a note saying what was chosen and why (``--stage plan`` prints them).

``fill_missing(raw, file)`` takes the parsed YAML and returns it with the missing sections added. The data is
loaded once (in the driver, before Ray starts) to count its samples; where it cannot be loaded here (a
cluster whose data lives only on the workers) the static defaults stay and the note says so.

The numbers, and why:

* validation: at least ``MIN_VAL`` samples where the data allows, at most ``MAX_VAL_FRAC`` of it held out.
  On 105 training samples the default 15% left 19 to select on, and 11 of 16 trials tied (issue 19).
* batch size: a power of two near ``n_train / TARGET_STEPS_PER_EPOCH``, within [8, 128]: 1,221 digits
  samples give 64 (the shipped digits.yaml's choice); CIFAR's 45,000 give 128 (the paper's).
* epochs: enough for ``TARGET_ITERATIONS`` steps, within [10, 100] (the digits file trains 12 x 19 = 228).
* range test: a geometric ramp over 4 decades up to 3 (SGD) or 0.03 (Adam); ``len(weight_decays)`` tests
  share ``RANGE_TEST_FTE`` of one training's steps, each at least ``MIN_RANGE_ITERS`` long, evaluated
  ``RANGE_TEST_EVALS`` times; the measured cost adds the evaluations
  (digits: 0.63 planned, 0.93 measured), so stage 1 stays under 1 FTE. Two weight decays below 10,000
  training samples (stage 2 searches a decade around the prior anyway), three from there on.
* final fit: 3 seeds; on train + validation (``final.refit``) where validation holds at least
  ``REFIT_VAL_FRAC`` of the data (small data, where the split above was raised): leaving 38 of wine's 124
  samples out of the answer's training cost it, measured over 16 seeds at the recipe point (max_lr 0.043,
  dropout 0.15): 0.993 +- 0.016 (worst 0.944) on train alone, 0.992 +- 0.009 (worst 0.981) with them.
* search: sctune's defaults; below ``LOSS_RANKS_BELOW`` validation samples trials are ranked (and promoted)
  by the validation loss, not accuracy: on wine's 38, accuracy ties trials that differ by one sample, and
  selecting by it picked configurations that tested at 0.963-0.981 (3 search seeds, default budget, one
  final seed each) where selecting by the loss kept the recipe point in all 3 and tested at 0.981-1.000.
* space: around stage 1, as the shipped files: max_lr in [bound/10, bound] (log), div_factor in [3, 20]
  (log), weight decay 3 decades below to 1 above the prior (log), dropout in [0, 0.3].
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

from ..core.config import ConfigError, TaskConfig, TrainConfig

log = logging.getLogger(__name__)

MIN_VAL = 100
MAX_VAL_FRAC = 0.3
TARGET_STEPS_PER_EPOCH = 16
BATCH_RANGE = (8, 128)
TARGET_ITERATIONS = 240
EPOCH_RANGE = (10, 100)
RANGE_TEST_FTE = 0.5
MIN_RANGE_ITERS = 30
MAX_RANGE_ITERS = 5_000  # the paper's CIFAR range tests: 5,000 iterations
RANGE_TEST_EVALS = 12  # Smith's bounds need >= 8 evaluated points before the loss diverges (late, geometric)
EVAL_SHARE = 0.5
MIN_EVAL_SAMPLES = 64
RAMP_DECADES = 4
MANY_SAMPLES = 10_000
REFIT_VAL_FRAC = 0.25
LOSS_RANKS_BELOW = 200

DEFAULT_SPACE = {
    "max_lr": {"type": "float", "low": 0.1, "high": 1.0, "log": True, "scale": "max_lr_bound"},
    "div_factor": {"type": "float", "low": 3.0, "high": 20.0, "log": True},
    "weight_decay": {"type": "float", "low": 1.0e-3, "high": 10.0, "log": True, "scale": "wd_prior"},
    "dropout": {"type": "float", "low": 0.0, "high": 0.3},
}


def _sizes(task: TaskConfig) -> dict[str, int] | None:
    """Train and validation sizes of ``task`` (loads the data once, here); None if it cannot be loaded."""
    from ..core.data import known_split_sizes, load_dataset

    try:
        return load_dataset(task).sizes()
    except Exception as e:  # the task's own errors are reported by parse_space (check_task), naming the key
        log.debug("could not load %s to scale defaults: %s", task.dataset, e)
        return known_split_sizes(task)


def _pow2_floor(x: float) -> int:
    return 2 ** int(math.floor(math.log2(max(x, 1.0))))


def fill_missing(raw: Mapping[str, Any], file: str = "<space>") -> tuple[dict[str, Any], list[str]]:
    """``raw`` with its missing sections filled from the data; notes (one line each) on what and why.

    A file with every section is returned unchanged (no data is loaded). Sections present are kept as
    written; only whole missing sections are filled (and ``task.val_frac`` when both it and ``fixed`` are
    missing: a file that sets its own batch size keeps its own split too)."""
    doc = copy.deepcopy(dict(raw))
    missing = [s for s in ("fixed", "range_test", "final", "search", "space") if not doc.get(s)]
    if "fixed" in missing and not doc.get("smoke"):
        missing.append("smoke")  # a file with its own budgets and no smoke: keeps --smoke's refusal
    if not missing or not isinstance(doc.get("task"), Mapping):
        return doc, []
    notes: list[str] = []
    try:
        task = TaskConfig.from_dict(doc["task"], "task")
    except ConfigError:
        return doc, []  # parse_space names the key
    sizes = None
    if "fixed" in missing or "range_test" in missing or "search" in missing:
        sizes = _sizes(task)
        if sizes is None:
            notes.append(f"{task.dataset} could not be loaded here: the missing sections take sctune's static "
                         "defaults, not ones scaled to the data")
    fixed = dict(doc.get("fixed") or {})
    optimizer = fixed.get("optimizer", "sgd")
    if sizes is not None and "fixed" in missing and "val_frac" not in doc["task"]:
        n = sizes["train"] + sizes["val"] if task.train_subset is None else None
        if n is not None:
            frac = min(MAX_VAL_FRAC, max(task.val_frac, MIN_VAL / n))
            if frac > task.val_frac + 1e-9:
                frac = round(frac, 3)
                doc["task"] = dict(doc["task"]) | {"val_frac": frac}
                val = math.ceil(frac * n)
                sizes = {"train": n - val, "val": val}
                notes.append(f"task.val_frac: {frac:g} ({val} validation samples of {n}: at least {MIN_VAL} "
                             f"wanted to rank trials, at most {MAX_VAL_FRAC:.0%} held out)")
    if "fixed" in missing:
        if sizes is not None:
            n_train = sizes["train"]
            bs = min(BATCH_RANGE[1], max(BATCH_RANGE[0], _pow2_floor(n_train / TARGET_STEPS_PER_EPOCH)))
            steps = max(1, n_train // bs)
            epochs = min(EPOCH_RANGE[1], max(EPOCH_RANGE[0], math.ceil(TARGET_ITERATIONS / steps)))
            fixed = {"epochs": epochs, "batch_size": bs, "optimizer": "sgd", "schedule": "onecycle"}
            notes.append(f"fixed.batch_size: {bs} ({n_train} training samples: about {TARGET_STEPS_PER_EPOCH} "
                         f"steps per epoch, a power of two in [{BATCH_RANGE[0]}, {BATCH_RANGE[1]}])")
            notes.append(f"fixed.epochs: {epochs} ({steps} steps per epoch: about {TARGET_ITERATIONS} steps in "
                         f"all, within [{EPOCH_RANGE[0]}, {EPOCH_RANGE[1]}] epochs)")
        else:
            fixed = {}
        notes.append("fixed.optimizer: sgd, fixed.schedule: onecycle (the recipe: SGD with cyclical momentum)")
        doc["fixed"] = fixed
    if "range_test" in missing:
        try:
            base = TrainConfig.from_flat(fixed, "fixed")
        except ConfigError:
            return doc, notes  # parse_space names the key
        # An unknown model's LR scale is unknown: a geometric ramp over RAMP_DECADES decades reads all of them.
        # Smith's linear 0 -> 3 on wine's MLP diverged at LR 0.7 after 3 of its 8 evaluations (no bounds).
        # Adam's useful LRs sit two decades below SGD's (1e-3 where SGD takes 0.1).
        end = 3.0 if optimizer == "sgd" else 0.03
        rt: dict[str, Any] = {"start_lr": end / 10 ** RAMP_DECADES, "end_lr": end, "step_mode": "exp", "repeats": 1}
        if sizes is not None:
            wds = [1e-4, 1e-5] if sizes["train"] < MANY_SAMPLES else [1e-3, 1e-4, 1e-5]
            full = base.epochs * max(1, sizes["train"] // base.batch_size)
            # at most MAX_RANGE_ITERS: a test's length past that reads no more of the curve (an absurd epochs
            # value is then refused as fixed.epochs, the key the user wrote, not as a derived num_iter)
            num_iter = min(MAX_RANGE_ITERS, max(MIN_RANGE_ITERS, int(RANGE_TEST_FTE * full / len(wds))))
            # Each evaluation recomputes BatchNorm on recal_samples and reads eval_samples: together at most
            # EVAL_SHARE of the test's training work (a step ~ 3 forward passes of a batch). On 400 digits
            # with 400 + 216 samples per evaluation, 20 evaluations made stage 1 cost 2.6 FTE, measured.
            per_eval = max(2 * MIN_EVAL_SAMPLES, int(EVAL_SHARE * 3 * num_iter * base.batch_size / RANGE_TEST_EVALS))
            rt |= {"num_iter": num_iter, "eval_every": max(1, num_iter // RANGE_TEST_EVALS),
                   "recal_samples": min(512, sizes["train"], per_eval // 2),
                   "eval_samples": min(2048, per_eval // 2), "weight_decays": wds}
            notes.append(f"range_test: {len(wds)} tests (weight decays {', '.join(f'{w:g}' for w in wds)}, one seed "
                         f"each) x {num_iter} steps, LR {rt['start_lr']:g} -> {rt['end_lr']:g} (geometric), "
                         f"{num_iter // rt['eval_every']} evaluations "
                         f"each: {RANGE_TEST_FTE:g} of one training's {full} steps (stage 1 under 1 FTE measured)")
        else:
            notes.append(f"range_test: LR {rt['start_lr']:g} -> {rt['end_lr']:g} (geometric), other settings "
                         "sctune's defaults")
        doc["range_test"] = rt
    if "final" in missing:
        doc["final"] = {"seeds": 3}
        notes.append("final.seeds: 3 (the recommendation's accuracy is a mean +- std over 3 seeds)")
        val_frac = float(doc["task"].get("val_frac", TaskConfig().val_frac))
        if val_frac >= REFIT_VAL_FRAC:
            doc["final"]["refit"] = True
            notes.append(f"final.refit: true (validation holds {val_frac:.0%} of the training data: once the search "
                         "has picked, the final fit trains on train + validation, as many iterations as a trial; "
                         "the test split stays held out)")
    if "search" in missing:
        doc["search"] = {}
        notes.append("search: sctune's defaults (Smith's recipe point in full, then complete one-cycles from 1/8 of the "
                     "training up, the best promoted)")
        if sizes is not None and sizes["val"] < LOSS_RANKS_BELOW:
            doc["search"] |= {"metric": "val/loss", "mode": "min"}
            notes.append(f"search.metric: val/loss, mode: min ({sizes['val']} validation samples: accuracy moves "
                         f"in steps of {100 / sizes['val']:.1f} points and trials tie; the loss ranks them)")
    if "space" in missing:
        doc["space"] = copy.deepcopy(DEFAULT_SPACE)
        notes.append("space: max_lr in [bound/10, bound] (log, from stage 1), div_factor in [3, 20] (log), "
                     "weight_decay in [prior/1000, prior x 10] (log, from stage 1), dropout in [0, 0.3]")
    if "smoke" in missing:
        epochs = int(doc["fixed"].get("epochs", TrainConfig().epochs))
        doc["smoke"] = {"fixed": {"epochs": max(2, epochs // 4)}, "search": {"num_samples": 4},
                        "final": {"seeds": 2}}
        rt = doc["range_test"]
        if "num_iter" in rt and "range_test" in missing:  # the range test shrinks with the smoke run's FTE
            n = max(MIN_RANGE_ITERS, rt["num_iter"] * max(2, epochs // 4) // epochs)
            doc["smoke"]["range_test"] = {"num_iter": n, "eval_every": max(1, n // RANGE_TEST_EVALS)}
        notes.append(f"smoke: (--smoke) {max(2, epochs // 4)} epochs, 4 trials, 2 final seeds")
    log.info("%s: filled %s", file, ", ".join(missing))
    return doc, notes


# What each schedule reads from the training config (schedules.build_schedule); any other schedule
# parameter is overwritten or ignored by it: one-cycle sets the LR from max_lr and the momentum from
# max/min_momentum, so a searched ``lr`` under one-cycle would spend trials on a value that is never used.
SCHEDULE_PARAMS = {
    "onecycle": {"max_lr", "div_factor", "cycle_frac", "annihilation_factor", "max_momentum", "min_momentum",
                 "cycle_momentum"},
    "piecewise": {"lr", "milestones_frac", "gamma", "momentum"},
    "clr": {"lr", "clr_max_lr", "clr_step_epochs", "clr_mode", "momentum"},
    "constant": {"lr", "momentum"},
}


def unused_by_schedule(schedule: str, names) -> list[str]:
    """The schedule parameters among ``names`` that ``schedule`` never reads."""
    every = set().union(*SCHEDULE_PARAMS.values())
    return [n for n in names if n in every and n not in SCHEDULE_PARAMS[schedule]]
