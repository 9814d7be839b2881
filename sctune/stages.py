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
from .bounds import LRBounds, aggregate_bounds, bounds_from_frame, jsonable
from .lifecycle import GUARD, Interrupted, interrupted_message
from .space import Anchors, SpaceSpec, recipe_point, resolve, rung_grace_period, to_optuna
from .train import TEST_ACC, VAL_ACC, VAL_ACC_BEST

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

def _callback_base():
    from ray.tune import Callback

    return Callback


class StageProgress(_callback_base()):
    """Compact live progress on stderr, and HParams session ends for trials that cannot write them.

    One line per change: ``[search] 7/16 done (2 pruned, 0 errored) | 2 running | best val/acc 0.986``.
    """

    def __init__(self, stage: str, total: int, *, metric: str, mode: str, epochs: int | None,
                 tb_logdir: Path | None, quiet: bool = False):
        self.stage, self.total, self.metric, self.mode, self.epochs = stage, total, metric, mode, epochs
        self.tb_logdir, self.quiet = tb_logdir, quiet
        self.done = self.pruned = self.errored = self.running = 0
        self.best: float | None = None
        self._last_line = ""
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

    def _recount(self, trials, finished=None, errored: bool = False) -> None:
        """Counts from the trials' states (so a resumed stage counts what finished before the kill)."""
        def state(t):
            if t is finished:
                return "ERROR" if errored else "TERMINATED"
            return t.status

        states = [(t, state(t)) for t in trials]
        self.done = sum(st in ("TERMINATED", "ERROR") for _, st in states)
        self.errored = sum(st == "ERROR" for _, st in states)
        self.pruned = sum(st == "TERMINATED" and self._pruned(t) for t, st in states)
        self.running = sum(st == "RUNNING" for t, st in states if t is not finished)
        for t, st in states:
            if st == "TERMINATED" and self.metric:
                self._offer(t.last_result or {})

    def _offer(self, result: dict) -> bool:
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v) and not result.get("diverged"):
            if self.best is None or (v > self.best if self.mode == "max" else v < self.best):
                self.best = float(v)
                return True
        return False

    def _print(self) -> None:
        best = f" | best {self.metric} {self.best:.4f}" if self.best is not None and self.metric else ""
        n_rec = len(getattr(self, "recovered", ()))
        rec = f", {n_rec} resumed from an older checkpoint" if n_rec else ""
        extra = f" ({self.pruned} pruned, {self.errored} errored{rec})" if self.stage == "search" else (
            f" ({self.errored} errored{rec})" if self.errored or n_rec else "")
        line = (f"[{self.stage}] {self.done}/{self.total} done{extra} | {self.running} running{best} "
                f"| {time.monotonic() - self._t0:.0f}s")
        if line != self._last_line and not self.quiet:
            print(line, file=sys.stderr, flush=True)
            self._last_line = line

    def on_trial_start(self, iteration, trials, trial, **info):
        self._recount(trials)
        self.running = max(self.running, 1)
        self._print()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        note = result.get("checkpoint_recovered")
        recovered = getattr(self, "recovered", None)
        if note and recovered is not None and trial.trial_id not in recovered:
            recovered.add(trial.trial_id)
            if not self.quiet:
                print(f"[{self.stage}] trial {trial.trial_id}: damaged checkpoint: {note}", file=sys.stderr, flush=True)
            self._print()
        if self.metric and self._offer(result):
            self._print()

    def on_trial_complete(self, iteration, trials, trial, **info):
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
        self._print()

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
    try:
        tb.write_hparams_config(paths.tensorboard, hparams=hparams, metrics=TB_METRICS)
    except (ValueError, OSError) as e:  # TensorBoard bookkeeping must never stop a search
        log.warning("could not write the TensorBoard HParams config: %s", e)


# -- stage 1 -----------------------------------------------------------------------------------

