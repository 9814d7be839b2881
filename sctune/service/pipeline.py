"""One run of sctune: the three stages in order, around Ray's lifecycle (the engine of the CLI and the API).

``run(space, options)``:

1. validates the request (``experiment.prepare``) and takes the experiment's lock; SIGINT/SIGTERM become a
   pause, and a watchdog ends the Ray it starts if this process dies (``ray_session.experiment_session``);
2. plans the compute (``budget.make_plan``, the ``[plan]`` lines) before Ray starts;
3. starts or joins Ray, refuses per-trial resources no node can hold and a task the workers cannot import
   (one probe task), before the experiment folder exists (``ray_session.start_checked``);
4. runs the stages not done yet (``_run_stages``): stage 1's bounds give the anchors, the anchors give stage
   2's plan (made once, stored in search_plan.json), the search's best trial is fitted again and tested;
5. writes best.json and report.md, and shuts its Ray down.

A stage whose output is present and readable is not run again; on ``--resume`` Tune restores the finished
trials of an unfinished stage, so nothing is retrained.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import ConfigError
from .budget import accuracy_se, compute_summary, make_plan, range_cost_fte, search_budget
from .experiment import (
    DEFAULT_SPACE,
    ExperimentPaths,
    Options,
    StageError,
    as_options,
    cluster_address,
    mark_done,
    prepare,
    read_dict,
    read_output,
    read_summary,
    resumed_options,
    write_json,
)
from .lifecycle import GUARD, Interrupted, interrupted_message
from .ray_session import experiment_session, quiet_ray_env, read_cluster_yaml, start_checked, stop_ray
from .safeguards import kept_options, load_in_driver, space_sha256
from .space import SpaceError, SpaceSpec
from .tune_state import note_orphans

if TYPE_CHECKING:
    from .plan import SearchPlan

STAGE_ORDER = {"range": ("range",), "search": ("search",), "final": ("final",), "all": ("range", "search", "final")}


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
    o = as_options(options, **changes)
    quiet_ray_env(o.verbose)
    if o.stage == "plan":  # a dry run: no lock, no Ray, nothing written
        return _run(space, o)
    address = cluster_address(o.address)
    _, exp, state = prepare(space, o.replace(address=address))
    o = resumed_options(o.replace(name=state["name"]))  # a generated name, fixed once; --resume: the kept options
    with experiment_session(exp, address):
        return _run(space, o)


def _run(space: str | Path | SpaceSpec | None, o: Options) -> SearchResults:
    """``run``'s work, under the experiment lock (its validation is repeated here, under the lock)."""
    from ..core.tasks import check_shippable, registrations
    from ..core.train import tail_key
    from ..present.progress import start_clock
    from ..present.report import print_plan, write_report

    t0 = time.monotonic()
    start_clock()  # the progress display's elapsed time and ETA count from here, across the stages
    address = cluster_address(o.address)
    o = resumed_options(o)
    spec, exp, state = prepare(space, o.replace(address=address))
    kept = kept_options(o, spec)  # recorded in state.json: --resume restores them
    autoscale = read_cluster_yaml(o.cluster_yaml)  # a bad --cluster-yaml fails before anything else is done
    # The plan (iterations and FTE of each stage; with a budget, stage 1 and the final fit cut to fit it)
    # is made and shown before Ray starts; a budget that cannot hold one search trial is refused here.
    driver = load_in_driver(spec, local=address is None)  # a task that fails here stops the run: exit 2
    spec, cplan = make_plan(spec, budget_from_cli=o.budget is not None, sizes=driver.get("sizes", False),
                            default_budget=not o.smoke)
    filled = [f"filled in: {line}" for line in spec.filled]  # sections the file left out (autofill)
    if o.stage == "plan":
        print_plan(cplan, file=sys.stdout, extra=filled)
        return SearchResults(root=exp, plan=cplan)
    if not o.quiet:
        print_plan(cplan, extra=filled)
    regs = registrations(spec.base.task)  # the driver's own registrations travel with every trial
    try:
        check_shippable(spec.base.task, regs)
    except ConfigError as e:
        raise SpaceError(spec.path, e.path, e.rule) from None
    # Before any trial is queued and before the experiment folder exists (a refusal leaves nothing behind)
    started = start_checked(spec, o, regs, address, autoscale)
    paths = ExperimentPaths(exp)
    exp.mkdir(parents=True, exist_ok=True)
    if not paths.space.exists() and not isinstance(space, SpaceSpec):
        shutil.copyfile(Path(space) if space is not None else DEFAULT_SPACE, paths.space)
    state.setdefault("done", [])
    state.update({"smoke": o.smoke, "space": str(space if space is not None and not isinstance(space, SpaceSpec)
                                                  else spec.path)})
    # --resume plans with the same budget (the default one is chosen again, not stored as the user's)
    budget = None if cplan.get("budget_default") else spec.search.budget
    state["budget"] = budget
    state["options"] = kept | {"budget": budget}
    state["space_sha256"] = space_sha256(paths.space) if paths.space.exists() else None
    write_json(paths.state, state)
    results = SearchResults(root=exp, plan=cplan)
    from .storage import configure, reserve_bytes, stage_need

    configure(reserve_bytes(spec, driver.get("param_bytes")))  # each stage stops before the disk is full
    needs = {st: stage_need(st, spec, cplan, driver.get("param_bytes")) for st in ("range", "search", "final")}
    try:
        _run_stages(spec, paths, state, o, cplan, results, needs)
    except StageError as e:
        raise StageError(f"{e}\nFinished work is kept in {exp}; continue it with: python -m sctune.search --resume "
                         f"--name {exp.name} --storage-path {exp.parent} [more options]") from None
    finally:
        configure(None)
        stop_ray(started)
    write_report(exp, spec_path=str(spec.path), bounds=results.bounds, summary=results.summary, best=results.best,
                 metric=tail_key(spec.search.metric), wall_s=time.monotonic() - t0, plan=cplan,
                 compute=results.compute)
    return results


