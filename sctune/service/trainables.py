"""Ray Tune trainables: what runs inside a trial, and the driver-side end of its TensorBoard run.

* ``range_test_trainable``: one LR range test (one weight decay, one seed); reports its curve and
  bounds once, at the end, and logs the curve to TensorBoard.
* ``train_trial``: one training run of a ``TrainConfig`` built from the base config plus
  the sampled parameters; reports and checkpoints every epoch, resumes from its checkpoint on
  retry, and writes its TensorBoard run (HParams session from the first moment).
* ``TensorBoardSessions``: a Tune callback (in the driver) that ends each search/final trial's HParams session.
* ``trial_hook``: an optional callback both call once per reported epoch, named by ``SCTUNE_TRIAL_HOOK``
  (the fault tests inject their faults through it).

Ray is called once per epoch (report + checkpoint), never inside the per-step loop.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ray import tune

from ..core.config import RangeTestConfig, TaskConfig, TrainConfig
from ..core.data import DatasetSplits, load_dataset
from ..core.range_test import run_range_test
from ..core.schedules import schedule_phase
from ..core.tasks import install
from ..core.train import PHASE, TEST_ACC, VAL_ACC, fit, tail_key, tail_mean
from ..present import tensorboard as tb

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


class TrialSetupError(RuntimeError):
    """A trial could not set up in its worker (its task's code, its data): every trial would fail the same
    way, so the driver stops the stage at the first one (``storage.StorageWatch``) instead of retrying."""


def _setup(task: TaskConfig, user_task: dict | None) -> DatasetSplits:
    try:
        install(task, user_task)
        return cached_dataset(task)
    except Exception as e:
        raise TrialSetupError(f"{type(e).__name__}: {e}") from e


RESTART_NOTE = "RESTARTED.txt"


def note_restart(run_dir: Path) -> None:
    """A trial starting from scratch whose TensorBoard run (or Tune folder) already holds an earlier attempt's
    records (a range test or a trial without a usable checkpoint, after the driver was killed): a note in
    both says so, since TensorBoard shows the two attempts' points in one run."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return
    import time

    text = (f"{time.strftime('%Y-%m-%d %H:%M:%S')}: this trial started again from scratch (no usable checkpoint; "
            "e.g. the driver was killed while it ran). The records before this time are an earlier attempt's; "
            "where both logged a step, the later event file holds this attempt's value.\n")
    dirs = [run_dir]
    try:
        trial_dir = tune.get_context().get_trial_dir()
        if trial_dir:
            dirs.append(Path(trial_dir))
    except Exception:  # outside Tune
        pass
    for d in dirs:
        try:
            with open(d / RESTART_NOTE, "a") as f:
                f.write(text)
        except OSError as e:  # a note must never fail the trial
            log.warning("could not write %s: %s", d / RESTART_NOTE, e)
    log.warning("trial restarted from scratch; its earlier attempt's TensorBoard records stay in %s (%s)",
                run_dir, RESTART_NOTE)


# -- the trial hook ---------------------------------------------------------------------------

HOOK_ENV = "SCTUNE_TRIAL_HOOK"
TrialHook = Callable[[str, int, str], None]


def trial_hook() -> TrialHook | None:
    """The function ``SCTUNE_TRIAL_HOOK`` names as ``module:function``; None when the variable is unset.

    A trial calls it as ``hook(stage, epoch, trial_id)``: search and final trials after each epoch's report
    and checkpoint, a range test once (epoch 1) just before its only report. What it raises fails the trial
    like any error. It runs in the worker, which gets the variable from the environment Ray starts it with,
    so the module must be importable there (PYTHONPATH). The fault tests use it to raise, kill the worker
    or slow epochs down (tests/fault_util.py).
    """
    spec = os.environ.get(HOOK_ENV, "").strip()
    if not spec:
        return None
    module, sep, name = spec.partition(":")
    if not (sep and module and name):
        raise ValueError(f"{HOOK_ENV} must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def range_test_trainable(config: dict[str, Any], *, train: dict[str, Any], range_test: dict[str, Any],
                         tb_logdir: str | None, cpus: float = 1.0, user_task: dict | None = None) -> None:
    """``user_task``: the driver's own dataset/model registrations (``sctune.core.tasks.registrations``)."""
    _threads(cpus)
    train_cfg = TrainConfig.from_flat(train)
    data = _setup(train_cfg.task, user_task)
    rt_cfg = RangeTestConfig.from_dict(range_test)
    wd, seed = float(config["weight_decay"]), int(config["seed"])
    result = run_range_test(train_cfg, rt_cfg, weight_decay=wd, seed=seed, data=data)
    bounds = result.bounds()
    hook = trial_hook()
    if hook is not None:
        hook("range", 1, tune.get_context().get_trial_id() or "local")
    if tb_logdir:
        name = tb.run_name("range", wd=wd, seed=seed)
        note_restart(Path(tb_logdir) / name)
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
        "cost_fte": result.cost_fte,  # measured: steps and eval time against one full training
        "node_id": _node_id(),
        # the per-step curve travels with the result so the driver needs no shared filesystem
        "curve": {c: [None if not math.isfinite(v) else float(v) for v in frame[c]] for c in frame.columns},
    })