def run_range_stage(spec: SpaceSpec, paths: ExperimentPaths, *, resume: bool = False, quiet: bool = False,
                    lr_bounds: tuple[float, float] | None = None, wd_prior: float | None = None) -> dict[str, Any]:
    """Parallel range tests -> ``range_test/bounds.json`` (returned). Raises StageError if unusable."""
    from .trainables import range_test_trainable

    resources, tune = _resources(spec)
    rt = spec.range_test
    seeds = [spec.search.seed + i for i in range(rt.repeats)]
    trainable = tune.with_resources(
        tune.with_parameters(range_test_trainable, train=spec.base.to_flat(), range_test=rt.to_dict(),
                             tb_logdir=str(paths.tensorboard), cpus=spec.search.cpus_per_trial),
        resources)
    total = len(rt.weight_decays) * len(seeds)
    progress = StageProgress("range", total, metric="", mode="max", epochs=None, tb_logdir=None, quiet=quiet)

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
                              "status": "error", "error": str(res.error)[:500]})
            continue
        df = pd.DataFrame(res.metrics["curve"]).astype(float)
        wd, seed = float(res.config["weight_decay"]), int(res.config["seed"])
        frames.append(df.assign(weight_decay=wd, seed=seed))
        per_trial.append({"weight_decay": wd, "seed": seed, "stop_reason": res.metrics.get("stop_reason"),
                          "node_id": res.metrics.get("node_id")})
    if not frames:
        raise StageError("every range test failed; see the errors in "
                         f"{paths.ray_stage('range')} (rerun with --verbose for Ray's logs)")
    curves = pd.concat(frames, ignore_index=True)
    curves = curves[["weight_decay", "seed", *[c for c in curves.columns if c not in ("weight_decay", "seed")]]]
    curves = curves.sort_values(["weight_decay", "seed", "step"], ignore_index=True)
    paths.range_dir.mkdir(parents=True, exist_ok=True)
    curves.to_csv(paths.range_dir / "curves.csv", index=False)
    return summarize_range_tests(spec, paths, curves, per_trial, lr_bounds=lr_bounds, wd_prior=wd_prior)


def _bounds_for(spec: SpaceSpec, df: pd.DataFrame) -> LRBounds:
    rt = spec.range_test
    kw: dict[str, Any] = {"divisor": rt.divisor}
    if rt.method == "smith":
        kw |= {"sc_tolerance": rt.sc_tolerance, "sc_threshold_decades": rt.sc_threshold_decades}
    return bounds_from_frame(df, method=rt.method, **kw)


def summarize_range_tests(spec: SpaceSpec, paths: ExperimentPaths, curves: pd.DataFrame, per_trial: list[dict],
                          *, lr_bounds: tuple[float, float] | None = None,
                          wd_prior: float | None = None) -> dict[str, Any]:
    """Bounds per curve and per WD, the chosen prior and verdict; writes bounds.json and the plot."""
    per_wd: dict[str, Any] = {}
    bounds_by_label: dict[str, LRBounds] = {}
    curve_by_label: dict[str, pd.DataFrame] = {}
    for (wd, seed), df in curves.groupby(["weight_decay", "seed"], sort=True):
        b = _bounds_for(spec, df.reset_index(drop=True))
        label = f"wd={wd:g} seed={int(seed)}"
        bounds_by_label[label], curve_by_label[label] = b, df
        for row in per_trial:
            if row.get("weight_decay") == wd and row.get("seed") == seed:
                row["bounds"] = b.to_dict()
    for wd in sorted(curves["weight_decay"].unique(), reverse=True):
        results = [b for lbl, b in bounds_by_label.items() if lbl.startswith(f"wd={wd:g} ")]
        per_wd[f"{wd:g}"] = {"weight_decay": float(wd), **aggregate_bounds(results)}
    usable = {k: v for k, v in per_wd.items() if v["status"] == "ok"}
    chosen: dict[str, Any] | None = None
    if usable:
        # Smith (1803.09820): the WD that lets the LR go highest with stable accuracy; ties -> wider plateau.
        key = max(usable, key=lambda k: (usable[k]["max_lr"], usable[k].get("width_decades") or 0.0))
        chosen = usable[key]
    override = lr_bounds is not None
    if chosen is None and not override:
        statuses = {k: v["status"] for k, v in per_wd.items()}
        msgs = "; ".join(f"wd={k}: {v['message']}" for k, v in per_wd.items())
        _write_bounds(paths, spec, per_wd, per_trial, None, None, curve_by_label, bounds_by_label)
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
        anchors = Anchors(max_lr_bound=chosen["max_lr"], min_lr_bound=chosen["min_lr"], wd_prior=prior)
        source = "range test"
    verdict = _verdict(chosen, spec)
    return _write_bounds(paths, spec, per_wd, per_trial, anchors, verdict, curve_by_label, bounds_by_label,
                         source=source)


