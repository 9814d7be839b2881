"""``python -m sctune.search [SPACE.yaml] [options]``: range tests, joint search, final fit on Ray Tune.

Everything the user can get wrong (the space file, options, the storage path, an existing
experiment, GPUs that are not there) is checked before Ray starts; such errors exit with code 2
and a message naming the file or option, the key path and the rule.

The Python API is ``run(...)``; the CLI only parses arguments and calls it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .budget import format_plan
from .config import ConfigError
from .lifecycle import GUARD, LOCK_NAME, Interrupted, interrupted_message
from .space import DEFAULT_SPACE_DIR, SearchConfig, SpaceError, SpaceSpec, load_space

log = logging.getLogger("sctune")

DEFAULT_SPACE = DEFAULT_SPACE_DIR / "digits.yaml"
DEFAULT_STORAGE = "./sctune_results"
EXIT_USAGE = 2  # bad input: nothing was started
EXIT_STAGE = 3  # a stage could not go on (e.g. no usable bounds); finished work is kept


class UsageError(ConfigError):
    """Bad option or state detected before any cluster work."""

    def __init__(self, where: str, message: str):
        super().__init__(where, message)


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
        return f"tensorboard --logdir {(self.root / 'tensorboard').resolve()} --host 127.0.0.1 --port 6006"


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


def _check_storage(storage_path: str | Path) -> Path:
    p = Path(storage_path).expanduser()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError("--storage-path", f"{p}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError("--storage-path", f"{p}: {probe} is not writable")
    return p.resolve()


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def prepare(space: str | Path | SpaceSpec | None = None, *, name: str | None = None,
            storage_path: str | Path = DEFAULT_STORAGE, stage: str = "all", resume: bool = False,
            smoke: bool = False, address: str | None = None, num_samples: int | None = None,
            max_concurrent: int | None = None, cpus_per_trial: float | None = None,
            gpus_per_trial: float | None = None, seed: int | None = None,
            lr_bounds: tuple[float, float] | None = None, wd_prior: float | None = None,
            budget: float | None = None, refit: bool | None = None
            ) -> tuple[SpaceSpec, Path, dict[str, Any]]:
    """All validation, no side effects beyond reading files. Returns (spec, experiment dir, state)."""
    if stage not in ("range", "search", "final", "all", "plan"):
        raise UsageError("--stage", f"must be range, search, final, all or plan, got {stage!r}")
    overrides = {"num_samples": num_samples, "max_concurrent": max_concurrent, "cpus_per_trial": cpus_per_trial,
                 "gpus_per_trial": gpus_per_trial, "seed": seed, "budget": budget}
    try:  # the options' own rules first: refused in milliseconds, before the space file pulls in torch
        SearchConfig.from_dict({k: v for k, v in overrides.items() if v is not None}, "search")
    except ConfigError as e:
        raise UsageError(f"--{e.path.rsplit('.', 1)[-1].replace('_', '-')}", e.rule) from None
    if lr_bounds is not None:
        lo, hi = lr_bounds
        if not (0 < lo < hi):
            raise UsageError("--lr-bounds", f"need 0 < MIN_LR < MAX_LR, got {lo} {hi}")
    if wd_prior is not None and wd_prior < 0:
        raise UsageError("--wd-prior", f"must be >= 0, got {wd_prior}")
    root_storage = _check_storage(storage_path)
    address = _cluster_address(address)  # RAY_ADDRESS counts: inside `ray job submit` the local checks don't apply
    state: dict[str, Any] = {}
    if name is not None and (not name or "/" in name or name.startswith(".")):
        raise UsageError("--name", f"must be a plain folder name, got {name!r}")
    if resume and name is None:
        raise UsageError("--resume", "needs --name of the experiment to resume "
                         f"(see the folders in {root_storage})")
    if name is not None:
        _check_not_in_use(root_storage / name)  # before the space file is read: refused in milliseconds
    if isinstance(space, SpaceSpec):
        spec = space
    else:
        space_path = Path(space) if space is not None else DEFAULT_SPACE
        if resume:
            # a resumed experiment runs with the space it started with
            saved = root_storage / name / "space.yaml"
            if saved.exists():
                space_path = saved
        spec = load_space(space_path, smoke=smoke)
    if name is None:
        name = f"{spec.name}{'-smoke' if smoke else ''}-{datetime.now():%Y%m%d-%H%M%S}"
    exp = root_storage / name
    state_file = exp / "state.json"
    _check_not_in_use(exp)
    if exp.exists() and any(p.name != LOCK_NAME for p in exp.iterdir()):
        if not state_file.exists():
            if resume:
                raise UsageError("--resume", f"{exp} holds no sctune experiment state (state.json missing); "
                                 "it cannot be resumed. Use a new --name.")
            raise UsageError("--name", f"{exp} exists and is not an sctune experiment; choose another --name")
        from .stages import read_json

        try:
            state = read_json(state_file)
            if not isinstance(state, dict) or not isinstance(state.get("done", []), list):
                raise ValueError("not an sctune experiment state")
        except (OSError, ValueError) as e:
            if not resume:
                raise UsageError("--name", f"experiment {name!r} already exists in {root_storage}, and its "
                                 f"{state_file} is corrupted ({e}). Resume it with --resume --name {name} (the "
                                 "state is rebuilt from the stage outputs), or pick a new --name.") from None
            # Rebuilt from the outputs: a stage whose output is missing or unreadable runs again, and Tune
            # restores its finished trials (nothing is retrained).
            log.warning("%s is corrupted (%s): rebuilding the experiment state from the stage outputs",
                        state_file, e)
            state = {"done": [st for st, out in (("range", "range_test/bounds.json"), ("search", "summary.csv"),
                                                 ("final", "best.json")) if (exp / out).exists()]}
        if not resume and stage == "all":
            raise UsageError("--name", f"experiment {name!r} already exists in {root_storage}. "
                             f"Resume it with --resume --name {name}, or pick a new --name.")
    elif resume:
        raise UsageError("--resume", f"no experiment {name!r} in {root_storage} to resume")
    if budget is None and resume:
        budget = state.get("budget")  # a resumed experiment keeps the budget it was planned with
    spec = _with_cli(spec, num_samples=num_samples, max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial,
                     gpus_per_trial=gpus_per_trial, seed=seed, budget=budget, refit=refit)
    if stage == "plan":  # a dry run: nothing below (Ray, GPUs, stage outputs) matters
        return spec, exp, state | {"name": name}
    if address is None and spec.search.gpus_per_trial > 0:
        gpus = _local_gpu_count()
        if gpus == 0:
            raise UsageError("--gpus-per-trial", f"{spec.search.gpus_per_trial:g} GPUs per trial requested but this "
                             "machine has no CUDA GPU; use 0 here, or --address to submit to a GPU cluster")
        if spec.search.gpus_per_trial > gpus:
            raise UsageError("--gpus-per-trial", f"{spec.search.gpus_per_trial:g} GPUs per trial but this machine "
                             f"has {gpus}")
    if address is None and spec.search.cpus_per_trial > (os.cpu_count() or 1):
        raise UsageError("--cpus-per-trial", f"{spec.search.cpus_per_trial:g} CPUs per trial but this machine has "
                         f"{os.cpu_count()}")
    if stage in ("search", "final") and not resume and not (exp / "range_test" / "bounds.json").exists() \
            and lr_bounds is None:
        raise UsageError("--stage", f"stage {stage!r} needs stage-1 bounds: run --stage range first with "
                         f"--name {name}, or give --lr-bounds MIN_LR MAX_LR")
    if stage == "final" and not (exp / "summary.csv").exists():
        raise UsageError("--stage", f"stage 'final' needs a finished search in {exp} (summary.csv)")
    return spec, exp, state | {"name": name}


def _with_cli(spec: SpaceSpec, *, refit: bool | None = None, **search) -> SpaceSpec:
    try:
        spec = spec.with_search(**search)
    except SpaceError as e:
        raise UsageError(f"--{e.path.rsplit('.', 1)[-1].replace('_', '-')}", e.rule) from None
    if refit is not None:
        import dataclasses

        spec = dataclasses.replace(spec, final=spec.final.replace(refit=refit))
    return spec


def _check_not_in_use(exp: Path) -> None:
    from .lifecycle import holder

    in_use = holder(exp) if exp.is_dir() else None
    if in_use:
        raise UsageError("--name", f"experiment {exp.name!r} in {exp.parent} is in use by {in_use}: one run per "
                         "experiment. Wait for it to end, or stop it (Ctrl-C) and rerun with --resume.")


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


TASK_PROBE_TIMEOUT_S = 120.0


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
        from .stages import error_line

        cause = getattr(e, "cause", None) or e
        path = cause.path if isinstance(cause, ConfigError) else "task"
        why = cause.rule if isinstance(cause, ConfigError) else f"cannot be loaded: {error_line(cause)}"
        raise SpaceError(spec.path, path, f"{why} (in a Ray worker; the driver resolved it: make the module importable "
                                          "on every node, e.g. ray job submit --working-dir with the module in it)") from None


def _cluster_address(address: str | None) -> str | None:
    """The Ray cluster to connect to: ``--address``, else ``RAY_ADDRESS``, else None (start Ray locally).

    ``ray job submit`` sets ``RAY_ADDRESS`` (the GCS address) for the job's driver, so a submitted
    ``python -m sctune.search`` joins the cluster it runs on, and the local-machine checks of ``prepare``
    (GPUs, CPUs of *this* machine) do not apply to it: the head of a GPU cluster usually has no GPU.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        return None
    if address is not None and address.startswith(("http://", "https://")):
        raise UsageError("--address", f"{address} (from --address or RAY_ADDRESS) is a Ray Jobs/dashboard address; "
                         "sctune's driver connects to the cluster itself (GCS host:port, or 'auto'). Submit with "
                         "`ray job submit --address http://... -- python -m sctune.search ...`, or unset RAY_ADDRESS "
                         "to run locally")
    return address


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


