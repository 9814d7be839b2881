"""The three stages on Ray Tune, plus their on-disk outputs.

1. ``run_range_stage``: range tests in parallel as Tune trials, a grid of weight decays x seeds;
   bounds per WD aggregated over seeds; the WD prior is the one that lets the LR go highest.
2. ``run_search_stage``: ``Tuner`` + ``OptunaSearch`` (multivariate TPE, seeded, Smith's recipe as
   the first point) + ASHA with its first rung after every trial's LR peak.
3. ``run_final_stage``: the best configuration retrained over several seeds, tested once.

Layout of ``<storage-path>/<name>/``::

    state.json                  stages done, options, spec (for --resume)
    space.yaml                  the search-space file as run
    range_test/bounds.json      per-WD bounds + spread + status, verdict, chosen prior
    range_test/curves.csv       every range-test curve (wd, seed, step, lr, loss, smooth_loss, acc, val_loss)
    range_test/range_test.png   accuracy and loss vs LR per WD, bounds marked
    summary.csv                 one row per search trial
    best.json                   best configuration + final-fit results
    report.md                   readable summary with the plots
    tensorboard/                one logdir, a run per trial
    ray/<stage>/                Ray Tune's own experiment state (checkpoints, searcher state)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import tensorboard as tb
from .bounds import (
    LRBounds,
    aggregate_bounds,
    bounds_from_frame,
    bounds_kwargs,
    choose_weight_decay,
    jsonable,
    recipe_max_lr,
)
from .lifecycle import GUARD, Interrupted, interrupted_message
from .space import Anchors, SpaceSpec, recipe_point, resolve, rung_plan, to_optuna
from .tasks import registrations
from .train import TEST_ACC, VAL_ACC, tail_key

log = logging.getLogger(__name__)

STAGES = ("range", "search", "final")
_ACTIVE: dict[str, Any] = {}  # the progress callback of the stage running now (the restored one on --resume)


def active_progress() -> StageProgress | None:
    return _ACTIVE.get("progress")


class StageError(RuntimeError):
    """A stage cannot go on (e.g. no usable LR bounds); the message says what to do."""


@dataclass(frozen=True)
class ExperimentPaths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def range_dir(self) -> Path:
        return self.root / "range_test"

    @property
    def tensorboard(self) -> Path:
        return tb.experiment_logdir(self.root)

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    def ray_stage(self, stage: str) -> Path:
        return self.ray / stage


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    """Atomic write: a crash mid-write leaves the previous file, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


clean = jsonable  # NaN/inf -> None recursively, numpy scalars -> Python: strict JSON


# -- progress ----------------------------------------------------------------------------------

def error_line(err: Any) -> str | None:
    """Why a trial failed, in one line: the exception raised in the trial (``ConfigError: task.dataset: ...``),
    not Ray's wrapping of it (``RayTaskError(...)`` with the worker's traceback). None for no error."""
    if err is None:
        return None
    for _ in range(5):  # RayTaskError / TuneError -> the exception the trial raised
        cause = getattr(err, "cause", None)
        if cause is None or cause is err:
            break
        err = cause
    if isinstance(err, str):  # Tune's text trace: its last line names the exception
        lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else "unknown error"
    else:
        name = type(err).__name__
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        text = f"{name}: {first}" if first else name
    return text if len(text) <= 300 else text[:297] + "..."


def _callback_base():
    from ray.tune import Callback

    return Callback