def _verdict(chosen: dict[str, Any] | None, spec: SpaceSpec) -> dict[str, Any]:
    rt = spec.range_test
    if chosen is None:
        return {"possible": None, "message": "no usable range test: no verdict"}
    width = chosen.get("width_decades")
    frac = chosen.get("possible_frac")
    possible = bool(width is not None and width >= rt.sc_threshold_decades)
    lo, hi = chosen.get("plateau_low_lr"), chosen.get("plateau_high_lr")
    if possible:
        msg = (f"Super-convergence is possible: accuracy stays within {rt.sc_tolerance:g} of its peak from LR "
               f"{lo:.3g} to {hi:.3g} ({width:.2f} decades >= {rt.sc_threshold_decades:g}; median over seeds, "
               f"wd={chosen['weight_decay']:g}). Large LRs regularize: the search reduces weight decay and dropout.")
    elif width is not None:
        msg = (f"Super-convergence unlikely: accuracy stays near its peak only from LR {lo:.3g} to {hi:.3g} "
               f"({width:.2f} decades < {rt.sc_threshold_decades:g}).")
    else:
        msg = "no plateau measured"
    return {"possible": possible, "width_decades": width, "plateau_low_lr": lo, "plateau_high_lr": hi,
            "threshold_decades": rt.sc_threshold_decades, "tolerance": rt.sc_tolerance,
            "possible_fraction_of_seeds": frac, "weight_decay": chosen["weight_decay"], "message": msg}