_PREPARE_KEYS = ("name", "storage_path", "stage", "resume", "smoke", "num_samples", "max_concurrent",
                 "cpus_per_trial", "gpus_per_trial", "seed", "lr_bounds", "wd_prior", "budget", "refit")


def run(space: str | Path | SpaceSpec | None = None, **options: Any) -> SearchResults:
    """Run sctune's stages and return their results (the CLI's engine).

    ``space``: a search-space file (default: the embedded digits space) or a parsed ``SpaceSpec``; options as
    the CLI's (``name``, ``storage_path``, ``stage``, ``resume``, ``smoke``, ``address``, ``num_samples``,
    ``max_concurrent``, ``cpus_per_trial``, ``gpus_per_trial``, ``seed``, ``lr_bounds``, ``wd_prior``,
    ``verbose``, ``quiet``, ``dashboard``, ``num_cpus``, ``cluster_yaml``, ``budget``, ``refit``).
    Raises ``ConfigError`` (bad input, before Ray starts; also when another run holds the experiment),
    ``StageError`` (a stage cannot go on) or ``Interrupted`` (SIGINT/SIGTERM: the stage stopped, nothing is
    lost, ``--resume`` continues it).

    While it runs it holds the experiment's lock (one run per experiment folder), treats SIGINT/SIGTERM as a
    pause (main thread), and when it starts Ray itself, a watchdog ends Ray's processes if this process dies.
    """
    import signal

    from .lifecycle import MARKER_VAR, ExperimentLock, LockedError, new_marker, reap, start_watchdog

    _quiet_ray_env(options.get("verbose", False))
    if options.get("stage") == "plan":  # a dry run: no lock, no Ray, nothing written
        return _run(space, **options)
    address = _cluster_address(options.get("address"))
    _, exp, state = prepare(space, address=address, **{k: v for k, v in options.items() if k in _PREPARE_KEYS})
    options["name"] = state["name"]  # a generated name, fixed once
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
            return _run(space, **options)
        except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM: stopped at once
            from .stages import active_progress

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


