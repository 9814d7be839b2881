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
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ray import tune

from . import tensorboard as tb
from .config import RangeTestConfig, TaskConfig, TrainConfig
from .data import DatasetSplits, load_dataset
from .range_test import run_range_test
from .train import TEST_ACC, VAL_ACC, VAL_ACC_BEST, fit

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


@functools.lru_cache(maxsize=2)
def cached_dataset(task: TaskConfig) -> DatasetSplits:
    """Datasets load once per worker process; with reuse_actors the next trial gets them free."""
    return load_dataset(task)


def _threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))


def _node_id() -> str | None:
    """Id of the Ray node running this trial (a hex string; None outside Ray). Reported with every
    result as ``node_id`` so summary.csv and bounds.json show where each trial ran."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # never let bookkeeping break a trial
        return None


# -- test-only fault injection ---------------------------------------------------------------

FAULT_ENV = "SCTUNE_FAULT_INJECT"


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook (``SCTUNE_FAULT_INJECT``)."""


def _fault_rules(stage: str) -> list[dict[str, str]]:
    """Parse ``SCTUNE_FAULT_INJECT``: rules ``STAGE[:key=value...]`` separated by ``;``.

    Test-only; inert unless the variable is set (worker processes inherit it from the driver).
    Keys: ``epoch=N`` fire after epoch N's checkpoint was reported (a range test has one "epoch", fired
    before its report); ``once=PATH`` fire only for whoever creates PATH first (O_EXCL; the trial id is
    written into it), so exactly one fault happens across trials and retries; ``action=raise`` (default,
    an exception in the trial) or ``exit`` (the worker process dies: ``os._exit``); ``delay=S`` sleep S
    seconds after every epoch (slow trials, for tests that act while trials run). Example:
    ``SCTUNE_FAULT_INJECT="search:epoch=2:once=/tmp/m;search:delay=0.5"``.
    """
    spec = os.environ.get(FAULT_ENV, "").strip()
    rules = []
    for text in filter(None, (r.strip() for r in spec.split(";"))):
        head, *pairs = text.split(":")
        rule = {"stage": head.strip()}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in ("epoch", "once", "action", "delay"):
                raise ValueError(f"{FAULT_ENV}: bad item {pair!r} in rule {text!r} "
                                 "(keys: epoch, once, action, delay)")
            rule[key] = value
        if rule["stage"] == stage:
            rules.append(rule)
    return rules


def _inject_fault(stage: str, epoch: int, trial_id: str) -> None:
    """The fault hook, called once per reported epoch; a no-op unless ``SCTUNE_FAULT_INJECT`` is set."""
    if FAULT_ENV not in os.environ:
        return
    for rule in _fault_rules(stage):
        if "delay" in rule:
            time.sleep(float(rule["delay"]))
        if "epoch" not in rule or int(rule["epoch"]) != epoch:
            continue
        if "once" in rule:
            try:
                fd = os.open(rule["once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, trial_id.encode())
            os.close(fd)
        log.warning("%s: injecting a fault into trial %s at epoch %d", FAULT_ENV, trial_id, epoch)
        if rule.get("action", "raise") == "exit":
            os._exit(17)
        raise InjectedFault(f"{FAULT_ENV}: injected fault in {stage} trial {trial_id} at epoch {epoch}")


def range_test_trainable(config: dict[str, Any], *, train: dict[str, Any], range_test: dict[str, Any],
                         tb_logdir: str | None, cpus: float = 1.0) -> None:
    _threads(cpus)
    train_cfg = TrainConfig.from_flat(train)
    rt_cfg = RangeTestConfig.from_dict(range_test)
    wd, seed = float(config["weight_decay"]), int(config["seed"])
    result = run_range_test(train_cfg, rt_cfg, weight_decay=wd, seed=seed, data=cached_dataset(train_cfg.task))
    bounds = result.bounds()
    _inject_fault("range", 1, tune.get_context().get_trial_id() or "local")
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
        "node_id": _node_id(),
        # the per-step curve travels with the result so the driver needs no shared filesystem
        "curve": {c: [None if not math.isfinite(v) else float(v) for v in frame[c]] for c in frame.columns},
    })