def load_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The training state in a trial checkpoint folder. ``weights_only=True``: tensors and plain Python
    types only; a checkpoint holding any other pickled object is refused (``pickle.UnpicklingError``)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def load_trial_state(checkpoint: tune.Checkpoint, problems: list[str] | None = None) -> dict[str, Any] | None:
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


def train_trial(config: dict[str, Any], *, base: dict[str, Any], tb_logdir: str | None,
                       stage: str = "search", hparam_keys: tuple[str, ...] = (), cpus: float = 1.0,
                       user_task: dict | None = None, select_metric: str = VAL_ACC,
                       select_last: int = 3) -> None:
    """Train ``base`` + ``config`` (the sampled parameters); ``stage`` is search or final.

    Every epoch reports the metrics of ``fit``, ``PHASE`` (ASHA's time axis) and
    ``tail_key(select_metric)``: the mean of the last ``select_last`` evaluations, the score trials are
    pruned and ranked by."""
    _threads(cpus)
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = TrainConfig.from_flat({**base, **params})
    data = _setup(cfg.task, user_task)
    checkpoint = tune.get_checkpoint()
    problems: list[str] = []
    state = load_trial_state(checkpoint, problems) if checkpoint else None
    # a damaged checkpoint is named in every report of this run of the trial (the driver prints it once)
    recovered = {"checkpoint_recovered": "; ".join(problems)} if problems else {}
    if state is not None:
        log.info("resuming from the checkpoint of epoch %d", state["epoch"])
    trial_id = tune.get_context().get_trial_id() or "local"
    name = tb.run_name("final", seed=cfg.seed) if stage == "final" else tb.run_name("search", trial=trial_id)
    # the final fit trains the best searched values (in ``base``): list them as its hparams too
    shown = {k: cfg.to_flat()[k] for k in hparam_keys} | params
    hparams = {k: v for k, v in shown.items() if isinstance(v, (int, float, str, bool))}
    if tb_logdir and state is None:
        note_restart(Path(tb_logdir) / name)
    logger = tb.TrialLogger(tb_logdir, name, hparams=hparams | {"stage": stage}) if tb_logdir else None
    # the keys logged at each step: the session's final metrics are not written again at the same step
    # (and epochs a run before a kill logged beyond the checkpoint Tune recorded are not logged again)
    logged: dict[int, set[str]] = tb.logged_scalars(Path(tb_logdir) / name) if tb_logdir else {}
    if logger is not None and state is not None:
        logger._seen_step(int(state["epoch"]))  # a resumed run's final metrics go to its last epoch, not step 0
        if state["history"]:  # logged by the run that wrote the checkpoint
            logged[int(state["epoch"])] = set(state["history"][-1]) | {tail_key(select_metric)}
    seen = [h.get(select_metric, math.nan) for h in state["history"]] if state else []
    node_id = _node_id()  # once per trial; not a scalar, so it goes to Tune only, never to TensorBoard
    hook = trial_hook()

    reported: list[int] = []

    def on_epoch(metrics: dict[str, float], state_fn, *, again: bool = False) -> bool:
        epoch = int(metrics["epoch"])
        if not again:
            seen.append(metrics.get(select_metric, math.nan))
        report = dict(metrics) | {tail_key(select_metric): tail_mean(seen, select_last),
                                  PHASE: schedule_phase(cfg, epoch / cfg.epochs)}
        if logger is not None and not again and epoch not in logged:  # a resumed trial's epoch: logged already
            shown = {k: v for k, v in report.items() if k not in ("epoch", "diverged", PHASE)}
            logger.scalars(shown, epoch)
            logged[epoch] = set(shown)
        with tempfile.TemporaryDirectory() as d:
            torch.save(state_fn(), Path(d) / CHECKPOINT_FILE)
            tune.report(report | {"node_id": node_id} | recovered, checkpoint=tune.Checkpoint.from_directory(d))
        reported.append(epoch)
        if hook is not None and not again:
            hook(stage, epoch, trial_id)
        return False

    try:
        result = fit(cfg, data=data, on_epoch=on_epoch, state=state, test_at_end=stage == "final")
        if not reported and state is not None and state["history"]:
            # Resumed from a checkpoint of the run's last epoch (the trial finished just before the driver
            # died, and Tune's saved state still held an older result; load_trial_state fell back to the newest
            # good checkpoint): nothing is left to train. Its last epoch is reported again, unchanged, so
            # Tune's last result is the finished run's, not the older one (which would read as pruned).
            on_epoch(dict(state["history"][-1]), lambda: state, again=True)
    except BaseException:
        if logger is not None:
            # No session end here: Tune may retry the trial from its checkpoint (the retry continues this
            # run), and TensorBoard keeps the first session end. The driver ends the session when the trial
            # errors for good or the scheduler stops it (TensorBoardSessions).
            logger.close()
        raise
    if logger is not None:
        final = ({k: v for k, v in result.final.items() if k in (VAL_ACC, TEST_ACC)}
                 | ({tail_key(select_metric): tail_mean(seen, select_last)} if seen else {}))
        done = logged.get(logger.last_step if logger.last_step is not None else 0, set())
        logger.end("failure" if result.diverged else "success", {k: v for k, v in final.items() if k not in done})
        logger.close()