def _run(space: str | Path | SpaceSpec | None = None, *, name: str | None = None,
         storage_path: str | Path = DEFAULT_STORAGE, stage: str = "all", resume: bool = False, smoke: bool = False,
         address: str | None = None, num_samples: int | None = None, max_concurrent: int | None = None,
         cpus_per_trial: float | None = None, gpus_per_trial: float | None = None, seed: int | None = None,
         lr_bounds: tuple[float, float] | None = None, wd_prior: float | None = None, verbose: bool = False,
         quiet: bool = False, dashboard: bool = False, num_cpus: int | None = None,
         cluster_yaml: str | None = None, budget: float | None = None, refit: bool | None = None) -> SearchResults:
    """``run``'s stages, under the experiment lock (its validation is repeated here, under the lock)."""
    t0 = time.monotonic()
    address = _cluster_address(address)
    spec, exp, state = prepare(space, name=name, storage_path=storage_path, stage=stage, resume=resume,
                               smoke=smoke, address=address, num_samples=num_samples,
                               max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial,
                               gpus_per_trial=gpus_per_trial, seed=seed, lr_bounds=lr_bounds, wd_prior=wd_prior,
                               budget=budget, refit=refit)
    autoscale = _read_cluster_yaml(cluster_yaml)  # a bad --cluster-yaml fails before anything else is done
    # The plan (iterations and FTE of each stage; with a budget, stage 1 and the final fit cut to fit it)
    # is made and shown before Ray starts; a budget that cannot hold one search trial is refused here.
    spec, cplan = make_plan(spec, budget_from_cli=budget is not None)
    if not quiet or stage == "plan":
        for line in format_plan(cplan):
            print(f"[plan] {line}", file=sys.stderr if stage != "plan" else sys.stdout, flush=True)
    if stage == "plan":
        return SearchResults(root=exp, plan=cplan)
    from .report import search_figure, write_report
    from .space import Anchors
    from .stages import (
        ExperimentPaths,
        StageError,
        pick_best,
        run_final_stage,
        run_range_stage,
        run_search_stage,
        search_fte,
        search_plan,
        write_json,
        write_tb_config,
    )
    from .tasks import check_shippable, registrations
    from .train import tail_key

    regs = registrations(spec.base.task)  # the driver's own registrations travel with every trial
    try:
        check_shippable(spec.base.task, regs)
    except ConfigError as e:
        raise SpaceError(spec.path, e.path, e.rule) from None
    started = _start_ray(address, verbose=verbose, dashboard=dashboard, num_cpus=num_cpus,
                         runtime_env=_user_runtime_env(spec, regs, address))
    GUARD.install()  # again: ray.init replaces the SIGTERM handler (its own aborts with a stack dump)
    try:
        # Before any trial is queued and before the experiment folder exists: a refused request
        # leaves nothing behind, so the same command can be rerun with a fixed option.
        _preflight(spec, cluster_yaml=cluster_yaml, autoscale=autoscale)
        _check_task_on_workers(spec, regs)
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise
    paths = ExperimentPaths(exp)
    exp.mkdir(parents=True, exist_ok=True)
    if not (exp / "space.yaml").exists() and not isinstance(space, SpaceSpec):
        shutil.copyfile(Path(space) if space is not None else DEFAULT_SPACE, exp / "space.yaml")
    state.setdefault("done", [])
    state.update({"smoke": smoke, "space": str(space if space is not None and not isinstance(space, SpaceSpec)
                                                else spec.path)})
    state["budget"] = spec.search.budget  # --resume plans with the same budget
    write_json(paths.state, state)
    results = SearchResults(root=exp, plan=cplan)
    full_iters = cplan["fte"]["iterations"]  # iterations of one FTE (None: dataset size unknown)
    budget_fte = spec.search.budget
    want = STAGE_ORDER[stage]
    try:
        write_tb_config(spec, paths)
        bounds_file = paths.range_dir / "bounds.json"
        saved_bounds = _read_output(bounds_file, _read_dict)
        # Stage 1
        _check_interrupt("range", exp)
        if "range" in want and not ("range" in state["done"] and saved_bounds is not None):
            results.bounds = run_range_stage(spec, paths, resume=resume, quiet=quiet, lr_bounds=lr_bounds,
                                             wd_prior=wd_prior,
                                             fte=(0.0, budget_fte, 1.0 / full_iters if full_iters else None))
            _mark_done(state, "range")
            write_json(paths.state, state)
            results.stages_run.append("range")
        elif saved_bounds is not None:
            results.bounds = saved_bounds
        elif bounds_file.exists() and lr_bounds is None:
            raise StageError(f"{bounds_file} is unreadable: rebuild it with --stage range --resume (Tune restores "
                             "the finished range tests), or give --lr-bounds MIN_LR MAX_LR")
        if results.bounds is not None and not quiet:
            _print_bounds(results.bounds)
        anchors = None
        if lr_bounds is not None and (results.bounds is None or results.bounds.get("chosen") is None):
            anchors = Anchors(max_lr_bound=lr_bounds[1], min_lr_bound=lr_bounds[0],
                              wd_prior=wd_prior if wd_prior is not None else spec.base.reg.weight_decay)
        elif results.bounds is not None and results.bounds.get("chosen"):
            anchors = Anchors.from_dict(results.bounds["chosen"])
        range_fte = _range_cost_fte(results.bounds, paths, full_iters)
        results.compute = {"budget_fte": budget_fte, "range_fte": range_fte}
        # Stage 2
        _check_interrupt("search", exp)
        summary_file = exp / "summary.csv"
        saved_summary = _read_output(summary_file, _read_summary)
        if "search" in want and not ("search" in state["done"] and saved_summary is not None):
            if anchors is None:
                raise StageError("no LR bounds to search within; give --lr-bounds MIN_LR MAX_LR")
            search_budget = None
            if budget_fte is not None:
                # sized to what is left after stage 1 (its real cost) and the planned final fit
                search_budget = budget_fte - (range_fte or 0.0) - cplan["final"]["fte"]
                if search_budget < 1.0:
                    raise StageError(f"after stage 1 ({range_fte:.2f} FTE) and the final fit ({cplan['final']['fte']:.2f} "
                                     f"FTE), the budget of {budget_fte:g} FTE leaves {search_budget:.2f} FTE: not one "
                                     "full search trial; raise --budget")
            results.summary = run_search_stage(
                spec, paths, anchors, resume=resume, quiet=quiet, budget_fte=search_budget,
                fte=(range_fte or 0.0, budget_fte, 1.0 / spec.base.epochs))
            _mark_done(state, "search")
            write_json(paths.state, state)
            results.stages_run.append("search")
            search_figure(results.summary, tail_key(spec.search.metric), exp / "search.png")
        elif saved_summary is not None:
            results.summary = saved_summary
        # Stage 3
        _check_interrupt("final", exp)
        if "final" in want and results.summary is not None:
            best_row = pick_best(results.summary, spec)
            plan = search_plan(spec, anchors) if anchors is not None else {"dists": {}, "constants": {}}
            keys = set(plan["dists"]) | set(plan["constants"])
            params = {k: _py(best_row[k]) for k in keys if k in best_row}
            saved_best = _read_output(exp / "best.json", _read_dict) if "final" in state["done"] else None
            spent_search = search_fte(results.summary, spec)
            if saved_best is not None:
                final = saved_best.get("final")
            else:
                final = run_final_stage(
                    spec, paths, params, resume=resume, quiet=quiet, best_row=best_row,
                    refit_epochs=cplan["final"]["epochs"],
                    fte=((range_fte or 0.0) + spent_search, budget_fte,
                         cplan["final"]["fte"] / max(1, spec.final.seeds) / cplan["final"]["epochs"]))
                _mark_done(state, "final")
                results.stages_run.append("final")
            metric = best_row["_score_column"]
            final_fte = (sum(float(r.get("epochs") or 0) for r in (final or {}).get("runs", [])
                             if not r.get("search_trial")) * cplan["final"]["fte"] / max(1, spec.final.seeds)
                         / cplan["final"]["epochs"])
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
            write_json(exp / "best.json", results.best)
            write_json(paths.state, state)
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


