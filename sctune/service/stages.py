"""The three stages on Ray Tune: Tuners, their search algorithms (``searchers``), and what each stage writes.

1. ``run_range_stage``: range tests in parallel as Tune trials, a grid of weight decays x seeds;
   bounds per WD aggregated over seeds; the WD prior is the one that lets the LR go highest.
2. ``run_search_stage``: ``Tuner`` + ``searchers.make_searcher`` (by default successive halving over
   complete one-cycle schedules of 1/8 .. 1 of the training, new configurations from multivariate TPE,
   Smith's recipe first), all from stage 2's plan (``plan.build_plan``).
3. ``run_final_stage``: the best configuration retrained over several seeds, tested once.

Each stage turns Tune's ``ResultGrid`` into plain rows and hands them to ``summaries`` (pure functions);
its files are named by ``experiment.ExperimentPaths``. Ray is imported when a stage runs, not when this
module is imported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.config import error_line
from ..core.tasks import registrations
from ..core.train import TEST_ACC, VAL_ACC
from ..present.progress import active_progress
from .experiment import ExperimentPaths, StageError, clean, write_json
from .lifecycle import GUARD, Interrupted, interrupted_message
from .plan import SearchPlan
from .space import SpaceSpec
from .storage import stage_callbacks
from .summaries import final_fit_summary, no_bounds_message, range_bounds, summarize_search

log = logging.getLogger(__name__)


# -- Ray helpers -------------------------------------------------------------------------------

def trial_resources(spec: SpaceSpec):
    from ray import tune

    return {"cpu": spec.search.cpus_per_trial, "gpu": spec.search.gpus_per_trial}, tune


def stage_run_config(paths: ExperimentPaths, stage: str, callbacks: list, *, max_failures: int, keep: int | None = 2):
    from ray import tune

    return tune.RunConfig(
        name=stage,
        storage_path=str(paths.ray.resolve()),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep) if keep else None,
        callbacks=[*callbacks, *stage_callbacks(paths.root, stage)],  # a full disk, a failing setup: stop
        verbose=0,
    )


def _progress(stage: str, total: int | None, **kw):
    from ..present.progress import StageProgress  # Tune's Callback base: Ray loads here

    return StageProgress(stage, total, **kw)


def _fit(tuner_factory, restore_path: Path, trainable, *, resume: bool):
    """Fresh Tuner, or Tuner.restore when a previous run of this stage left state behind.

    Tune's state is checked first (``tune_state.check_restorable``): a Tune that cannot read it logs a
    traceback and silently runs the whole stage again. Corrupted state stops with a StageError saying what to do.
    """
    from ray import tune

    from .tune_state import check_restorable, corrupted_tune_state, install_log_filters

    if resume and tune.Tuner.can_restore(str(restore_path)) and check_restorable(restore_path):
        log.info("restoring %s", restore_path)
        try:
            tuner = tune.Tuner.restore(str(restore_path), trainable=trainable, resume_errored=True)
        except Exception as e:
            raise StageError(corrupted_tune_state(restore_path, f"{type(e).__name__}: {e}")) from None
    else:
        tuner = tuner_factory()
    install_log_filters()
    grid = tuner.fit()
    GUARD.raise_pending()  # stopped for a full disk or a setup failure (storage.StorageWatch)
    if GUARD.requested:
        # Tune stopped on the interrupt and saved its state with the unfinished trials unfinished: the stage is
        # not done, its outputs are not written, and --resume continues it (Tuner.restore).
        p = active_progress()
        p = p if p is not None and p.stage == restore_path.name else None
        raise Interrupted(GUARD.signum, interrupted_message(restore_path.name, p.done if p else None,
                                                           p.total if p else None, restore_path.parent.parent,
                                                           GUARD.signum))
    return grid


def _trial_id(res) -> str:
    return (res.metrics or {}).get("trial_id") or res.path.rstrip("/").split("/")[-1]


# -- stage 1 -----------------------------------------------------------------------------------

def run_range_stage(spec: SpaceSpec, paths: ExperimentPaths, *, resume: bool = False, quiet: bool = False,
                    lr_bounds: tuple[float, float] | None = None, wd_prior: float | None = None,
                    fte: tuple[float, float | None, float | None] | None = None) -> dict[str, Any]:
    """Parallel range tests -> ``range_test/bounds.json`` (returned). Raises StageError if unusable."""
    from .trainables import range_test_trainable

    resources, tune = trial_resources(spec)
    rt = spec.range_test
    seeds = [spec.search.seed + i for i in range(rt.repeats)]
    trainable = tune.with_resources(
        tune.with_parameters(range_test_trainable, train=spec.base.to_flat(), range_test=rt.to_dict(),
                             tb_logdir=str(paths.tensorboard), cpus=spec.search.cpus_per_trial,
                             user_task=registrations(spec.base.task)),
        resources)
    total = len(rt.weight_decays) * len(seeds)
    progress = _progress("range", total, metric="", mode="max", epochs=None, quiet=quiet, fte=fte)

    def make():
        return tune.Tuner(
            trainable,
            param_space={"weight_decay": tune.grid_search(list(rt.weight_decays)), "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.search.max_concurrent, reuse_actors=True),
            run_config=stage_run_config(paths, "range", [progress], max_failures=2, keep=None),
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
    curves.to_csv(paths.curves, index=False)
    return summarize_range_tests(spec, paths, curves, per_trial, lr_bounds=lr_bounds, wd_prior=wd_prior)


def summarize_range_tests(spec: SpaceSpec, paths: ExperimentPaths, curves: pd.DataFrame, per_trial: list[dict],
                          *, lr_bounds: tuple[float, float] | None = None,
                          wd_prior: float | None = None) -> dict[str, Any]:
    """``summaries.range_bounds``, written to bounds.json with its plot; StageError if no bounds came out."""
    out = range_bounds(spec, curves, per_trial, lr_bounds=lr_bounds, wd_prior=wd_prior)
    write_json(paths.bounds, out)
    _range_figure(spec, paths, curves, out)
    if out["chosen"] is None:
        raise StageError(no_bounds_message(out))
    return out


def _range_figure(spec: SpaceSpec, paths: ExperimentPaths, curves: pd.DataFrame, bounds: dict[str, Any]) -> None:
    try:
        from ..core.curves import range_summary_figure

        curves = pd.concat([df for _, df in curves.groupby(["weight_decay", "seed"], sort=True)], ignore_index=True)
        fig = range_summary_figure(curves, bounds, log_x=spec.range_test.step_mode == "exp",
                                   title=f"LR range test: {spec.base.task.dataset} / {spec.base.task.model}")
        fig.savefig(paths.range_png, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception as e:  # a plot must never lose the computed bounds
        log.warning("could not draw range_test.png: %s", e)


# -- stage 2 -----------------------------------------------------------------------------------

def run_search_stage(spec: SpaceSpec, paths: ExperimentPaths, plan: SearchPlan, *, resume: bool = False,
                     quiet: bool = False, budget_fte: float | None = None, budget_is_default: bool = False,
                     fte: tuple[float, float | None, float | None] | None = None) -> pd.DataFrame:
    """Joint one-cycle + regularization search over ``plan`` (``plan.build_plan``) with the search algorithm of
    ``searchers.make_searcher``; writes summary.csv and returns it.

    ``budget_fte``: compute the search may spend, in FTE (epochs / ``fixed.epochs``; a complete schedule at
    1/8 of the training costs 1/8); trials start until it is spent and ``num_samples`` is no cap (with
    ``halving`` it never is: without a budget it spends ``num_samples`` FTE). ``budget_is_default``: the budget
    is the default one, not the user's: full-length searches (asha, none) then stop at ``num_samples`` too,
    as they did before there was a default. ``fte``: see
    ``progress.ProgressLines``.
    """
    import optuna

    from .searchers import make_scheduler, make_searcher
    from .trainables import TensorBoardSessions, train_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no per-study chatter on the console
    resources, tune = trial_resources(spec)
    s = spec.search
    base = spec.base.to_flat() | plan.constants
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base, tb_logdir=str(paths.tensorboard), stage="search",
                             cpus=s.cpus_per_trial, user_task=registrations(spec.base.task),
                             select_metric=s.metric, select_last=s.select_last),
        resources)
    # trials start until the compute is spent (halving, or a budget the user gave)
    counted = plan.scheduler == "halving" or (budget_fte is not None and not budget_is_default)
    progress = _progress("search", None if counted else s.num_samples, metric=plan.select,
                         mode=s.mode, epochs=spec.base.epochs, quiet=quiet, fte=fte)
    sessions = TensorBoardSessions("search", paths.tensorboard, epochs=spec.base.epochs)

    def make():
        searcher = make_searcher(spec, plan, budget_epochs=None if budget_fte is None else
                                 budget_fte * spec.base.epochs)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(spec, plan),
                                        num_samples=-1 if counted else s.num_samples,
                                        # halving: the searcher limits concurrency itself (searchers)
                                        max_concurrent_trials=None if plan.scheduler == "halving" else
                                        s.max_concurrent, reuse_actors=True),
            run_config=stage_run_config(paths, "search", [progress, sessions], max_failures=2),
        )

    grid = _fit(make, paths.ray_stage("search"), trainable, resume=resume)
    rows = [{"trial_id": _trial_id(res), "config": res.config, "metrics": res.metrics, "error": error_line(res.error),
             "checkpoint": res.checkpoint.path if getattr(res, "checkpoint", None) is not None else None}
            for res in grid]
    summary = summarize_search(rows, spec, plan)
    summary.to_csv(paths.summary, index=False)
    return summary


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
    from .trainables import TensorBoardSessions, train_trial

    resources, tune = trial_resources(spec)
    base = spec.base.to_flat() | params
    if spec.final.refit:
        base |= {"train_on_val": True, "epochs": refit_epochs or spec.base.epochs}
    seeds = [spec.search.seed + 1000 + i for i in range(spec.final.seeds)]  # unseen by the search
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base, tb_logdir=str(paths.tensorboard), stage="final",
                             hparam_keys=tuple(params),
                             cpus=spec.search.cpus_per_trial, user_task=registrations(spec.base.task),
                             select_metric=spec.search.metric, select_last=spec.search.select_last),
        resources)
    progress = _progress("final", len(seeds), metric=TEST_ACC, mode="max", epochs=None, quiet=quiet, fte=fte)
    sessions = TensorBoardSessions("final", paths.tensorboard, epochs=None)

    def make():
        return tune.Tuner(
            trainable, param_space={"seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.search.max_concurrent, reuse_actors=True),
            run_config=stage_run_config(paths, "final", [progress, sessions], max_failures=2),
        )

    grid = _fit(make, paths.ray_stage("final"), trainable, resume=resume)
    runs = []
    for res in grid:
        m = res.metrics or {}
        runs.append({"seed": res.config.get("seed"), "test/acc": m.get(TEST_ACC), "test/loss": m.get("test/loss"),
                     "val/acc": m.get(VAL_ACC), "epochs": m.get("epoch"), "diverged": bool(m.get("diverged", 0)),
                     "error": error_line(res.error), "node_id": m.get("node_id")})
    return final_fit_summary(runs, seeds=seeds, refit=spec.final.refit, epochs=base["epochs"])


def evaluate_search_trial(spec: SpaceSpec, params: dict[str, Any], best_row: dict[str, Any]) -> dict[str, Any]:
    """Test the search's best trial as it is: its last checkpoint (precise-BN statistics included), once."""
    from ..core.data import load_dataset
    from ..core.models import build_model
    from ..core.train import TrainConfig, evaluate
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