class StageProgress(_callback_base()):
    """Compact live progress on stderr, and HParams session ends for trials that cannot write them.

    One line per change: ``[search] 7/16 done (2 pruned, 0 errored) | 2 running | best val/acc_tail 0.986 |
    FTE 5.2/8``. The best value is offered only by trials that ran to the end (``epochs``), so the line shows
    the number trials are selected by, never an intermediate epoch's. ``fte``: (spent before this stage,
    the experiment's budget or None, FTE per unit of this stage's trials: per epoch, or per range-test step).
    """

    def __init__(self, stage: str, total: int | None, *, metric: str, mode: str, epochs: int | None,
                 tb_logdir: Path | None, quiet: bool = False,
                 fte: tuple[float, float | None, float | None] | None = None):
        self.stage, self.total, self.metric, self.mode, self.epochs = stage, total, metric, mode, epochs
        self.tb_logdir, self.quiet = tb_logdir, quiet
        self.fte_offset, self.fte_budget, self.fte_unit = fte if fte is not None else (0.0, None, None)
        self.units: dict[str, float] = {}  # trial id -> epochs (or range-test steps) it ran
        self.done = self.pruned = self.errored = self.running = 0
        self.best: float | None = None
        self._last_line = ""
        self._errors_shown: set[str] = set()
        self._t0 = time.monotonic()

    def setup(self, **info):
        # Called at the start of every fit, a restored one too (Tune unpickles this callback with the
        # tuner, old clock included): restart the clock; counts are rebuilt from the trials.
        self._t0 = time.monotonic()
        self._last_line = ""
        self.recovered = set()
        _ACTIVE["progress"] = self

    def on_step_begin(self, iteration, trials, **info):
        # An interrupt (SIGINT/SIGTERM, see lifecycle) asks Tune's loop to stop the way its own Ctrl-C does.
        GUARD.poke_tune()

    def _pruned(self, trial) -> bool:
        last = trial.last_result or {}
        return (self.epochs is not None and not last.get("diverged")
                and int(last.get("epoch", 0) or 0) < self.epochs)

    def _recount(self, trials, finished=None, errored: bool = False, started=None) -> None:
        """Counts from the trials' states (so a resumed stage counts what finished before the kill)."""
        def state(t):
            if t is finished:
                return "ERROR" if errored else "TERMINATED"
            if t is started:  # Tune calls on_trial_start just before it marks the trial RUNNING
                return "RUNNING"
            return t.status

        states = [(t, state(t)) for t in trials]
        for t, _ in states:  # a resumed stage counts the compute of trials that ran before the kill
            self._count(t, t.last_result or {})
        self.done = sum(st in ("TERMINATED", "ERROR") for _, st in states)
        self.errored = sum(st == "ERROR" for _, st in states)
        self.pruned = sum(st == "TERMINATED" and self._pruned(t) for t, st in states)
        self.running = sum(st == "RUNNING" for t, st in states if t is not finished)
        for t, st in states:
            if st == "TERMINATED" and self.metric:
                self._offer(t.last_result or {})

    def _offer(self, result: dict) -> bool:
        v = result.get(self.metric)
        if self.epochs is not None and int(result.get("epoch", 0) or 0) < self.epochs:
            return False  # a trial still running (or pruned): not comparable with a finished one
        if isinstance(v, (int, float)) and math.isfinite(v) and not result.get("diverged"):
            if self.best is None or (v > self.best if self.mode == "max" else v < self.best):
                self.best = float(v)
                return True
        return False

    def _count(self, trial, result: dict) -> None:
        key = "steps" if self.stage == "range" else "epoch"
        v = result.get(key)
        cost = result.get("cost_fte")  # a range test's own measured cost (stage 1 reports it), in FTE
        if self.stage == "range" and self.fte_unit and isinstance(cost, (int, float)) and math.isfinite(cost):
            v = cost / self.fte_unit
        if isinstance(v, (int, float)) and math.isfinite(v):
            self.units[trial.trial_id] = max(self.units.get(trial.trial_id, 0.0), float(v))

    @property
    def fte_spent(self) -> float | None:
        """FTE spent so far by the experiment (earlier stages + this one's trials)."""
        if self.fte_unit is None:
            return None
        return self.fte_offset + self.fte_unit * sum(self.units.values())

    def _print(self) -> None:
        best = f" | best {self.metric} {self.best:.4f}" if self.best is not None and self.metric else ""
        n_rec = len(getattr(self, "recovered", ()))
        rec = f", {n_rec} resumed from an older checkpoint" if n_rec else ""
        extra = f" ({self.pruned} pruned, {self.errored} errored{rec})" if self.stage == "search" else (
            f" ({self.errored} errored{rec})" if self.errored or n_rec else "")
        spent = self.fte_spent
        fte = "" if spent is None else (f" | FTE {spent:.2f}/{self.fte_budget:g}" if self.fte_budget is not None
                                        else f" | FTE {spent:.2f}")
        total = self.total if self.total is not None else "?"
        line = (f"[{self.stage}] {self.done}/{total} done{extra} | {self.running} running{best}{fte} "
                f"| {time.monotonic() - self._t0:.0f}s")
        if line != self._last_line and not self.quiet:
            print(line, file=sys.stderr, flush=True)
            self._last_line = line

    def on_trial_start(self, iteration, trials, trial, **info):
        self._recount(trials, started=trial)
        self._print()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        note = result.get("checkpoint_recovered")
        recovered = getattr(self, "recovered", None)
        if note and recovered is not None and trial.trial_id not in recovered:
            recovered.add(trial.trial_id)
            if not self.quiet:
                print(f"[{self.stage}] trial {trial.trial_id}: damaged checkpoint: {note}", file=sys.stderr, flush=True)
            self._print()
        before = self.fte_spent
        self._count(trial, result)
        # a line per new best, and per half FTE spent (a 200-epoch trial reports 200 times)
        if (self.metric and self._offer(result)) or (
                self.stage != "range"  # a range test reports once, as it completes: that line follows
                and before is not None and math.floor(2 * self.fte_spent) > math.floor(2 * before)):
            self._print()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._count(trial, trial.last_result or {})
        self._recount(trials, finished=trial)
        last = trial.last_result or {}
        if last.get("diverged"):
            status = "failure"
        elif self._pruned(trial):
            status = "aborted"
        else:
            status = "success"
        # Every session is closed here: a trial the scheduler stops at its last report (ASHA at max_t) never
        # gets to write its own end. A no-op when the trial did write one (the first session end wins).
        self._end_session(trial, status)
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._recount(trials, finished=trial, errored=True)
        self._end_session(trial, "failure")
        self._print_error(trial)
        self._print()

    def _print_error(self, trial) -> None:
        """The failure's reason, one line, the first time it is seen (12 identical range-test failures: one line)."""
        try:
            line = error_line(trial.get_pickled_error() or trial.get_error())
        except Exception as e:  # the error file could not be read back: say that much
            line = f"(its error could not be read: {type(e).__name__}: {e})"
        line = line or "unknown error"
        if line not in self._errors_shown and not self.quiet:
            self._errors_shown.add(line)
            print(f"[{self.stage}] trial {trial.trial_id} failed: {line}", file=sys.stderr, flush=True)

    def _end_session(self, trial, status: str) -> None:
        if self.tb_logdir is None or self.stage not in ("search", "final"):
            return
        name = (tb.run_name("search", trial=trial.trial_id) if self.stage == "search"
                else tb.run_name("final", seed=(trial.config or {}).get("seed")))
        try:
            tb.end_session(self.tb_logdir, name, status=status)
        except Exception as e:  # TensorBoard bookkeeping must never break the search
            log.warning("could not close the TensorBoard session of %s: %s", trial.trial_id, e)