def _check_interrupt(stage: str, exp: Path) -> None:
    """Between stages: an interrupt received since the last stage stops the run before this one starts."""
    if GUARD.requested:
        raise Interrupted(GUARD.signum, interrupted_message(stage, 0, None, exp, GUARD.signum))


STAGE_ORDER = {"range": ("range",), "search": ("search",), "final": ("final",), "all": ("range", "search", "final")}


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


def make_plan(spec: SpaceSpec, *, budget_from_cli: bool = False) -> tuple[SpaceSpec, dict[str, Any]]:
    """``budget.plan_compute`` on the task's real split sizes; a budget it cannot meet is a UsageError
    (exit 2) naming ``--budget`` or the space file's ``search.budget``."""
    from .budget import BudgetError, plan_compute

    key = "--budget" if budget_from_cli else f"{spec.path}: search.budget"
    try:
        return plan_compute(spec, _dataset_sizes(spec), budget=spec.search.budget, budget_key=key)
    except BudgetError as e:
        raise UsageError(key, e.rule) from None


def _range_cost_fte(bounds: dict[str, Any] | None, paths, full_iters: int | None) -> float | None:
    """Stage 1's cost in FTE: bounds.json's ``cost_fte`` when stage 1 reports it, else the range-test
    iterations in curves.csv (one row per step taken) / the iterations of one FTE."""
    if bounds is None:
        return None
    if isinstance(bounds.get("cost_fte"), (int, float)):
        return float(bounds["cost_fte"])
    curves = paths.range_dir / "curves.csv"
    if not full_iters or not curves.exists():
        return None
    with curves.open() as f:
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


