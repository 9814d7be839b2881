"""One run of sctune: the three stages in order, around Ray's lifecycle (the engine of the CLI and the API).

``run(space, options)``:

1. validates the request (``experiment.prepare``) and takes the experiment's lock; SIGINT/SIGTERM become a
   pause (``lifecycle``), and a watchdog ends the Ray it starts if this process dies;
2. plans the compute (``budget.plan_compute``, the ``[plan]`` lines) before Ray starts;
3. starts or joins Ray, refuses per-trial resources no node can hold (``cluster.preflight``) and a task the
   workers cannot import (one probe task), before the experiment folder exists;
4. runs the stages not done yet (``_run_stages``): stage 1's bounds give the anchors, the anchors give stage
   2's plan (made once, stored in search_plan.json), the search's best trial is fitted again and tested;
5. writes best.json and report.md, and shuts its Ray down.

A stage whose output is present and readable is not run again; on ``--resume`` Tune restores the finished
trials of an unfinished stage, so nothing is retrained.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError
from .experiment import (
    DEFAULT_SPACE,
    ExperimentPaths,
    Options,
    StageError,
    UsageError,
    as_options,
    cluster_address,
    mark_done,
    prepare,
    read_dict,
    read_output,
    read_summary,
    write_json,
)
from .lifecycle import GUARD, Interrupted, interrupted_message
from .space import SpaceError, SpaceSpec

if TYPE_CHECKING:
    from .plan import SearchPlan

log = logging.getLogger("sctune")

STAGE_ORDER = {"range": ("range",), "search": ("search",), "final": ("final",), "all": ("range", "search", "final")}
TASK_PROBE_TIMEOUT_S = 120.0


@dataclass
class SearchResults:
    root: Path
    bounds: dict[str, Any] | None = None
    summary: Any = None  # pandas.DataFrame of the search trials
    best: dict[str, Any] | None = None
    stages_run: list[str] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # budget.plan_compute: iterations and FTE of each stage, before the start
    compute: dict[str, Any] | None = None  # FTE spent per stage, against the budget

    @property
    def tensorboard_command(self) -> str:
        return ExperimentPaths(self.root).tensorboard_command()


# -- the run, under the experiment's lock ---------------------------------------------------------------

def run(space: str | Path | SpaceSpec | None = None, options: Options | None = None, **changes: Any) -> SearchResults:
    """Run sctune's stages and return their results.

    ``space``: a search-space file (default: the embedded digits space) or a parsed ``SpaceSpec``; ``options``:
    an ``Options``, or its fields as keywords (``run(space, name="x", smoke=True)``).
    Raises ``ConfigError`` (bad input, before Ray starts; also when another run holds the experiment),
    ``StageError`` (a stage cannot go on) or ``Interrupted`` (SIGINT/SIGTERM: the stage stopped, nothing is
    lost, ``--resume`` continues it).

    While it runs it holds the experiment's lock (one run per experiment folder), treats SIGINT/SIGTERM as a
    pause (main thread), and when it starts Ray itself, a watchdog ends Ray's processes if this process dies.
    """
    import signal

    from .lifecycle import MARKER_VAR, ExperimentLock, LockedError, new_marker, reap, start_watchdog

    o = as_options(options, **changes)
    _quiet_ray_env(o.verbose)
    if o.stage == "plan":  # a dry run: no lock, no Ray, nothing written
        return _run(space, o)
    address = cluster_address(o.address)
    _, exp, state = prepare(space, o.replace(address=address))
    o = o.replace(name=state["name"])  # a generated name, fixed once
    try:
        lock = ExperimentLock(exp).acquire()
    except LockedError as e:
        raise UsageError("--name", str(e)) from None
    marker = watchdog = None
    try:
        GUARD.reset()
        GUARD.install()
        ray_mod = sys.modules.get("ray")
        if address is None and not (ray_mod is not None and ray_mod.is_initialized()):
            # every process of the Ray we start carries the marker: the watchdog ends them if we die
            marker = new_marker()
            os.environ[MARKER_VAR] = marker
            watchdog = start_watchdog(marker)
        try:
            return _run(space, o)
        except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM: stopped at once
            from .progress import active_progress

            p = active_progress()  # the stage running when stopped (None before the first one started)
            raise Interrupted(GUARD.signum or signal.SIGINT, interrupted_message(
                p.stage if p else None, p.done if p else None, p.total if p else None, exp,
                GUARD.signum or signal.SIGINT)) from None
    finally:
        if marker is not None:
            os.environ.pop(MARKER_VAR, None)
            reap(marker, grace=1.0)  # Ray's agents can outlive ray.shutdown()
            if watchdog is not None:
                watchdog.kill()
                watchdog.wait()
        GUARD.uninstall()
        lock.release()


def _run(space: str | Path | SpaceSpec | None, o: Options) -> SearchResults:
    """``run``'s work, under the experiment lock (its validation is repeated here, under the lock)."""
    from .report import print_plan, write_report
    from .tasks import check_shippable, registrations
    from .train import tail_key

    t0 = time.monotonic()
    address = cluster_address(o.address)
    spec, exp, state = prepare(space, o.replace(address=address))
    autoscale = _read_cluster_yaml(o.cluster_yaml)  # a bad --cluster-yaml fails before anything else is done
    # The plan (iterations and FTE of each stage; with a budget, stage 1 and the final fit cut to fit it)
    # is made and shown before Ray starts; a budget that cannot hold one search trial is refused here.
    spec, cplan = make_plan(spec, budget_from_cli=o.budget is not None, default_budget=not o.smoke)
    if o.stage == "plan":
        print_plan(cplan, file=sys.stdout)
        return SearchResults(root=exp, plan=cplan)
    if not o.quiet:
        print_plan(cplan)
    regs = registrations(spec.base.task)  # the driver's own registrations travel with every trial
    try:
        check_shippable(spec.base.task, regs)
    except ConfigError as e:
        raise SpaceError(spec.path, e.path, e.rule) from None
    started = _start_ray(address, verbose=o.verbose, dashboard=o.dashboard, num_cpus=o.num_cpus,
                         runtime_env=_user_runtime_env(spec, regs, address))
    GUARD.install()  # again: ray.init replaces the SIGTERM handler (its own aborts with a stack dump)
    try:
        # Before any trial is queued and before the experiment folder exists: a refused request
        # leaves nothing behind, so the same command can be rerun with a fixed option.
        _preflight(spec, cluster_yaml=o.cluster_yaml, autoscale=autoscale)
        _check_task_on_workers(spec, regs)
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise
    paths = ExperimentPaths(exp)
    exp.mkdir(parents=True, exist_ok=True)
    if not paths.space.exists() and not isinstance(space, SpaceSpec):
        shutil.copyfile(Path(space) if space is not None else DEFAULT_SPACE, paths.space)
    state.setdefault("done", [])
    state.update({"smoke": o.smoke, "space": str(space if space is not None and not isinstance(space, SpaceSpec)
                                                  else spec.path)})
    # --resume plans with the same budget (the default one is chosen again, not stored as the user's)
    state["budget"] = None if cplan.get("budget_default") else spec.search.budget
    write_json(paths.state, state)
    results = SearchResults(root=exp, plan=cplan)
    try:
        _run_stages(spec, paths, state, o, cplan, results)
    except StageError as e:
        raise StageError(f"{e}\nFinished work is kept in {exp}; continue it with: python -m sctune.search --resume "
                         f"--name {exp.name} --storage-path {exp.parent} [more options]") from None
    finally:
        if started:
            import ray

            ray.shutdown()
    write_report(exp, spec_path=str(spec.path), bounds=results.bounds, summary=results.summary, best=results.best,
                 metric=tail_key(spec.search.metric), wall_s=time.monotonic() - t0, plan=cplan,
                 compute=results.compute)
    return results