def load_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The training state in a trial checkpoint folder. ``weights_only=True``: tensors and plain Python
    types only; a checkpoint holding any other pickled object is refused (``pickle.UnpicklingError``)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _load_state(checkpoint: tune.Checkpoint, problems: list[str] | None = None) -> dict[str, Any] | None:
    """The state of the checkpoint Tune hands back; if that one is unusable (missing, truncated, refused),
    the newest other checkpoint of the same trial that is usable (Tune keeps two); None if there is none,
    and the trial starts over. What was unusable, and what was used instead, is appended to ``problems``."""
    problems = problems if problems is not None else []
    try:
        with checkpoint.as_directory() as d:
            return load_checkpoint_state(d)
    except Exception as e:
        log.warning("checkpoint %s is unusable (%s: %s)", checkpoint.path, type(e).__name__, e)
        problems.append(f"{Path(checkpoint.path) / CHECKPOINT_FILE} unreadable ({type(e).__name__})")
    here = Path(checkpoint.path)
    others = sorted((p for p in here.parent.glob("checkpoint_*") if p.name != here.name), reverse=True) \
        if here.parent.is_dir() else []
    for path in others:
        try:
            state = load_checkpoint_state(path)
        except Exception as e:
            log.warning("checkpoint %s is unusable too (%s: %s)", path, type(e).__name__, e)
            continue
        log.warning("continuing from the previous good checkpoint %s (epoch %d)", path, state["epoch"])
        problems.append(f"resumed from {path.name} (epoch {state['epoch']})")
        return state
    log.warning("no usable checkpoint left: the trial starts over from epoch 0")
    problems.append("no usable checkpoint left: restarted from epoch 0")
    return None


def onecycle_trainable(config: dict[str, Any], *, base: dict[str, Any], tb_logdir: str | None,
                       stage: str = "search", hparam_keys: tuple[str, ...] = (), cpus: float = 1.0) -> None:
    """Train ``base`` + ``config`` (the sampled parameters); ``stage`` is search or final."""
    _threads(cpus)
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = TrainConfig.from_flat({**base, **params})
    data = cached_dataset(cfg.task)
    checkpoint = tune.get_checkpoint()
    problems: list[str] = []
    state = _load_state(checkpoint, problems) if checkpoint else None
    # a damaged checkpoint is named in every report of this run of the trial (the driver prints it once)
    recovered = {"checkpoint_recovered": "; ".join(problems)} if problems else {}
    if state is not None:
        log.info("resuming from the checkpoint of epoch %d", state["epoch"])
    trial_id = tune.get_context().get_trial_id() or "local"
    name = tb.run_name("final", seed=cfg.seed) if stage == "final" else tb.run_name("search", trial=trial_id)
    # the final fit trains the best searched values (in ``base``): list them as its hparams too
    shown = {k: cfg.to_flat()[k] for k in hparam_keys} | params
    hparams = {k: v for k, v in shown.items() if isinstance(v, (int, float, str, bool))}
    logger = tb.TrialLogger(tb_logdir, name, hparams=hparams | {"stage": stage}) if tb_logdir else None
    if logger is not None and state is not None:
        logger._seen_step(int(state["epoch"]))  # a resumed run's final metrics go to its last epoch, not step 0
    best = {"v": max((h[VAL_ACC] for h in state["history"]), default=-math.inf) if state else -math.inf}
    node_id = _node_id()  # once per trial; not a scalar, so it goes to Tune only, never to TensorBoard

    def on_epoch(metrics: dict[str, float], state_fn) -> bool:
        epoch = int(metrics["epoch"])
        if math.isfinite(metrics[VAL_ACC]):
            best["v"] = max(best["v"], metrics[VAL_ACC])
        report = dict(metrics) | {VAL_ACC_BEST: best["v"]}
        if logger is not None:
            logger.scalars({k: v for k, v in report.items() if k not in ("epoch", "diverged")}, epoch)
        with tempfile.TemporaryDirectory() as d:
            torch.save(state_fn(), Path(d) / CHECKPOINT_FILE)
            tune.report(report | {"node_id": node_id} | recovered, checkpoint=tune.Checkpoint.from_directory(d))
        _inject_fault(stage, epoch, trial_id)
        return False

    try:
        result = fit(cfg, data=data, on_epoch=on_epoch, state=state, test_at_end=stage == "final")
    except BaseException:
        if logger is not None:
            # No session end here: Tune may retry the trial from its checkpoint (the retry continues this
            # run), and TensorBoard keeps the first session end. The driver ends the session when the trial
            # errors for good or the scheduler stops it (StageProgress).
            logger.close()
        raise
    if logger is not None:
        logger.end("failure" if result.diverged else "success",
                   {k: v for k, v in result.final.items() if k in (VAL_ACC, TEST_ACC)})
        logger.close()