def _mark_done(state: dict[str, Any], stage: str) -> None:
    if stage not in state["done"]:  # a stage redone on --resume is listed once
        state["done"].append(stage)


def _read_output(path: Path, read) -> Any:
    """A stage output read back; None if it is missing or unreadable (truncated, corrupted): the stage
    then runs again, and on --resume Tune restores its finished trials, so nothing is retrained."""
    if not path.exists():
        return None
    try:
        return read(path)
    except Exception as e:
        log.warning("%s is unreadable (%s: %s); it is rebuilt if its stage runs", path, type(e).__name__, e)
        return None


def _read_dict(path: Path) -> dict[str, Any]:
    from .stages import read_json

    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _read_summary(path: Path) -> Any:
    import csv
    import io

    import pandas as pd

    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    # pandas reads a truncated CSV without complaint (NaN-padded last row); the CSV's own shape does not lie
    if not text.endswith("\n") or len(rows) < 2 or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("truncated: its last row is incomplete")
    df = pd.read_csv(io.StringIO(text))
    need = ["trial_id", "status", "epochs_run"]
    if any(c not in df for c in need) or df[need].isna().any().any():
        raise ValueError(f"columns {need} are missing or incomplete")
    return df


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _print_bounds(bounds: dict[str, Any]) -> None:
    chosen = bounds.get("chosen")
    verdict = (bounds.get("verdict") or {}).get("message")
    if chosen:
        print(f"[range] LR bounds: min {chosen['min_lr_bound']:.4g}, max {chosen['max_lr_bound']:.4g}; "
              f"weight-decay prior {chosen['wd_prior']:g} ({bounds.get('source')})", file=sys.stderr)
    if (bounds.get("verdict") or {}).get("lower_bound"):
        print("[range] max_lr is a lower bound: accuracy was still high at the end of the ramp, so the search "
              "also tries LRs above it", file=sys.stderr)
    if verdict:
        print(f"[range] {verdict}", file=sys.stderr)
    if bounds.get("cost_fte") is not None:
        print(f"[range] cost: {bounds['cost_fte']:.2f} FTE (full-training equivalents, measured)", file=sys.stderr)