# -- the stages -----------------------------------------------------------------------------------

def _run_stages(spec: SpaceSpec, paths: ExperimentPaths, state: dict[str, Any], o: Options,
                cplan: dict[str, Any], results: SearchResults) -> None:
    """Each stage asked for (``--stage``) that is not done yet runs; a done one is read back from its output."""
    from .plan import search_anchors, stored_plan
    from .report import print_bounds, search_figure
    from .stages import run_range_stage, run_search_stage
    from .train import tail_key

    full_iters = cplan["fte"]["iterations"]  # iterations of one FTE (None: dataset size unknown)
    budget_fte = spec.search.budget
    want = STAGE_ORDER[o.stage]
    write_tb_config(spec, paths)
    saved_bounds = read_output(paths.bounds, read_dict)
    # Stage 1
    _check_interrupt("range", paths.root)
    if "range" in want and not ("range" in state["done"] and saved_bounds is not None):
        results.bounds = run_range_stage(spec, paths, resume=o.resume, quiet=o.quiet, lr_bounds=o.lr_bounds,
                                         wd_prior=o.wd_prior,
                                         fte=(0.0, budget_fte, 1.0 / full_iters if full_iters else None))
        _stage_done(state, "range", paths, results)
    elif saved_bounds is not None:
        results.bounds = saved_bounds
    elif paths.bounds.exists() and o.lr_bounds is None:
        raise StageError(f"{paths.bounds} is unreadable: rebuild it with --stage range --resume (Tune restores "
                         "the finished range tests), or give --lr-bounds MIN_LR MAX_LR")
    if results.bounds is not None and not o.quiet:
        print_bounds(results.bounds)
    anchors = search_anchors(results.bounds, spec, lr_bounds=o.lr_bounds, wd_prior=o.wd_prior)
    plan = stored_plan(paths, spec, anchors) if anchors is not None else None
    range_fte = _range_cost_fte(results.bounds, paths, full_iters)
    results.compute = {"budget_fte": budget_fte, "range_fte": range_fte}
    # Stage 2
    _check_interrupt("search", paths.root)
    saved_summary = read_output(paths.summary, read_summary)
    if "search" in want and not ("search" in state["done"] and saved_summary is not None):
        if plan is None:
            raise StageError("no LR bounds to search within; give --lr-bounds MIN_LR MAX_LR")
        search_budget = _search_budget(budget_fte, range_fte, cplan)
        write_tb_config(spec, paths, plan.dists)  # now with the searched ranges
        results.summary = run_search_stage(spec, paths, plan, resume=o.resume, quiet=o.quiet, budget_fte=search_budget,
                                           budget_is_default=bool(cplan.get("budget_default")),
                                           fte=(range_fte or 0.0, budget_fte, 1.0 / spec.base.epochs))
        _stage_done(state, "search", paths, results)
        search_figure(results.summary, tail_key(spec.search.metric), paths.search_png)
    elif saved_summary is not None:
        results.summary = saved_summary
    # Stage 3
    _check_interrupt("final", paths.root)
    if "final" in want and results.summary is not None:
        _final(spec, paths, state, o, cplan, results, plan, anchors, range_fte)
        write_json(paths.state, state)