def _write_bounds(paths: ExperimentPaths, spec: SpaceSpec, per_wd, per_trial, anchors: Anchors | None,
                  verdict, curve_by_label, bounds_by_label, *, source: str = "range test") -> dict[str, Any]:
    out = clean({
        "status": "ok" if anchors is not None else "no_usable_bounds",
        "source": source,
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
    grace = rung_grace_period(spec, dists)
    return {"dists": dists, "constants": constants, "recipe": point, "grace_period": grace}


def run_search_stage(spec: SpaceSpec, paths: ExperimentPaths, anchors: Anchors, *, resume: bool = False,
                     quiet: bool = False) -> pd.DataFrame:
    """Joint one-cycle + regularization search; writes summary.csv and returns it."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .trainables import onecycle_trainable

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no per-study chatter on the console
    resources, tune = _resources(spec)
    s = spec.search
    plan = search_plan(spec, anchors)
    base = spec.base.to_flat() | plan["constants"]
    trainable = tune.with_resources(
        tune.with_parameters(onecycle_trainable, base=base, tb_logdir=str(paths.tensorboard), stage="search",
                             cpus=s.cpus_per_trial),
        resources)
    write_tb_config(spec, paths, anchors)
    progress = StageProgress("search", s.num_samples, metric=s.metric, mode=s.mode, epochs=spec.base.epochs,
                             tb_logdir=paths.tensorboard, quiet=quiet)

    def make():
        sampler = optuna.samplers.TPESampler(seed=s.seed, multivariate=True,
                                             n_startup_trials=max(2, min(10, s.num_samples // 3)))
        searcher = OptunaSearch(space=to_optuna(plan["dists"]), metric=s.metric, mode=s.mode,
                                points_to_evaluate=[plan["recipe"]], sampler=sampler)
        scheduler = None
        if s.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="epoch", metric=s.metric, mode=s.mode, max_t=spec.base.epochs,
                                      grace_period=plan["grace_period"], reduction_factor=s.reduction_factor)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples,
                                        max_concurrent_trials=s.max_concurrent, reuse_actors=True),
            run_config=_run_config(paths, "search", [progress], max_failures=2),
        )

    grid = _fit(make, paths.ray_stage("search"), trainable, resume=resume)
    summary = summarize_search(grid, spec, plan)
    summary.to_csv(paths.root / "summary.csv", index=False)
    return summary


def summarize_search(grid, spec: SpaceSpec, plan: dict[str, Any]) -> pd.DataFrame:
    """One row per trial: its config, final and best metrics, status, epochs run."""
    rows = []
    metric = spec.search.metric
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
        # the trainable reports the best-so-far with every epoch (Tune's own loggers are off)
        best = float(m.get(VAL_ACC_BEST, math.nan)) if metric == VAL_ACC else math.nan
        if not math.isfinite(best) and res.metrics_dataframe is not None and metric in res.metrics_dataframe:
            best = float(res.metrics_dataframe[metric].max())
        rows.append({"trial_id": m.get("trial_id") or res.path.rstrip("/").split("/")[-1], **params,
                     **plan["constants"], "status": status, "epochs_run": epochs,
                     f"final_{metric}": m.get(metric, math.nan), f"best_{metric}": best,
                     "final_val/loss": m.get("val/loss", math.nan), "final_train/loss": m.get("train/loss", math.nan),
                     "is_recipe": all(_close(params.get(k), v) for k, v in plan["recipe"].items()),
                     "node_id": m.get("node_id")})  # the Ray node of the trial's last result
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(f"final_{metric}", ascending=spec.search.mode == "min", na_position="last",
                            ignore_index=True)
    return df


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def pick_best(summary: pd.DataFrame, spec: SpaceSpec) -> dict[str, Any]:
    """Best completed, finite, non-diverged trial by its final-epoch metric."""
    metric = f"final_{spec.search.metric}"
    ok = summary[(summary["status"] == "completed") & summary[metric].notna()]
    if ok.empty:
        raise StageError("no search trial completed without diverging; nothing to fit. "
                         "Check summary.csv and TensorBoard, narrow the space, and rerun.")
    row = ok.sort_values(metric, ascending=spec.search.mode == "min").iloc[0]
    return row.to_dict()


# -- stage 3 -----------------------------------------------------------------------------------

def run_final_stage(spec: SpaceSpec, paths: ExperimentPaths, params: dict[str, Any], *, resume: bool = False,
                    quiet: bool = False) -> dict[str, Any]:
    """Retrain ``params`` over ``final.seeds`` seeds; one test evaluation each; mean and spread."""
    from .trainables import onecycle_trainable

    resources, tune = _resources(spec)
    base = spec.base.to_flat() | params
    seeds = [spec.search.seed + 1000 + i for i in range(spec.final.seeds)]  # unseen by the search
    trainable = tune.with_resources(
        tune.with_parameters(onecycle_trainable, base=base, tb_logdir=str(paths.tensorboard), stage="final",
                             hparam_keys=tuple(params),
                             cpus=spec.search.cpus_per_trial),
        resources)
    progress = StageProgress("final", len(seeds), metric=TEST_ACC, mode="max", epochs=None, tb_logdir=paths.tensorboard,
                             quiet=quiet)

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
                     "error": None if res.error is None else str(res.error)[:300], "node_id": m.get("node_id")})
    accs = [r["test/acc"] for r in runs if r["test/acc"] is not None and not r["diverged"]]
    return clean({"runs": runs, "test_acc_mean": float(np.mean(accs)) if accs else None,
                  "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else (0.0 if accs else None),
                  "n": len(accs), "seeds": seeds})