# -- Ray helpers -------------------------------------------------------------------------------

def _run_config(paths: ExperimentPaths, stage: str, callbacks: list, *, max_failures: int, keep: int | None = 2):
    from ray import tune

    return tune.RunConfig(
        name=stage,
        storage_path=str(paths.ray.resolve()),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep) if keep else None,
        callbacks=callbacks,
        verbose=0,
    )


class _NoResultFilesFilter(logging.Filter):
    """Drops Tune's "Failed to fetch metrics ... both result.json and progress.csv were not found" warning
    (one line per trial). sctune turns Tune's own result files off (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``:
    it writes TensorBoard itself and reads results from the ResultGrid), so the files are missing by design.
    Any other failure to fetch metrics is still shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith("Failed to fetch metrics"):
            return True
        items = [ln for ln in msg.splitlines()[1:] if ln.startswith("- ")]
        return not items or not all("FileNotFoundError" in ln and "were not found" in ln for ln in items)


class _NoIncompleteTrialsFilter(logging.Filter):
    """Drops Tune's "Trials did not complete: [...]" error when trial errors are not printed
    (``TUNE_PRINT_ALL_TRIAL_ERRORS=0``): StageProgress has printed each failed trial's reason already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Trials did not complete")
                    and os.environ.get("TUNE_PRINT_ALL_TRIAL_ERRORS") == "0")


_RESULT_FILES_FILTER = _NoResultFilesFilter()
_INCOMPLETE_FILTER = _NoIncompleteTrialsFilter()


def _fit(tuner_factory, restore_path: Path, trainable, *, resume: bool):
    """Fresh Tuner, or Tuner.restore when a previous run of this stage left state behind.

    Tune's state is checked first (``_check_restorable``): a Tune that cannot read it logs a traceback
    and silently runs the whole stage again. Corrupted state stops with a StageError saying what to do.
    """
    from ray import tune

    if resume and tune.Tuner.can_restore(str(restore_path)) and _check_restorable(restore_path):
        log.info("restoring %s", restore_path)
        try:
            tuner = tune.Tuner.restore(str(restore_path), trainable=trainable, resume_errored=True)
        except Exception as e:
            raise StageError(_corrupted_tune_state(restore_path, f"{type(e).__name__}: {e}")) from None
    else:
        tuner = tuner_factory()
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    if os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS") == "1" and _RESULT_FILES_FILTER not in logger.filters:
        logger.addFilter(_RESULT_FILES_FILTER)
    tune_logger = logging.getLogger("ray.tune.tune")
    if _INCOMPLETE_FILTER not in tune_logger.filters:
        tune_logger.addFilter(_INCOMPLETE_FILTER)
    grid = tuner.fit()
    if GUARD.requested:
        # Tune stopped on the interrupt and saved its state with the unfinished trials unfinished: the stage is
        # not done, its outputs are not written, and --resume continues it (Tuner.restore).
        p = active_progress()
        p = p if p is not None and p.stage == restore_path.name else None
        raise Interrupted(GUARD.signum, interrupted_message(restore_path.name, p.done if p else None,
                                                           p.total if p else None, restore_path.parent.parent,
                                                           GUARD.signum))
    return grid


def _corrupted_tune_state(stage_dir: Path, why: str) -> str:
    return (f"Ray Tune's state of this stage in {stage_dir} cannot be restored ({why[:300]}). Move that folder "
            f"aside and rerun with --resume to run this stage again from scratch (finished stages are kept), "
            f"or start over with a new --name.")


def _check_restorable(stage_dir: Path) -> bool:
    """True if Tune's state in ``stage_dir`` (ray/<stage>) can be restored, False if there is none yet
    (the driver stopped before Tune recorded anything: the stage starts fresh); StageError if it is
    corrupted. Re-creates the newest checkpoint folder of an unfinished trial if it went missing, so the
    trial resumes from its previous good checkpoint instead of failing (``trainables._load_state``)."""
    states = sorted(stage_dir.glob("experiment_state-*.json"))
    if not states:
        log.warning("%s holds no Tune experiment state yet: this stage starts fresh", stage_dir)
        return False
    newest = states[-1]
    session = newest.name[len("experiment_state-"):-len(".json")]
    try:
        import ray.cloudpickle as cloudpickle

        trial_data = json.loads(newest.read_text())["trial_data"]
        for f in stage_dir.glob(f"*-{session}.*"):  # the searcher's and variant generator's state: pickles
            if f != newest:
                cloudpickle.loads(f.read_bytes())
    except Exception as e:
        raise StageError(_corrupted_tune_state(stage_dir, f"{type(e).__name__}: {e}")) from None
    _replace_missing_checkpoints(stage_dir, trial_data)
    return True


