"""Cluster capacity checks run before a search is launched.

A Tune run whose single trial can never be placed does not fail: it sits in
PENDING forever while the autoscaler reports an "infeasible" request. ``preflight``
turns that into an immediate, explicit error naming the CLI option to change, and
warns when the requested concurrency cannot all run at once.

Ray is imported lazily (inside ``cluster_snapshot``) so that importing this module,
and the pure ``preflight`` / ``autoscale_limits`` helpers, stay cheap.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "PreflightError",
    "autoscale_limits",
    "autoscale_node_types",
    "cluster_snapshot",
    "preflight",
]

# Ray stores resource quantities as fixed-point integers with 1e-4 precision
# (ray._raylet.RESOURCE_UNIT_SCALING). Doing the packing arithmetic in those integer
# units makes it exact: 0.6 GPU / 0.2 per trial is 3 trials, not 2.9999.
_UNIT = 10_000


class PreflightError(ValueError):
    """The requested per-trial resources can never be satisfied by the cluster."""


# --------------------------------------------------------------------------- helpers


def _units(x: float) -> int:
    return int(round(float(x) * _UNIT))


def _fmt(x: float) -> str:
    return f"{float(x):g}"


def _plural(n: float, word: str) -> str:
    return f"{_fmt(n)} {word}" if float(n) == 1 else f"{_fmt(n)} {word}s"


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PreflightError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise PreflightError(f"{name} must be finite, got {value!r}")
    if value < 0:
        raise PreflightError(f"{name} must be >= 0, got {_fmt(value)}")
    return value


def _clean_resources(name: str, res: Mapping[str, Any] | None) -> dict[str, float]:
    if res is None:
        return {}
    if not isinstance(res, Mapping):
        raise PreflightError(f"{name} must be a mapping of resource name to quantity, got {res!r}")
    out: dict[str, float] = {}
    for key, val in res.items():
        out[str(key)] = _check_number(f"{name}[{key!r}]", val)
    return out


def _trials_on(res: Mapping[str, float], cpu_u: int, gpu_u: int) -> int:
    """How many identical trials fit in the resource bundle ``res`` (one node, or a total).

    CPUs pack by quantity. GPUs below 1 are shares *of one device* (Ray never splits a
    fractional request across GPUs), so each whole GPU holds ``floor(1 / share)`` trials;
    a 4-GPU node at 0.3 GPU/trial holds 4 * 3 = 12 trials, not floor(4 / 0.3) = 13.
    """
    node_cpu = _units(res.get("CPU", 0.0))
    n = node_cpu // cpu_u
    if gpu_u:
        node_gpu = _units(res.get("GPU", 0.0))
        if gpu_u < _UNIT:
            devices, rest = divmod(node_gpu, _UNIT)
            n_gpu = devices * (_UNIT // gpu_u) + rest // gpu_u
        else:
            n_gpu = node_gpu // gpu_u
        n = min(n, n_gpu)
    return int(n)


def _best(bundles: list[dict[str, float]], key: str) -> float:
    return max((b.get(key, 0.0) for b in bundles), default=0.0)


def _explain(
    cpu: float,
    gpu: float,
    now: list[dict[str, float]],
    now_single: bool,
    total: dict[str, float],
    later: list[dict[str, float]] | None,
    later_single: bool,
) -> str:
    """Say, per option, why one trial fits neither the cluster now nor (if known) at full scale."""

    def lacks(bundles: list[dict[str, float]], key: str, need: float) -> bool:
        # A GPU share below 1 needs that much of one device; >= 1 needs whole devices.
        return _units(_best(bundles, key)) < _units(need)

    def have_now(key: str, word: str) -> str:
        if _units(total.get(key, 0.0)) == 0:
            return f"the cluster has 0 {word}s"
        who = "the largest node has" if now_single else "the cluster has"
        return f"{who} {_plural(_best(now, key), word)}"

    parts = []
    for opt, key, word, need in (
        ("--gpus-per-trial", "GPU", "GPU", gpu),
        ("--cpus-per-trial", "CPU", "CPU", cpu),
    ):
        if need <= 0 or not lacks(now, key, need):
            continue
        if later is not None and not lacks(later, key, need):
            continue  # the autoscaler can provide this one; not the reason
        what = f"a {word}" if key == "GPU" and need <= 1 else _plural(need, word)
        if now_single and not (key == "GPU" and need <= 1):
            what += " on one node"
        msg = f"{opt} {_fmt(need)} needs {what} but {have_now(key, word)}"
        if later is not None:
            if _units(_best(later, key)) == 0:
                msg += " (and cannot autoscale to any)"
            elif lacks(later, key, need):
                where = "the largest node type it can add has" if later_single else "it can autoscale to only"
                msg += f" (and {where} {_plural(_best(later, key), word)})"
        if (
            key == "GPU"
            and _units(total.get("GPU", 0.0)) == 0
            and (later is None or _units(_best(later, key)) == 0)
        ):
            msg += "; use --gpus-per-trial 0 to train on CPU"
        parts.append(msg)
    if not parts:
        # Enough CPUs and GPUs exist, but never together on one node.
        parts.append(
            f"--cpus-per-trial {_fmt(cpu)} with --gpus-per-trial {_fmt(gpu)} fits no single node: "
            "no node has both that many CPUs and that much GPU"
        )
    return "; ".join(parts)


# ------------------------------------------------------------------------- preflight


def preflight(
    *,
    cpus_per_trial: float,
    gpus_per_trial: float,
    max_concurrent: int,
    available: dict[str, float],
    autoscale_max: dict[str, float] | None = None,
    per_node: list[dict[str, float]] | None = None,
    autoscale_node_types: list[dict[str, float]] | None = None,
) -> list[str]:
    """Check that one trial can be placed, and how many can run at once.

    Args:
        cpus_per_trial: CPUs one trial reserves (> 0; fractions allowed).
        gpus_per_trial: GPUs one trial reserves (>= 0). Below 1 it is a share of one
            device (0.25 -> 4 trials per GPU); above 1 it must be a whole number.
        max_concurrent: trials the search wants to run at the same time (>= 1).
        available: total resources of the cluster now, e.g. ``ray.cluster_resources()``.
        autoscale_max: total resources the cluster can reach when fully scaled up
            (see ``autoscale_limits``); ``None`` means fixed size / unknown.
        per_node: total resources of each alive node. When given, a trial must fit on a
            single node, which is what Ray actually requires.
        autoscale_node_types: resources of each node type the autoscaler can add (see
            ``autoscale_node_types``). Lets the single-node check include nodes that do not
            exist yet; without it a trial that fits only the autoscaled totals passes with
            a warning.

    Returns:
        Human-readable warnings (empty when everything fits as requested).

    Raises:
        PreflightError: invalid arguments, or a single trial can never be scheduled.
    """
    cpu = _check_number("--cpus-per-trial", cpus_per_trial)
    gpu = _check_number("--gpus-per-trial", gpus_per_trial)
    if cpu == 0:
        raise PreflightError("--cpus-per-trial must be > 0 (each trial runs in a process that needs a CPU)")
    for opt, q in (("--cpus-per-trial", cpu), ("--gpus-per-trial", gpu)):
        if q > 0 and _units(q) == 0:
            raise PreflightError(f"{opt} {q!r} is below Ray's resource precision of 0.0001")
    if gpu > 1 and _units(gpu) % _UNIT:
        raise PreflightError(
            f"--gpus-per-trial {_fmt(gpu)}: above 1 it must be a whole number of GPUs "
            "(fractions such as 0.5 share one device; Ray cannot split a trial across devices)"
        )
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, numbers.Integral):
        raise PreflightError(f"max_concurrent must be an integer, got {max_concurrent!r}")
    max_concurrent = int(max_concurrent)
    if max_concurrent < 1:
        raise PreflightError(f"max_concurrent must be >= 1, got {max_concurrent}")

    total = _clean_resources("available", available)
    scale = _clean_resources("autoscale_max", autoscale_max) if autoscale_max is not None else None
    nodes = [_clean_resources(f"per_node[{i}]", n) for i, n in enumerate(per_node)] if per_node else []
    types = (
        [_clean_resources(f"autoscale_node_types[{i}]", t) for i, t in enumerate(autoscale_node_types)]
        if autoscale_node_types
        else []
    )
    cpu_u, gpu_u = _units(cpu), _units(gpu)
    warnings: list[str] = []

    # Capacity at full scale: the current cluster may already be bigger than the YAML
    # says (manually added nodes), so take the larger of the two per resource.
    full = dict(total)
    if scale is not None:
        for k, v in scale.items():
            full[k] = max(full.get(k, 0.0), v)

    # ---- can one trial ever be placed?
    if nodes:
        fits_now = any(_trials_on(n, cpu_u, gpu_u) >= 1 for n in nodes)
    else:
        fits_now = _trials_on(total, cpu_u, gpu_u) >= 1

    if not fits_now:
        now_bundles = nodes or [total]
        if scale is None:
            raise PreflightError(_explain(cpu, gpu, now_bundles, bool(nodes), total, None, False))
        if types:
            later_bundles, later_single = types, True
        else:
            later_bundles, later_single = [full], False
        if not any(_trials_on(b, cpu_u, gpu_u) >= 1 for b in later_bundles):
            raise PreflightError(
                _explain(cpu, gpu, now_bundles, bool(nodes), total, later_bundles, later_single)
            )
        if nodes and not types:
            warnings.append(
                f"no current node can hold one trial ({_plural(cpu, 'CPU')}, {_plural(gpu, 'GPU')}); "
                "relying on the autoscaler to add one (node shapes unknown, so a single-node fit "
                "could not be verified)"
            )
        else:
            warnings.append(
                f"no current node can hold one trial ({_plural(cpu, 'CPU')}, {_plural(gpu, 'GPU')}); "
                "the first trials wait for the autoscaler to start a node (minutes)"
            )

    # ---- how many run at once? (At full scale this counts against the totals, so it is
    # an upper bound: it ignores how CPUs and GPUs are split across the new nodes.)
    fit_now = sum(_trials_on(n, cpu_u, gpu_u) for n in nodes) if nodes else _trials_on(total, cpu_u, gpu_u)
    fit_full = _trials_on(full, cpu_u, gpu_u) if scale is not None else fit_now
    fit_full = max(fit_full, fit_now)

    if max_concurrent > fit_full:
        scope = "even at full autoscale " if scale is not None and fit_full > fit_now else ""
        warnings.append(
            f"max_concurrent {max_concurrent} but only {fit_full} trial{'s' if fit_full != 1 else ''} "
            f"fit at once {scope}({_plural(cpu, 'CPU')}, {_plural(gpu, 'GPU')} each): "
            f"{max_concurrent - fit_full} will queue"
        )
    elif max_concurrent > fit_now:
        warnings.append(
            f"max_concurrent {max_concurrent} but only {fit_now} trial{'s' if fit_now != 1 else ''} "
            f"fit on the current nodes: the autoscaler must add nodes for the other "
            f"{max_concurrent - fit_now} (up to {fit_full} fit at full scale)"
        )

    if gpu == 0 and _units(full.get("GPU", 0.0)) > 0:
        warnings.append(
            f"the cluster has {_plural(full['GPU'], 'GPU')} but --gpus-per-trial is 0: trials will train on CPU"
        )
    return warnings


# ------------------------------------------------------------------ live cluster


def cluster_snapshot() -> tuple[dict[str, float], list[dict[str, float]]]:
    """Return ``(cluster_resources, [resources of each alive node])`` of the connected Ray.

    Quantities are totals (not what is free right now): they answer "can a trial ever
    fit", which is what ``preflight`` checks. Call after ``ray.init(...)``.
    """
    import ray  # lazy: keep `import sctune.service.cluster` free of Ray start-up cost

    if not ray.is_initialized():
        raise RuntimeError("cluster_snapshot() needs a connected Ray: call ray.init(...) first")
    total = {str(k): float(v) for k, v in ray.cluster_resources().items()}
    nodes = [
        {str(k): float(v) for k, v in (node.get("Resources") or {}).items()}
        for node in ray.nodes()
        if node.get("Alive")
    ]
    return total, nodes


# -------------------------------------------------------------- launcher YAML


def _load_node_types(cluster_yaml_path: str | os.PathLike[str]) -> tuple[dict, dict[str, dict]] | None:
    import yaml

    with open(os.path.expanduser(os.fspath(cluster_yaml_path))) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(
            f"{cluster_yaml_path}: not a Ray cluster-launcher config (top level is not a mapping)"
        )
    node_types = config.get("available_node_types")
    if not isinstance(node_types, dict) or not node_types:
        return None  # legacy head_node/worker_nodes layout: resources unknown
    parsed: dict[str, dict] = {}
    for name, spec in node_types.items():
        resources = (spec or {}).get("resources")
        if not resources:
            # `resources: {}` or missing: the launcher autodetects them from the instance
            # type at `ray up` time (AWS API call); we cannot know them offline.
            return None
        if not isinstance(resources, dict):
            raise ValueError(f"{cluster_yaml_path}: available_node_types.{name}.resources must be a mapping")
        parsed[name] = {
            "resources": {str(k): _check_number(f"{name}.resources.{k}", v) for k, v in resources.items()},
            "min_workers": int(spec.get("min_workers", 0) or 0),
            "max_workers": spec.get("max_workers"),
        }
    return config, parsed


def autoscale_limits(cluster_yaml_path: str | os.PathLike[str]) -> dict[str, float] | None:
    """Total resources a launcher-managed cluster can reach when fully scaled up.

    Reads ``available_node_types`` from a ``ray up`` YAML: the head node (1 instance)
    plus up to ``max_workers`` of each worker type, with the global ``max_workers`` cap
    applied per resource (greedily filling the cap with the node types richest in that
    resource, which is exact for a per-resource maximum).

    Returns ``None`` when the YAML does not declare ``resources`` for every node type
    (the launcher would autodetect them from the cloud at ``ray up`` time).

    On a launcher-managed head node the resolved config is at
    ``~/ray_bootstrap_config.yaml``, so a job driver can call this without the
    original file.
    """
    loaded = _load_node_types(cluster_yaml_path)
    if loaded is None:
        return None
    config, types = loaded
    head = config.get("head_node_type")
    if head not in types:
        raise ValueError(f"{cluster_yaml_path}: head_node_type {head!r} is not one of available_node_types")
    global_max = config.get("max_workers")
    cap = math.inf if global_max is None else int(global_max)

    def type_max(name: str) -> float:
        m = types[name]["max_workers"]
        if m is not None:
            return int(m)
        # Ray's fill_node_type_min_max_workers: head defaults to 0 extra, workers to the global cap.
        return 0 if name == head else cap

    names: set[str] = set()
    for t in types.values():
        names.update(t["resources"])
    limits: dict[str, float] = {}
    for res in sorted(names):
        amount = types[head]["resources"].get(res, 0.0)  # the head node itself
        left = cap
        for name in sorted(types, key=lambda n: types[n]["resources"].get(res, 0.0), reverse=True):
            per = types[name]["resources"].get(res, 0.0)
            take = min(type_max(name), left)
            if per == 0 or take <= 0:
                continue
            if math.isinf(take):
                return None  # no max_workers anywhere: unbounded, so no useful limit
            amount += take * per
            left -= take
        limits[res] = float(amount)
    return limits


def autoscale_node_types(cluster_yaml_path: str | os.PathLike[str]) -> list[dict[str, float]] | None:
    """Resources of each node type in a launcher YAML that can exist (head, and worker
    types with ``max_workers`` > 0); for ``preflight(autoscale_node_types=...)``.

    ``None`` when the YAML does not declare ``resources`` for every node type.
    """
    loaded = _load_node_types(cluster_yaml_path)
    if loaded is None:
        return None
    config, types = loaded
    head = config.get("head_node_type")
    global_max = config.get("max_workers")
    shapes = []
    for name, t in types.items():
        limit = t["max_workers"] if t["max_workers"] is not None else global_max
        if name == head or limit is None or int(limit) > 0:
            shapes.append(dict(t["resources"]))
    return shapes