# -- the driver's side of the trials' TensorBoard runs -----------------------------------------

class TensorBoardSessions(tune.Callback):
    """Ends the HParams session of every search and final trial as Tune finishes it.

    A trial the scheduler stops at its last report (ASHA at max_t) never gets to write its own end, and a
    trial that errored cannot: the driver writes it. A no-op when the trial did write one (the first session
    end wins). Status: failure (diverged or errored), aborted (pruned), success.
    """

    def __init__(self, stage: str, tb_logdir: str | Path, *, epochs: int | None):
        self.stage, self.tb_logdir, self.epochs = stage, Path(tb_logdir), epochs

    def on_trial_complete(self, iteration, trials, trial, **info):
        from .summaries import is_pruned

        last = trial.last_result or {}
        epochs = (trial.config or {}).get("epochs", self.epochs)  # a halving rung's own schedule length
        status = "failure" if last.get("diverged") else ("aborted" if is_pruned(last, epochs) else "success")
        self._end(trial, status)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "failure")

    def _end(self, trial, status: str) -> None:
        name = (tb.run_name("search", trial=trial.trial_id) if self.stage == "search"
                else tb.run_name("final", seed=(trial.config or {}).get("seed")))
        try:
            tb.end_session(self.tb_logdir, name, status=status)
        except Exception as e:  # TensorBoard bookkeeping must never break the search
            log.warning("could not close the TensorBoard session of %s: %s", trial.trial_id, e)