def _stage_done(state: dict[str, Any], stage: str, paths: ExperimentPaths, results: SearchResults) -> None:
    mark_done(state, stage)
    write_json(paths.state, state)
    results.stages_run.append(stage)


def _search_budget(budget_fte: float | None, range_fte: float | None, cplan: dict[str, Any]) -> float | None:
    """The search's share of the budget: what is left after stage 1 (its real cost) and the planned final fit."""
    if budget_fte is None:
        return None
    search_budget = budget_fte - (range_fte or 0.0) - cplan["final"]["fte"]
    if search_budget < 1.0:
        raise StageError(f"after stage 1 ({range_fte:.2f} FTE) and the final fit ({cplan['final']['fte']:.2f} "
                         f"FTE), the budget of {budget_fte:g} FTE leaves {search_budget:.2f} FTE: not one "
                         "full search trial; raise --budget")
    return search_budget


def _final(spec: SpaceSpec, paths: ExperimentPaths, state: dict[str, Any], o: Options, cplan: dict[str, Any],
           results: SearchResults, plan: SearchPlan | None, anchors, range_fte: float | None) -> None:
    """Stage 3 (unless best.json says it is done), then best.json: the best trial, its final fit, compute."""
    from .stages import run_final_stage
    from .summaries import pick_best, search_fte

    budget_fte = spec.search.budget
    best_row = pick_best(results.summary, spec)
    keys = (set(plan.dists) | set(plan.constants)) if plan is not None else set()  # what the search chose
    params = {k: _py(best_row[k]) for k in keys if k in best_row}
    saved_best = read_output(paths.best, read_dict) if "final" in state["done"] else None
    spent_search = search_fte(results.summary, spec)
    fte_per_epoch = cplan["final"]["fte"] / max(1, spec.final.seeds) / cplan["final"]["epochs"]
    if saved_best is not None:
        final = saved_best.get("final")
    else:
        final = run_final_stage(spec, paths, params, resume=o.resume, quiet=o.quiet, best_row=best_row,
                                refit_epochs=cplan["final"]["epochs"],
                                fte=((range_fte or 0.0) + spent_search, budget_fte, fte_per_epoch))
        mark_done(state, "final")
        results.stages_run.append("final")
    metric = best_row["_score_column"]
    final_fte = fte_per_epoch * sum(float(r.get("epochs") or 0) for r in (final or {}).get("runs", [])
                                    if not r.get("search_trial"))  # the best trial tested as it is: 0
    results.compute = _compute_summary(budget_fte, range_fte, spent_search, final_fte, cplan)
    results.best = {
        "trial_id": best_row["trial_id"], "config": spec.base.with_flat(**params).to_flat(),
        "searched": params, "metric": metric, "value": _py(best_row[metric]),
        "select_last": spec.search.select_last,
        # binomial standard error of an accuracy on the validation split: differences below ~2 of
        # these between trials are noise (digits: 216 images, one image = 0.46 points)
        "value_se": _accuracy_se(_py(best_row[metric]), cplan["fte"]["val_samples"]),
        "final_epoch_value": _py(best_row.get(f"final_{spec.search.metric}")),
        "final": final, "anchors": anchors.to_dict() if anchors else None,
        "compute": results.compute,
    }
    write_json(paths.best, results.best)