def _replace_missing_checkpoints(stage_dir: Path, trial_data: list) -> None:
    import ray.cloudpickle as cloudpickle

    for state, meta in trial_data:
        try:
            state = json.loads(state) if isinstance(state, str) else state
            if state.get("status") == "TERMINATED":
                continue  # finished trials are not restored
            meta = json.loads(meta) if isinstance(meta, str) else meta
            manager = cloudpickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"]))
            latest = manager.latest_checkpoint_result
            if latest is None:
                continue
            path = stage_dir / state["relative_logdir"] / Path(latest.checkpoint.path).name
        except Exception as e:  # Tune's format changed: leave it to Tune
            log.debug("cannot check the checkpoints of a trial in %s: %s", stage_dir, e)
            continue
        if not path.exists():
            log.warning("trial %s: its latest checkpoint %s is missing; it resumes from its previous good "
                        "checkpoint, or from the start if there is none", state.get("trial_id"), path)
            path.mkdir(parents=True)
            continue
        try:
            from .trainables import load_checkpoint_state

            load_checkpoint_state(path)
        except Exception as e:
            from .trainables import CHECKPOINT_FILE

            log.warning("trial %s: its latest checkpoint %s cannot be read (%s: %s); it resumes from its previous "
                        "good checkpoint, or from the start if there is none", state.get("trial_id"),
                        path / CHECKPOINT_FILE, type(e).__name__, str(e)[:200])


def _resources(spec: SpaceSpec):
    from ray import tune

    return {"cpu": spec.search.cpus_per_trial, "gpu": spec.search.gpus_per_trial}, tune


# -- TensorBoard HParams config ---------------------------------------------------------------

TB_METRICS = [(VAL_ACC, "validation accuracy"), (TEST_ACC, "test accuracy (final fit)"),
              ("val/loss", "validation loss"), ("train/loss", "training loss"),
              ("range_test/max_lr", "range test: max LR"), ("range_test/min_lr", "range test: min LR"),
              ("range_test/peak_acc", "range test: peak accuracy")]


def write_tb_config(spec: SpaceSpec, paths: ExperimentPaths, anchors: Anchors | None = None) -> None:
    """One HParams config for every stage, written before the first trial.

    TensorBoard shows only the columns the config lists and a running TensorBoard keeps the first
    config it reads, so it names the range-test, search and final hparams and metrics at once. Ranges
    relative to stage-1 results are shown over what they can span until the anchors are known.
    """
    rt = spec.range_test
    if anchors is not None:
        dists, _ = resolve(spec, anchors)
    else:
        span = {"max_lr_bound": (rt.start_lr, rt.end_lr), "min_lr_bound": (rt.start_lr, rt.end_lr),
                "wd_prior": (0.0, max(rt.weight_decays))}
        dists = {}
        for n, d in spec.space.items():
            if d.scale is None:
                dists[n] = d
            else:
                lo, hi = span[d.scale]
                dists[n] = type(d)(n, d.kind, low=d.low * lo, high=max(d.high * hi, d.low * lo), log=False)
    hparams = {n: {k: v for k, v in d.to_dict().items() if k != "log"} for n, d in dists.items()}
    hparams.setdefault("weight_decay", {"type": "float", "low": 0.0, "high": max(rt.weight_decays)})
    hparams |= {"seed": {"type": "int", "low": 0, "high": spec.search.seed + 10_000},
                "stage": {"choices": ["range", "search", "final"]}}
    metrics = TB_METRICS + [(tail_key(spec.search.metric),
                             f"selection score: mean of the last {spec.search.select_last} {spec.search.metric}")]
    try:
        tb.write_hparams_config(paths.tensorboard, hparams=hparams, metrics=metrics)
    except (ValueError, OSError) as e:  # TensorBoard bookkeeping must never stop a search
        log.warning("could not write the TensorBoard HParams config: %s", e)


# -- stage 1 -----------------------------------------------------------------------------------