# -- the stages -----------------------------------------------------------------------------------

def _run_stages(spec: SpaceSpec, paths: ExperimentPaths, state: dict[str, Any], o: Options,
                cplan: dict[str, Any], results: SearchResults, needs: dict[str, int] | None = None) -> None:
    """Each stage asked for (``--stage``) that is not done yet runs; a done one is read back from its output.
    ``needs``: bytes each stage is expected to write; less free space stops the run before it (exit 28)."""
    from .plan import search_anchors, stored_plan
    from .storage import check_free

    needs = needs or {}
    from ..core.train import tail_key
    from ..present.report import print_bounds, search_figure
    from ..present.tensorboard import write_tb_config
    from .stages import run_range_stage, run_search_stage

    full_iters = cplan["fte"]["iterations"]  # iterations of one FTE (None: dataset size unknown)
    budget_fte = spec.search.budget
    want = STAGE_ORDER[o.stage]
    write_tb_config(spec, paths)
    saved_bounds = read_output(paths.bounds, read_dict)
    # Stage 1
    _check_interrupt("range", paths.root)
    if "range" in want and not ("range" in state["done"] and saved_bounds is not None):
        check_free(paths.root, "range", needs.get("range", 0))
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
    range_fte = range_cost_fte(results.bounds, paths, full_iters)
    results.compute = {"budget_fte": budget_fte, "range_fte": range_fte}
    # Stage 2
    _check_interrupt("search", paths.root)
    saved_summary = read_output(paths.summary, read_summary)
    if "search" in want and not ("search" in state["done"] and saved_summary is not None):
        if plan is None:
            raise StageError("no LR bounds to search within; give --lr-bounds MIN_LR MAX_LR")
        budget_left = search_budget(budget_fte, range_fte, cplan)
        check_free(paths.root, "search", needs.get("search", 0))
        write_tb_config(spec, paths, plan.dists)  # now with the searched ranges
        results.summary = run_search_stage(spec, paths, plan, resume=o.resume, quiet=o.quiet, budget_fte=budget_left,
                                           budget_is_default=bool(cplan.get("budget_default")),
                                           fte=(range_fte or 0.0, budget_fte, 1.0 / spec.base.epochs))
        _stage_done(state, "search", paths, results)
        note_orphans(paths.ray_stage("search"), paths.tensorboard, "search",
                     set(map(str, results.summary["trial_id"])))
        search_figure(results.summary, tail_key(spec.search.metric), paths.search_png)
    elif saved_summary is not None:
        results.summary = saved_summary
    # Stage 3
    _check_interrupt("final", paths.root)
    if "final" in want and results.summary is not None:
        if "final" not in state["done"]:
            check_free(paths.root, "final", needs.get("final", 0))
        _final(spec, paths, state, o, cplan, results, plan, anchors, range_fte)
        write_json(paths.state, state)


def _stage_done(state: dict[str, Any], stage: str, paths: ExperimentPaths, results: SearchResults) -> None:
    mark_done(state, stage)
    write_json(paths.state, state)
    results.stages_run.append(stage)


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
    results.compute = compute_summary(budget_fte, range_fte, spent_search, final_fte, cplan)
    results.best = {
        "trial_id": best_row["trial_id"], "config": spec.base.with_flat(**params).to_flat(),
        "searched": params, "metric": metric, "value": _py(best_row[metric]),
        "select_last": spec.search.select_last,
        # binomial standard error of an accuracy on the validation split: differences below ~2 of
        # these between trials are noise (digits: 216 images, one image = 0.46 points)
        "value_se": accuracy_se(_py(best_row[metric]), cplan["fte"]["val_samples"]),
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