def _check_interrupt(stage: str, exp: Path) -> None:
    """Between stages: an interrupt received since the last stage stops the run before this one starts."""
    if GUARD.requested:
        raise Interrupted(GUARD.signum, interrupted_message(stage, 0, None, exp, GUARD.signum))


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


# -- compute: the plan before the start, the FTE spent after ----------------------------------------------

def _dataset_sizes(spec: SpaceSpec) -> dict[str, int] | None:
    """Split sizes of the task's data (loaded once in the driver, then freed); None if it cannot be loaded
    here (e.g. a cluster whose data lives only on the workers)."""
    from .data import known_split_sizes, load_dataset

    try:
        sizes = load_dataset(spec.base.task).sizes()
    except Exception as e:
        sizes = known_split_sizes(spec.base.task)
        if sizes is None:
            log.warning("could not load %s here to count iterations (%s); the plan shows epochs only",
                        spec.base.task.dataset, e)
    return sizes


def make_plan(spec: SpaceSpec, *, budget_from_cli: bool = False,
              default_budget: bool = False) -> tuple[SpaceSpec, dict[str, Any]]:
    """``budget.plan_compute`` on the task's real split sizes; a budget it cannot meet is a UsageError
    (exit 2) naming ``--budget`` or the space file's ``search.budget``. ``default_budget``: a spec without a
    budget gets ``budget.DEFAULT_BUDGET_FTE`` (not with --smoke: its tiny budgets are the smoke section's)."""
    from .budget import DEFAULT_BUDGET_FTE, BudgetError, plan_compute

    key = "--budget" if budget_from_cli else f"{spec.path}: search.budget"
    is_default = default_budget and spec.search.budget is None
    if is_default:
        spec = spec.with_search(budget=DEFAULT_BUDGET_FTE)
        key = f"--budget (none given: the default {DEFAULT_BUDGET_FTE:g} FTE)"
    try:
        return plan_compute(spec, _dataset_sizes(spec), budget=spec.search.budget, budget_key=key,
                            budget_is_default=is_default)
    except BudgetError as e:
        raise UsageError(key, e.rule) from None


def _range_cost_fte(bounds: dict[str, Any] | None, paths: ExperimentPaths, full_iters: int | None) -> float | None:
    """Stage 1's cost in FTE: bounds.json's ``cost_fte`` when stage 1 reports it, else the range-test
    iterations in curves.csv (one row per step taken) / the iterations of one FTE."""
    if bounds is None:
        return None
    if isinstance(bounds.get("cost_fte"), (int, float)):
        return float(bounds["cost_fte"])
    if not full_iters or not paths.curves.exists():
        return None
    with paths.curves.open() as f:
        steps = sum(1 for _ in f) - 1
    return max(0, steps) / full_iters