def run_range_stage(spec: SpaceSpec, paths: ExperimentPaths, *, resume: bool = False, quiet: bool = False,
                    lr_bounds: tuple[float, float] | None = None, wd_prior: float | None = None,
                    fte: tuple[float, float | None, float | None] | None = None) -> dict[str, Any]:
    """Parallel range tests -> ``range_test/bounds.json`` (returned). Raises StageError if unusable."""
    from .trainables import range_test_trainable

    resources, tune = _resources(spec)
    rt = spec.range_test
    seeds = [spec.search.seed + i for i in range(rt.repeats)]
    trainable = tune.with_resources(
        tune.with_parameters(range_test_trainable, train=spec.base.to_flat(), range_test=rt.to_dict(),
                             tb_logdir=str(paths.tensorboard), cpus=spec.search.cpus_per_trial,
                             user_task=registrations(spec.base.task)),
        resources)
    total = len(rt.weight_decays) * len(seeds)
    progress = StageProgress("range", total, metric="", mode="max", epochs=None, tb_logdir=None, quiet=quiet,
                             fte=fte)

    def make():
        return tune.Tuner(
            trainable,
            param_space={"weight_decay": tune.grid_search(list(rt.weight_decays)), "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.search.max_concurrent, reuse_actors=True),
            run_config=_run_config(paths, "range", [progress], max_failures=2, keep=None),
        )

    grid = _fit(make, paths.ray_stage("range"), trainable, resume=resume)
    frames, per_trial = [], []
    for res in grid:
        if res.error is not None or not res.metrics or "curve" not in res.metrics:
            per_trial.append({"weight_decay": res.config.get("weight_decay"), "seed": res.config.get("seed"),
                              "status": "error", "error": error_line(res.error)})
            continue
        df = pd.DataFrame(res.metrics["curve"]).astype(float)
        wd, seed = float(res.config["weight_decay"]), int(res.config["seed"])
        frames.append(df.assign(weight_decay=wd, seed=seed))
        per_trial.append({"weight_decay": wd, "seed": seed, "stop_reason": res.metrics.get("stop_reason"),
                          "node_id": res.metrics.get("node_id"), "steps": res.metrics.get("steps"),
                          "cost_fte": res.metrics.get("cost_fte")})
    if not frames:
        reasons = "; ".join(dict.fromkeys(t["error"] or "unknown error" for t in per_trial))
        raise StageError(f"every range test failed ({reasons}); see the errors in "
                         f"{paths.ray_stage('range')} (rerun with --verbose for Ray's logs)")
    curves = pd.concat(frames, ignore_index=True)
    curves = curves[["weight_decay", "seed", *[c for c in curves.columns if c not in ("weight_decay", "seed")]]]
    curves = curves.sort_values(["weight_decay", "seed", "step"], ignore_index=True)
    paths.range_dir.mkdir(parents=True, exist_ok=True)
    curves.to_csv(paths.range_dir / "curves.csv", index=False)
    return summarize_range_tests(spec, paths, curves, per_trial, lr_bounds=lr_bounds, wd_prior=wd_prior)


def _bounds_for(spec: SpaceSpec, df: pd.DataFrame, *, diverged: bool = False) -> LRBounds:
    return bounds_from_frame(df, method=spec.range_test.method,
                             **bounds_kwargs(spec.range_test, diverged=diverged))


def range_cost_fte(per_trial: list[dict]) -> float | None:
    """Stage 1's cost in full-training equivalents: the sum of the range tests' measured costs."""
    costs = [row.get("cost_fte") for row in per_trial]
    measured = [c for c in costs if isinstance(c, (int, float)) and math.isfinite(c)]
    return float(sum(measured)) if measured else None


def summarize_range_tests(spec: SpaceSpec, paths: ExperimentPaths, curves: pd.DataFrame, per_trial: list[dict],
                          *, lr_bounds: tuple[float, float] | None = None,
                          wd_prior: float | None = None) -> dict[str, Any]:
    """Bounds per curve and per WD, the chosen prior and verdict; writes bounds.json and the plot."""
    per_wd: dict[str, Any] = {}
    bounds_by_label: dict[str, LRBounds] = {}
    curve_by_label: dict[str, pd.DataFrame] = {}
    diverged = {(row.get("weight_decay"), row.get("seed")): str(row.get("stop_reason") or "").startswith("diverged")
                for row in per_trial}
    for (wd, seed), df in curves.groupby(["weight_decay", "seed"], sort=True):
        b = _bounds_for(spec, df.reset_index(drop=True), diverged=diverged.get((wd, seed), False))
        label = f"wd={wd:g} seed={int(seed)}"
        bounds_by_label[label], curve_by_label[label] = b, df
        for row in per_trial:
            if row.get("weight_decay") == wd and row.get("seed") == seed:
                row["bounds"] = b.to_dict()
    for wd in sorted(curves["weight_decay"].unique(), reverse=True):
        results = [b for lbl, b in bounds_by_label.items() if lbl.startswith(f"wd={wd:g} ")]
        per_wd[f"{wd:g}"] = {"weight_decay": float(wd), **aggregate_bounds(results)}
    chosen = choose_weight_decay(per_wd)
    override = lr_bounds is not None
    cost = range_cost_fte(per_trial)
    if chosen is None and not override:
        statuses = {k: v["status"] for k, v in per_wd.items()}
        msgs = "; ".join(f"wd={k}: {v['message']}" for k, v in per_wd.items())
        _write_bounds(paths, spec, per_wd, per_trial, None, None, curve_by_label, bounds_by_label, cost_fte=cost)
        raise StageError(
            f"no range test yielded usable LR bounds ({statuses}). {msgs} "
            "Adjust range_test (start_lr/end_lr/num_iter) in the space file, or proceed with your own bounds: "
            "--lr-bounds MIN_LR MAX_LR [--wd-prior WD].")
    if override:
        min_lr, max_lr = lr_bounds
        prior = wd_prior if wd_prior is not None else (chosen["weight_decay"] if chosen else spec.base.reg.weight_decay)
        anchors = Anchors(max_lr_bound=max_lr, min_lr_bound=min_lr, wd_prior=prior)
        source = "user (--lr-bounds)"
    else:
        prior = wd_prior if wd_prior is not None else chosen["weight_decay"]
        anchors = Anchors(max_lr_bound=chosen["max_lr"], min_lr_bound=chosen["min_lr"], wd_prior=prior,
                          max_lr_lower_bound=bool(chosen.get("lower_bound")), ramp_end_lr=spec.range_test.end_lr,
                          recipe_max_lr=recipe_max_lr(chosen))
        source = "range test"
    if chosen is None or chosen.get("verdict") is None:
        verdict = {"possible": None, "message": "no usable range test: no verdict"}
    else:
        verdict = {**chosen["verdict"], "weight_decay": chosen["weight_decay"],
                   "lower_bound": chosen["lower_bound"], "still_learning": chosen["still_learning"]}
    return _write_bounds(paths, spec, per_wd, per_trial, anchors, verdict, curve_by_label, bounds_by_label,
                         source=source, cost_fte=cost)


def _write_bounds(paths: ExperimentPaths, spec: SpaceSpec, per_wd, per_trial, anchors: Anchors | None,
                  verdict, curve_by_label, bounds_by_label, *, source: str = "range test",
                  cost_fte: float | None = None) -> dict[str, Any]:
    out = clean({
        "status": "ok" if anchors is not None else "no_usable_bounds",
        "source": source,
        "cost_fte": cost_fte,
        "chosen": anchors.to_dict() if anchors is not None else None,
        "verdict": verdict,
        "per_weight_decay": per_wd,
        "trials": per_trial,
        "range_test": spec.range_test.to_dict(),
    })
    write_json(paths.range_dir / "bounds.json", out)
    try:
        from .report import range_summary_figure

        curves = pd.concat([df for df in curve_by_label.values()], ignore_index=True)
        fig = range_summary_figure(curves, out, log_x=spec.range_test.step_mode == "exp",
                                   title=f"LR range test: {spec.base.task.dataset} / {spec.base.task.model}")
        fig.savefig(paths.range_dir / "range_test.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception as e:  # a plot must never lose the computed bounds
        log.warning("could not draw range_test.png: %s", e)
    return out


# -- stage 2 -----------------------------------------------------------------------------------

def search_plan(spec: SpaceSpec, anchors: Anchors) -> dict[str, Any]:
    dists, constants = resolve(spec, anchors)
    point = recipe_point(dists, anchors, divisor=spec.range_test.divisor)
    rungs = rung_plan(spec)
    return {"dists": dists, "constants": constants, "recipe": point, "grace_period": rungs["grace_period"],
            "rungs": rungs, "select": tail_key(spec.search.metric)}


def _searcher_base():
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter


class BudgetLimiter(_searcher_base()):
    """Ray's ``ConcurrencyLimiter`` that also never lets the search spend more than ``budget_epochs``.

    A trial starts only if a full run of it still fits: the epochs finished trials ran plus ``max_epochs``
    for every running one (it may not be pruned) plus ``max_epochs`` for the new one. A pruned or diverged
    trial gives back what it did not run, so the next trial may start. When nothing is running and a full
    trial no longer fits, the search is finished.
    """

    def __init__(self, searcher, max_concurrent: int, *, budget_epochs: float, max_epochs: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.budget_epochs, self.max_epochs = float(budget_epochs), int(max_epochs)
        self.ran: dict[str, float] = {}  # trial id -> epochs it ran
        self.running: set[str] = set()

    @property
    def committed(self) -> float:
        return sum(v for k, v in self.ran.items() if k not in self.running) + self.max_epochs * len(self.running)

    def suggest(self, trial_id: str):
        from ray.tune.search import Searcher

        if self.committed + self.max_epochs > self.budget_epochs + 1e-9:
            return Searcher.FINISHED if not self.running else None
        suggestion = super().suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.running.add(trial_id)
            self.ran[trial_id] = 0.0
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(result.get("epoch"), (int, float)):
            self.ran[trial_id] = max(self.ran.get(trial_id, 0.0), float(result["epoch"]))
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and isinstance(result.get("epoch"), (int, float)):
            self.ran[trial_id] = max(self.ran.get(trial_id, 0.0), float(result["epoch"]))
        self.running.discard(trial_id)
        super().on_trial_complete(trial_id, result=result, error=error)

    # Tune saves the searcher for --resume through ``save``: keep the budget's books with the inner state.
    def save(self, checkpoint_path: str):
        import pickle
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            inner = Path(d) / "inner.pkl"
            self.searcher.save(str(inner))
            blob = inner.read_bytes() if inner.exists() else None
        Path(checkpoint_path).write_bytes(pickle.dumps({"inner": blob, "limiter": self.get_state()}))

    def restore(self, checkpoint_path: str):
        import pickle
        import tempfile

        data = pickle.loads(Path(checkpoint_path).read_bytes())
        self.set_state(data["limiter"])
        if data["inner"] is not None:
            with tempfile.TemporaryDirectory() as d:
                inner = Path(d) / "inner.pkl"
                inner.write_bytes(data["inner"])
                self.searcher.restore(str(inner))


def run_search_stage(spec: SpaceSpec, paths: ExperimentPaths, anchors: Anchors, *, resume: bool = False,
                     quiet: bool = False, budget_fte: float | None = None,
                     fte: tuple[float, float | None, float | None] | None = None) -> pd.DataFrame:
    """Joint one-cycle + regularization search; writes summary.csv and returns it.

    ``budget_fte``: compute the search may spend, in FTE (epochs / ``fixed.epochs``); trials then start
    until it is spent (``BudgetLimiter``) and ``num_samples`` is no cap. ``fte``: see ``StageProgress``.
    """
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .trainables import onecycle_trainable

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no per-study chatter on the console
    resources, tune = _resources(spec)
    s = spec.search
    plan = search_plan(spec, anchors)
    select = plan["select"]
    base = spec.base.to_flat() | plan["constants"]
    trainable = tune.with_resources(
        tune.with_parameters(onecycle_trainable, base=base, tb_logdir=str(paths.tensorboard), stage="search",
                             cpus=s.cpus_per_trial, user_task=registrations(spec.base.task),
                             select_metric=s.metric, select_last=s.select_last),
        resources)
    write_tb_config(spec, paths, anchors)
    progress = StageProgress("search", None if budget_fte is not None else s.num_samples, metric=select,
                             mode=s.mode, epochs=spec.base.epochs, tb_logdir=paths.tensorboard, quiet=quiet,
                             fte=fte)

    def make():
        sampler = optuna.samplers.TPESampler(seed=s.seed, multivariate=True,
                                             n_startup_trials=max(2, min(10, s.num_samples // 3)))
        # Optuna learns from the selection score (mean of the last evaluations), the number trials are
        # ranked by; ASHA compares the precise-BN metric of the epoch at which trials reach the same phase.
        searcher = OptunaSearch(space=to_optuna(plan["dists"]), metric=select, mode=s.mode,
                                points_to_evaluate=[plan["recipe"]], sampler=sampler)
        num_samples = s.num_samples
        if budget_fte is not None:
            searcher = BudgetLimiter(searcher, s.max_concurrent, budget_epochs=budget_fte * spec.base.epochs,
                                     max_epochs=spec.base.epochs)
            num_samples = -1  # the budget decides (BudgetLimiter finishes the search)
        scheduler = None
        if s.scheduler == "asha":
            r = plan["rungs"]
            scheduler = ASHAScheduler(time_attr=r["time_attr"], metric=s.metric, mode=s.mode, max_t=r["max_t"],
                                      grace_period=r["grace_period"], reduction_factor=s.reduction_factor)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=s.max_concurrent, reuse_actors=True),
            run_config=_run_config(paths, "search", [progress], max_failures=2),
        )

    grid = _fit(make, paths.ray_stage("search"), trainable, resume=resume)
    summary = summarize_search(grid, spec, plan)
    summary.to_csv(paths.root / "summary.csv", index=False)
    return summary


def summarize_search(grid, spec: SpaceSpec, plan: dict[str, Any]) -> pd.DataFrame:
    """One row per trial: its config, selection score, final metrics, status, epochs run, checkpoint.

    Trials are sorted by the selection score ``<metric>_tail`` (mean of the last ``search.select_last``
    evaluations); ``final_<metric>`` is the last epoch's value, for reference."""
    rows = []
    metric = spec.search.metric
    select = tail_key(metric)
    for res in grid:
        m = res.metrics or {}
        epochs = int(m.get("epoch", 0) or 0)
        diverged = bool(m.get("diverged", 0))
        if res.error is not None:
            status = "error"
        elif diverged:
            status = "diverged"
        elif epochs < spec.base.epochs:
            status = "pruned"
        else:
            status = "completed"
        params = {k: v for k, v in (res.config or {}).items() if k in plan["dists"]}
        checkpoint = getattr(res, "checkpoint", None)
        rows.append({"trial_id": m.get("trial_id") or res.path.rstrip("/").split("/")[-1], **params,
                     **plan["constants"], "status": status, "epochs_run": epochs,
                     select: m.get(select, math.nan), f"final_{metric}": m.get(metric, math.nan),
                     "final_val/loss": m.get("val/loss", math.nan), "final_train/loss": m.get("train/loss", math.nan),
                     "is_recipe": all(_close(params.get(k), v) for k, v in plan["recipe"].items()),
                     "node_id": m.get("node_id"),  # the Ray node of the trial's last result
                     "error": error_line(res.error) or "",
                     "checkpoint": checkpoint.path if checkpoint is not None else None})
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(select, ascending=spec.search.mode == "min", na_position="last", ignore_index=True)
    return df


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def pick_best(summary: pd.DataFrame, spec: SpaceSpec) -> dict[str, Any]:
    """Best completed, finite, non-diverged trial by its selection score (mean of its last evaluations)."""
    metric = tail_key(spec.search.metric)
    if metric not in summary:  # summary.csv of an experiment started before the score existed
        metric = f"final_{spec.search.metric}"
    ok = summary[(summary["status"] == "completed") & summary[metric].notna()]
    if ok.empty:
        raise StageError("no search trial completed without diverging; nothing to fit. "
                         "Check summary.csv and TensorBoard, narrow the space, and rerun.")
    row = ok.sort_values(metric, ascending=spec.search.mode == "min", kind="stable").iloc[0]
    return row.to_dict() | {"_score_column": metric}


def search_fte(summary: pd.DataFrame | None, spec: SpaceSpec) -> float:
    """FTE the search spent: every trial's epochs (pruned and diverged ones count what they ran)."""
    if summary is None or "epochs_run" not in summary:
        return 0.0
    return float(summary["epochs_run"].sum()) / spec.base.epochs


# -- stage 3 -----------------------------------------------------------------------------------

def run_final_stage(spec: SpaceSpec, paths: ExperimentPaths, params: dict[str, Any], *, resume: bool = False,
                    quiet: bool = False, best_row: dict[str, Any] | None = None, refit_epochs: int | None = None,
                    fte: tuple[float, float | None, float | None] | None = None) -> dict[str, Any]:
    """Retrain ``params`` over ``final.seeds`` seeds; one test evaluation each; mean and spread.

    ``final.refit``: train on train + validation for ``refit_epochs`` (as many iterations as a search
    trial ran; ``budget.plan_compute``). ``final.seeds: 0`` (a budget too small for a refit): the search's
    best trial (``best_row``) is tested as it is, from its last checkpoint, without training again.
    """
    if spec.final.seeds == 0:
        return evaluate_search_trial(spec, params, best_row or {})
    from .trainables import onecycle_trainable

    resources, tune = _resources(spec)
    base = spec.base.to_flat() | params
    if spec.final.refit:
        base |= {"train_on_val": True, "epochs": refit_epochs or spec.base.epochs}
    seeds = [spec.search.seed + 1000 + i for i in range(spec.final.seeds)]  # unseen by the search
    trainable = tune.with_resources(
        tune.with_parameters(onecycle_trainable, base=base, tb_logdir=str(paths.tensorboard), stage="final",
                             hparam_keys=tuple(params),
                             cpus=spec.search.cpus_per_trial, user_task=registrations(spec.base.task),
                             select_metric=spec.search.metric, select_last=spec.search.select_last),
        resources)
    progress = StageProgress("final", len(seeds), metric=TEST_ACC, mode="max", epochs=None, tb_logdir=paths.tensorboard,
                             quiet=quiet, fte=fte)

    def make():
        return tune.Tuner(
            trainable, param_space={"seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.search.max_concurrent, reuse_actors=True),
            run_config=_run_config(paths, "final", [progress], max_failures=2),
        )

    grid = _fit(make, paths.ray_stage("final"), trainable, resume=resume)
    runs = []
    for res in grid:
        m = res.metrics or {}
        runs.append({"seed": res.config.get("seed"), "test/acc": m.get(TEST_ACC), "test/loss": m.get("test/loss"),
                     "val/acc": m.get(VAL_ACC), "epochs": m.get("epoch"), "diverged": bool(m.get("diverged", 0)),
                     "error": error_line(res.error), "node_id": m.get("node_id")})
    accs = [r["test/acc"] for r in runs if r["test/acc"] is not None and not r["diverged"]]
    return clean({"runs": runs, "test_acc_mean": float(np.mean(accs)) if accs else None,
                  "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else (0.0 if accs else None),
                  "n": len(accs), "seeds": seeds, "refit": spec.final.refit,
                  # with a refit the validation split was trained on: its accuracy is not held out
                  "val_is_training_data": spec.final.refit,
                  "epochs": int(base["epochs"])})


def evaluate_search_trial(spec: SpaceSpec, params: dict[str, Any], best_row: dict[str, Any]) -> dict[str, Any]:
    """Test the search's best trial as it is: its last checkpoint (precise-BN statistics included), once."""
    from .data import load_dataset
    from .models import build_model
    from .train import TrainConfig, evaluate
    from .trainables import load_checkpoint_state

    path = best_row.get("checkpoint")
    if not isinstance(path, str) or not Path(path).is_dir():
        raise StageError(f"final.seeds is 0 (the budget left no final fit) but the best trial's checkpoint "
                         f"{path!r} is not there to test; rerun with --stage final and final.seeds >= 1")
    cfg = TrainConfig.from_flat(spec.base.to_flat() | params)
    data = load_dataset(cfg.task)
    state = load_checkpoint_state(path)
    model = build_model(cfg.task.model, num_classes=data.num_classes, input_shape=data.input_shape,
                        dropout=cfg.reg.dropout)
    model.load_state_dict(state["model"])
    loss, acc = evaluate(model, data.x_test, data.y_test, batch_size=cfg.eval_batch_size)
    run = {"seed": cfg.seed, "test/acc": acc, "test/loss": loss, "val/acc": None, "epochs": int(state["epoch"]),
           "diverged": False, "error": None, "node_id": None, "search_trial": best_row.get("trial_id")}
    return clean({"runs": [run], "test_acc_mean": acc, "test_acc_std": None, "n": 1, "seeds": [],
                  "refit": False, "val_is_training_data": False, "epochs": int(state["epoch"]),
                  "note": "final.seeds 0: the search's best trial tested as it is (no training, 0 FTE)"})
