"""Ray Tune trainables: the only place the core meets ``ray.tune``.

* ``range_test_trainable``: one LR range test (one weight decay, one seed); reports its curve and
  bounds once, at the end, and logs the curve to TensorBoard.
* ``onecycle_trainable``: one training run of a ``TrainConfig`` built from the base config plus
  the sampled parameters; reports and checkpoints every epoch, resumes from its checkpoint on
  retry, and writes its TensorBoard run (HParams session from the first moment).

Ray is called once per epoch (report + checkpoint), never inside the per-step loop.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from . import tensorboard as tb
from .config import RangeTestConfig, TaskConfig, TrainConfig
from .data import DatasetSplits, load_dataset
from .range_test import run_range_test
from .train import TEST_ACC, VAL_ACC, fit

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
BEST_SO_FAR = "val/acc_best"


@functools.lru_cache(maxsize=2)
def cached_dataset(task: TaskConfig) -> DatasetSplits:
    """Datasets load once per worker process; with reuse_actors the next trial gets them free."""
    return load_dataset(task)


def _threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))


def range_test_trainable(config: dict[str, Any], *, train: dict[str, Any], range_test: dict[str, Any],
                         tb_logdir: str | None, cpus: float = 1.0) -> None:
    _threads(cpus)
    train_cfg = TrainConfig.from_flat(train)
    rt_cfg = RangeTestConfig.from_dict(range_test)
    wd, seed = float(config["weight_decay"]), int(config["seed"])
    result = run_range_test(train_cfg, rt_cfg, weight_decay=wd, seed=seed, data=cached_dataset(train_cfg.task))
    bounds = result.bounds()
    if tb_logdir:
        name = tb.run_name("range", wd=wd, seed=seed)
        with tb.TrialLogger(tb_logdir, name, hparams={"weight_decay": wd, "seed": seed, "stage": "range"},
                            group=tb.run_name("range", wd=wd)) as logger:
            tb.log_range_test(logger, result.frame, bounds, log_x=rt_cfg.step_mode == "exp")
            logger.end("success", {"range_test/peak_acc": bounds.peak_acc})
    frame = result.frame
    tune.report({
        "weight_decay": wd,
        "seed": seed,
        "status": bounds.status,
        "max_lr": bounds.max_lr if bounds.max_lr is not None else math.nan,
        "min_lr": bounds.min_lr if bounds.min_lr is not None else math.nan,
        "stop_reason": result.stop_reason,
        "steps": len(frame),
        # the per-step curve travels with the result so the driver needs no shared filesystem
        "curve": {c: [None if not math.isfinite(v) else float(v) for v in frame[c]] for c in frame.columns},
    })


def _load_state(checkpoint: tune.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def onecycle_trainable(config: dict[str, Any], *, base: dict[str, Any], tb_logdir: str | None,
                       stage: str = "search", cpus: float = 1.0) -> None:
    """Train ``base`` + ``config`` (the sampled parameters); ``stage`` is search or final."""
    _threads(cpus)
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = TrainConfig.from_flat({**base, **params})
    data = cached_dataset(cfg.task)
    checkpoint = tune.get_checkpoint()
    state = _load_state(checkpoint) if checkpoint else None
    if state is not None:
        log.info("resuming from the checkpoint of epoch %d", state["epoch"])
    trial_id = tune.get_context().get_trial_id() or "local"
    name = tb.run_name("final", seed=cfg.seed) if stage == "final" else tb.run_name("search", trial=trial_id)
    hparams = {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))}
    logger = tb.TrialLogger(tb_logdir, name, hparams=hparams | {"stage": stage}) if tb_logdir else None
    best = {"v": max((h[VAL_ACC] for h in state["history"]), default=-math.inf) if state else -math.inf}

    def on_epoch(metrics: dict[str, float], state_fn) -> bool:
        epoch = int(metrics["epoch"])
        if math.isfinite(metrics[VAL_ACC]):
            best["v"] = max(best["v"], metrics[VAL_ACC])
        report = dict(metrics) | {BEST_SO_FAR: best["v"]}
        if logger is not None:
            logger.scalars({k: v for k, v in report.items() if k not in ("epoch", "diverged")}, epoch)
        with tempfile.TemporaryDirectory() as d:
            torch.save(state_fn(), Path(d) / CHECKPOINT_FILE)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
        return False

    try:
        result = fit(cfg, data=data, on_epoch=on_epoch, state=state, test_at_end=stage == "final")
    except BaseException:
        if logger is not None:
            logger.end("failure")
            logger.close()
        raise
    if logger is not None:
        logger.end("failure" if result.diverged else "success",
                   {k: v for k, v in result.final.items() if k in (VAL_ACC, TEST_ACC)})
        logger.close()