def _accuracy_se(value: Any, n: int | None) -> float | None:
    if not n or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return None
    return (value * (1.0 - value) / n) ** 0.5


def _compute_summary(budget: float | None, range_fte: float | None, search: float, final: float,
                     plan: dict[str, Any]) -> dict[str, Any]:
    total = (range_fte or 0.0) + search + final
    return {"budget_fte": budget, "spent_fte": {"range": range_fte, "search": search, "final": final,
                                                "total": total},
            "fte": plan["fte"], "within_budget": None if budget is None else total <= budget + 1e-9}


# -- TensorBoard's HParams config ----------------------------------------------------------------

def write_tb_config(spec: SpaceSpec, paths: ExperimentPaths, dists: dict | None = None) -> None:
    """One HParams config for every stage, written before the first trial.

    TensorBoard shows only the columns the config lists and a running TensorBoard keeps the first
    config it reads, so it names the range-test, search and final hparams and metrics at once. ``dists``:
    stage 2's searched ranges (its plan); until stage 1 is done, ranges relative to its results are shown
    over what they can span.
    """
    from . import tensorboard as tb
    from .train import TEST_ACC, VAL_ACC, tail_key

    rt = spec.range_test
    if dists is None:
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
    # the fidelity: a halving trial's schedule length (complete one-cycles of 1/8 .. 1 of the training)
    hparams.setdefault("epochs", {"type": "int", "low": 1, "high": spec.base.epochs})
    hparams |= {"seed": {"type": "int", "low": 0, "high": spec.search.seed + 10_000},
                "stage": {"choices": ["range", "search", "final"]}}
    metrics = [(VAL_ACC, "validation accuracy"), (TEST_ACC, "test accuracy (final fit)"),
               ("val/loss", "validation loss"), ("train/loss", "training loss"),
               ("range_test/max_lr", "range test: max LR"), ("range_test/min_lr", "range test: min LR"),
               ("range_test/peak_acc", "range test: peak accuracy"),
               (tail_key(spec.search.metric),
                f"selection score: mean of the last {spec.search.select_last} {spec.search.metric}")]
    try:
        tb.write_hparams_config(paths.tensorboard, hparams=hparams, metrics=metrics)
    except (ValueError, OSError) as e:  # TensorBoard bookkeeping must never stop a search
        log.warning("could not write the TensorBoard HParams config: %s", e)


# -- Ray: start, the user's code on the workers, the preflight --------------------------------------------

def _quiet_ray_env(verbose: bool) -> None:
    # Local Ray binds loopback only, never phones home, and keeps its console noise down.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # sctune writes TensorBoard itself
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's experiment state (which trials finished, the searcher's state) reaches the storage path at most
    # ~1 s late, so a killed driver's --resume reruns only trials that finished in its last second (Tune's
    # "auto" period is 10 s or more). Writing the state of a few hundred trials takes milliseconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if not verbose:
        # a failed trial's traceback stays in its error.txt; the progress output names the reason in one line
        os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _start_ray(address: str | None, *, verbose: bool, dashboard: bool, num_cpus: int | None = None,
               runtime_env: dict[str, Any] | None = None) -> bool:
    """Connect to ``address`` or start a local Ray on loopback. Returns True if we started it.

    ``runtime_env`` (the user's modules as ``py_modules``) applies to every worker of this driver."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=level, runtime_env=runtime_env)
        return True
    # A local Ray serves this process only: its GCS, raylet and dashboard listen on loopback, never on the
    # machine's network address (Ray has no authentication).
    # Its processes are children of this one, in its process group: a Ctrl-C or SIGTERM sent to the group (a
    # terminal, a job scheduler) must reach only this driver, which stops the stage and then Ray, in order.
    # Blocked signals stay blocked across fork and exec (Ray blocks SIGINT in its processes the same way).
    import signal

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=verbose, logging_level=level, runtime_env=runtime_env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return True


def _job_runtime_env() -> dict[str, Any]:
    """The runtime environment of the Ray job this driver runs in (``ray job submit``), else {}."""
    import json

    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def _user_runtime_env(spec: SpaceSpec, regs: dict[str, Any], address: str | None) -> dict[str, Any] | None:
    """``{"py_modules": [...]}`` for the user's code the workers could not import by themselves."""
    from .tasks import py_modules_to_ship

    job_env = _job_runtime_env()
    ship = py_modules_to_ship(spec.base.task, regs, local=address is None,
                              job_working_dir="working_dir" in job_env)
    if not ship:
        return None
    if "py_modules" in job_env:  # Ray refuses to merge a second py_modules into the job's
        log.warning("not shipping %s: the job's runtime environment sets py_modules already; add them there",
                    ", ".join(ship))
        return None
    log.info("shipping to Ray's workers (runtime_env py_modules): %s", ", ".join(ship))
    return {"py_modules": ship}