TASK_HELP = """\
your own data and model (the space file's task: section):
  task: {dataset: my_pkg.data:load_cells, model: my_pkg.nets:Net}
      module:attribute, imported from the folder you run in (or PYTHONPATH):
      load_cells(task) -> x_train, y_train, x_test, y_test, num_classes, augment
      Net(num_classes, input_shape, dropout) -> torch.nn.Module (a class or a function)
  task: {dataset: cells, model: cellnet, modules: [my_pkg.tasks]}
      names registered by my_pkg.tasks (register_dataset / register_model), which
      sctune imports in the driver and in every Ray worker
  built-in: datasets digits, mnist1d, cifar10, cifar100, synthetic, synthetic_cifar;
      models digits_cnn, mnist1d_cnn, mlp, resnet20/56/110, torchvision:<name>
  Everything is resolved before Ray starts (exit 2 naming task.dataset etc. if not).
  On a cluster: ray job submit --working-dir YOUR_PROJECT -- python -m sctune.search space.yaml
  (the folder with your module travels to every node; see docs/cluster.md)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sctune.search",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Super-convergence search: LR range tests, then a joint one-cycle + regularization search "
                    "(Optuna + ASHA) on Ray Tune, then a final fit. Results land in STORAGE/NAME/.",
        epilog=TASK_HELP)
    p.add_argument("space", nargs="?", default=None,
                   help=f"search-space YAML (default: {DEFAULT_SPACE.relative_to(DEFAULT_SPACE_DIR.parent)}); "
                        "its task: names the dataset and model (see below)")
    p.add_argument("--name", help="experiment folder name (default: <space>-<timestamp>)")
    p.add_argument("--storage-path", default=DEFAULT_STORAGE, help="where experiments live (default: %(default)s)")
    p.add_argument("--num-samples", type=int, help="search trials (overrides search.num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (also torch threads)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial; fractions pack trials (0.25 = 4 per GPU)")
    p.add_argument("--address", help="connect to an existing Ray cluster (default: start Ray locally)")
    p.add_argument("--stage", choices=("range", "search", "final", "all", "plan"), default="all",
                   help="run only this stage (default: all three); plan: print the iterations and FTE of each "
                        "stage and exit (a dry run: nothing starts)")
    p.add_argument("--budget", type=float, metavar="FTE",
                   help="bound the whole experiment's compute, in full trainings of the space's fixed budget "
                        "(overrides search.budget); stage 1, the search and the final fit share it")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="final fit on train + validation, as the paper's numbers (overrides final.refit)")
    p.add_argument("--resume", action="store_true", help="continue experiment --name where it stopped")
    p.add_argument("--seed", type=int, help="search seed (range-test seeds and sampler)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets from the file's smoke: section (tests, CI)")
    p.add_argument("--lr-bounds", nargs=2, type=float, metavar=("MIN_LR", "MAX_LR"),
                   help="use these LR bounds when the range tests give none")
    p.add_argument("--wd-prior", type=float, help="weight-decay prior to search below (default: from stage 1)")
    p.add_argument("--dashboard", action="store_true", help="start the local Ray dashboard (on 127.0.0.1)")
    p.add_argument("--cluster-yaml", help="launcher config to read autoscaling limits from for the preflight")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        res = run(args.space, name=args.name, storage_path=args.storage_path, stage=args.stage, resume=args.resume,
                  smoke=args.smoke, address=args.address, num_samples=args.num_samples,
                  max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                  gpus_per_trial=args.gpus_per_trial, seed=args.seed,
                  lr_bounds=tuple(args.lr_bounds) if args.lr_bounds else None, wd_prior=args.wd_prior,
                  verbose=args.verbose, quiet=args.quiet, dashboard=args.dashboard,
                  cluster_yaml=args.cluster_yaml, budget=args.budget, refit=args.refit)
    except ConfigError as e:
        print(f"sctune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        print(f"sctune: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before the run took hold of anything (while validating)
        print("sctune: interrupted before the run started; nothing was changed", file=sys.stderr)
        return 130
    except Exception as e:
        from .stages import StageError  # imported here: usage errors above report without loading torch

        if not isinstance(e, StageError):
            raise
        print(f"sctune: stopped: {e}", file=sys.stderr)
        return EXIT_STAGE
    if args.stage != "plan":
        _print_summary(res)
    return 0


def _print_summary(res: SearchResults) -> None:
    print()
    if res.best:
        b = res.best
        metric = b["metric"]
        last = f", the mean of its last {b['select_last']} evaluations" if b.get("select_last") else ""
        print(f"Best configuration (trial {b['trial_id']}, {metric} {b['value']:.4f}{last}):")
        for k, v in sorted(b["searched"].items()):
            print(f"  {k:<20} {v:.4g}" if isinstance(v, float) else f"  {k:<20} {v}")
        f = b.get("final") or {}
        if f.get("test_acc_mean") is not None and f.get("test_acc_std") is None:
            print(f"Best trial tested as it is (no final fit): test/acc {f['test_acc_mean']:.4f}")
        elif f.get("test_acc_mean") is not None:
            where = " on train + validation" if f.get("refit") else ""
            print(f"Final fit over {f['n']} seed(s){where}: test/acc {f['test_acc_mean']:.4f} ± {f['test_acc_std']:.4f}")
    elif res.bounds and res.bounds.get("chosen"):
        c = res.bounds["chosen"]
        print(f"LR bounds: min {c['min_lr_bound']:.4g}, max {c['max_lr_bound']:.4g}, wd prior {c['wd_prior']:g}")
    c = res.compute
    if c and c.get("spent_fte"):
        sp = c["spent_fte"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sp.items() if k != "total" and v is not None)
        print(f"Compute:     {sp['total']:.2f} FTE ({parts})" + (f" of a budget of {c['budget_fte']:g}"
                                                                 if c.get("budget_fte") is not None else ""))
    print(f"Results:     {res.root}")
    print(f"Report:      {res.root / 'report.md'}")
    print(f"TensorBoard: {res.tensorboard_command}")


if __name__ == "__main__":
    sys.exit(main())
