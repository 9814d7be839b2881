"""Ray for one run: start it (local, loopback only) or join a cluster, ship the user's code to its workers,
check the task there, and refuse per-trial resources no node can hold (the preflight), before any trial
(``start_checked``); around it all, the run's hold on its experiment (``experiment_session``: the lock,
SIGINT/SIGTERM as a pause, the watchdog that ends the Ray it started if the driver dies)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.config import ConfigError
from .experiment import Options, UsageError
from .space import SpaceError, SpaceSpec

log = logging.getLogger("sctune")

TASK_PROBE_TIMEOUT_S = 120.0
RESERVE_MIN = 2 * 1024 * 1024  # an error reading Ray's files back with less than this free: the disk was full


@contextlib.contextmanager
def experiment_session(exp: Path, address: str | None) -> Iterator[None]:
    """The run's hold on experiment ``exp``: its lock (one run per experiment folder), SIGINT/SIGTERM as a pause
    (main thread), and when this process starts Ray itself (no ``address``, none running), a watchdog that
    ends Ray's processes if this process dies. Inside it, a full disk becomes ``DiskFull`` and a second
    Ctrl-C/SIGTERM ``Interrupted``."""
    import errno
    import signal
    import sys

    from .lifecycle import (
        GUARD,
        MARKER_VAR,
        DiskFull,
        ExperimentLock,
        Interrupted,
        LockedError,
        interrupted_message,
        new_marker,
        reap,
        start_watchdog,
    )
    from .storage import as_disk_full, disk_full_message

    try:
        lock = ExperimentLock(exp).acquire()
    except LockedError as e:
        raise UsageError("--name", str(e)) from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFull(exp, None, disk_full_message(exp, None, None, exp)) from None
        raise UsageError("--storage-path", f"cannot create the experiment folder {exp}: {e.strerror or e}") from None
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
            yield
        except Interrupted:
            raise
        except (OSError, EOFError) as e:  # on a full disk, Ray's own files read back truncated (EOFError)
            full = GUARD.pending if isinstance(GUARD.pending, DiskFull) else as_disk_full(e, exp, RESERVE_MIN)
            if full is None:
                raise
            raise full from None
        except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM: stopped at once
            from ..present.progress import active_progress

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


def start_checked(spec: SpaceSpec, o: Options, regs: dict[str, Any], address: str | None,
                  autoscale: tuple[dict[str, float] | None, list[dict[str, float]] | None]) -> bool:
    """Start or join Ray (``start_ray``) with the user's code shipped, then check the request against it:
    before any trial is queued and before the experiment folder exists, so a refused request leaves nothing
    behind and the same command can be rerun with a fixed option. Returns True if it started Ray (then the
    caller ends it with ``stop_ray``; a refusal here ends it already)."""
    from .lifecycle import GUARD

    started = start_ray(address, verbose=o.verbose, dashboard=o.dashboard, num_cpus=o.num_cpus,
                        runtime_env=user_runtime_env(spec, regs, address))
    GUARD.install()  # again: ray.init replaces the SIGTERM handler (its own aborts with a stack dump)
    try:
        preflight_check(spec, cluster_yaml=o.cluster_yaml, autoscale=autoscale)
        check_task_on_workers(spec, regs)
    except BaseException:
        stop_ray(started)
        raise
    return started


def stop_ray(started: bool) -> None:
    """``ray.shutdown()`` if this run started (or joined) Ray; else nothing."""
    if started:
        import ray

        ray.shutdown()


def quiet_ray_env(verbose: bool) -> None:
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
        # a trial stopped with a failed result nobody fetches (a stage stopped for a full disk) is not news
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")


def start_ray(address: str | None, *, verbose: bool, dashboard: bool, num_cpus: int | None = None,
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


def job_runtime_env() -> dict[str, Any]:
    """The runtime environment of the Ray job this driver runs in (``ray job submit``), else {}."""
    import json

    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def user_runtime_env(spec: SpaceSpec, regs: dict[str, Any], address: str | None) -> dict[str, Any] | None:
    """``{"py_modules": [...]}`` for the user's code the workers could not import by themselves."""
    from ..core.tasks import py_modules_to_ship

    job_env = job_runtime_env()
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


def check_task_on_workers(spec: SpaceSpec, regs: dict[str, Any]) -> None:
    """One Ray task resolves the dataset and model the way a trial will, before any trial is queued: a task
    the workers cannot import (a module only the driver can see) is refused with exit 2, not 12 failed trials."""
    import ray
    from ray.exceptions import GetTimeoutError

    from ..core.tasks import check_in_worker, is_reference

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
        from ..core.config import error_line

        cause = getattr(e, "cause", None) or e
        path = cause.path if isinstance(cause, ConfigError) else "task"
        why = cause.rule if isinstance(cause, ConfigError) else f"cannot be loaded: {error_line(cause)}"
        raise SpaceError(spec.path, path, f"{why} (in a Ray worker; the driver resolved it: make the module importable "
                                          "on every node, e.g. ray job submit --working-dir with the module in it)") from None


def read_cluster_yaml(cluster_yaml: str | None) -> tuple[dict[str, float] | None, list[dict[str, float]] | None]:
    """(autoscale_limits, autoscale_node_types) of a launcher YAML, or UsageError naming --cluster-yaml."""
    if not cluster_yaml:
        return None, None
    import yaml

    from .cluster import autoscale_limits, autoscale_node_types

    try:
        return autoscale_limits(cluster_yaml), autoscale_node_types(cluster_yaml)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UsageError("--cluster-yaml", f"{cluster_yaml}: {e}") from None


def preflight_check(spec: SpaceSpec, *, cluster_yaml: str | None = None,
               autoscale: tuple[dict[str, float] | None, list[dict[str, float]] | None] | None = None) -> None:
    """Refuse (UsageError, exit code 2) per-trial resources that no node of the connected cluster, nor any
    node the launcher config (``--cluster-yaml``) can add, will ever hold; warn about queueing.

    Runs right after Ray connects and before any trial or experiment file is created: an impossible
    request would otherwise sit PENDING forever."""
    from .cluster import PreflightError, cluster_snapshot, preflight

    limits, node_types = autoscale if autoscale is not None else read_cluster_yaml(cluster_yaml)
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