def _check_task_on_workers(spec: SpaceSpec, regs: dict[str, Any]) -> None:
    """One Ray task resolves the dataset and model the way a trial will, before any trial is queued: a task
    the workers cannot import (a module only the driver can see) is refused with exit 2, not 12 failed trials."""
    import ray
    from ray.exceptions import GetTimeoutError

    from .tasks import check_in_worker, is_reference

    task = spec.base.task
    if not (task.modules or is_reference(task.dataset) or is_reference(task.model) or any(regs.values())):
        return  # sctune's own datasets and models: nothing of the user's to find
    probe = ray.remote(num_cpus=0, max_retries=0)(check_in_worker)
    ref = probe.remote(spec.base.task, regs)
    try:
        ray.get(ref, timeout=TASK_PROBE_TIMEOUT_S)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        log.warning("could not check the task in a Ray worker within %.0fs; starting the trials anyway",
                    TASK_PROBE_TIMEOUT_S)
    except Exception as e:  # ConfigError from the worker; or the driver's registrations could not be unpickled there
        from .progress import error_line

        cause = getattr(e, "cause", None) or e
        path = cause.path if isinstance(cause, ConfigError) else "task"
        why = cause.rule if isinstance(cause, ConfigError) else f"cannot be loaded: {error_line(cause)}"
        raise SpaceError(spec.path, path, f"{why} (in a Ray worker; the driver resolved it: make the module importable "
                                          "on every node, e.g. ray job submit --working-dir with the module in it)") from None


def _read_cluster_yaml(cluster_yaml: str | None) -> tuple[dict[str, float] | None, list[dict[str, float]] | None]:
    """(autoscale_limits, autoscale_node_types) of a launcher YAML, or UsageError naming --cluster-yaml."""
    if not cluster_yaml:
        return None, None
    import yaml

    from .cluster import autoscale_limits, autoscale_node_types

    try:
        return autoscale_limits(cluster_yaml), autoscale_node_types(cluster_yaml)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UsageError("--cluster-yaml", f"{cluster_yaml}: {e}") from None


def _preflight(spec: SpaceSpec, *, cluster_yaml: str | None = None,
               autoscale: tuple[dict[str, float] | None, list[dict[str, float]] | None] | None = None) -> None:
    """Refuse (UsageError, exit code 2) per-trial resources that no node of the connected cluster, nor any
    node the launcher config (``--cluster-yaml``) can add, will ever hold; warn about queueing.

    Runs right after Ray connects and before any trial or experiment file is created: an impossible
    request would otherwise sit PENDING forever."""
    from .cluster import PreflightError, cluster_snapshot, preflight

    limits, node_types = autoscale if autoscale is not None else _read_cluster_yaml(cluster_yaml)
    available, per_node = cluster_snapshot()
    try:
        warnings = preflight(cpus_per_trial=spec.search.cpus_per_trial, gpus_per_trial=spec.search.gpus_per_trial,
                             max_concurrent=spec.search.max_concurrent, available=available,
                             autoscale_max=limits, per_node=per_node, autoscale_node_types=node_types)
    except PreflightError as e:
        if cluster_yaml and limits is None:
            # The YAML declares no node resources (the launcher detects them at `ray up`): the
            # autoscaler may still add a node that fits, so this cannot be refused offline.
            log.warning("%s; %s does not declare node resources, so the autoscaler may still add a node "
                        "that fits: trials will wait for it", e, cluster_yaml)
            return
        msg = str(e)
        where = next((opt for opt in ("--gpus-per-trial", "--cpus-per-trial") if msg.startswith(opt)),
                     "--gpus-per-trial" if spec.search.gpus_per_trial > 0 else "--cpus-per-trial")
        raise UsageError(where, msg) from None
    for warning in warnings:
        log.warning("%s", warning)
