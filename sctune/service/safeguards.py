"""What ``experiment.prepare`` refuses beyond the options' own rules: a resumed experiment run with other
options or another space file than it started with, and a storage path on a filesystem that cannot hold an
experiment. Errors are ``ConfigError``s naming the flag or file (exit 2), raised before Ray starts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import ConfigError

if TYPE_CHECKING:
    from .space import SpaceSpec

log = logging.getLogger("sctune")

# -- the options an experiment keeps ------------------------------------------------------------------
#
# What shapes an experiment's results is recorded in state.json when it starts and restored by --resume:
# a resumed run is the experiment that was started, never a different one. ``smoke`` picks the space
# file's budgets (epochs, trials, seeds); ``seed`` the range tests' seeds, the sampler and the final fit's
# seeds; ``num_samples`` and ``budget`` how many trials run; ``refit`` what the final fit trains on;
# ``lr_bounds``/``wd_prior`` the anchors of stage 2's ranges; ``space_sha256`` the space file's text.
# Not kept: where and how it runs (--storage-path, --address, --max-concurrent, --cpus/gpus-per-trial,
# --num-cpus, --stage, --quiet, ...): a resumed experiment may move to another machine.
KEPT_OPTIONS = ("smoke", "seed", "num_samples", "budget", "refit", "lr_bounds", "wd_prior")
_FLAGS = {"smoke": "--smoke", "seed": "--seed", "num_samples": "--num-samples", "budget": "--budget",
          "refit": "--refit/--no-refit", "lr_bounds": "--lr-bounds", "wd_prior": "--wd-prior"}


def kept_options(o: Any, spec: Any) -> dict[str, Any]:
    """What state.json records of a run's options: the values the experiment runs with."""
    return {"smoke": bool(o.smoke), "seed": spec.search.seed, "num_samples": spec.search.num_samples,
            "budget": spec.search.budget, "refit": spec.final.refit,
            "lr_bounds": list(o.lr_bounds) if o.lr_bounds is not None else None, "wd_prior": o.wd_prior}


def space_sha256(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def restore_options(o: Any, state: dict[str, Any], exp: Path) -> Any:
    """``o`` with the options ``state`` recorded (``KEPT_OPTIONS``) filled in; one given with another value
    is a ConfigError naming its flag (exit 2). ``--lr-bounds`` and ``--wd-prior`` may be added to an experiment that
    had none (the way on after stage 1 found no usable bounds)."""
    kept = state.get("options")
    if not isinstance(kept, dict):
        # older experiments recorded smoke and budget only
        kept = {k: state[k] for k in ("smoke", "budget") if k in state}
    changes: dict[str, Any] = {}
    for key in KEPT_OPTIONS:
        if key not in kept:
            continue
        saved, given = kept[key], getattr(o, key)
        if key == "smoke":
            given = given or None  # store_true: absent and False are the same
        if given is None:
            if saved is not None:
                changes[key] = tuple(saved) if key == "lr_bounds" else saved
            continue
        if saved is None and key in ("lr_bounds", "wd_prior"):
            continue  # added now: recorded when this run starts
        if not _same(saved, list(given) if key == "lr_bounds" else given):
            raise ConfigError(_FLAGS[key], f"experiment {exp.name!r} was started with {_shown(key, saved)} and "
                             f"--resume keeps it (got {_shown(key, given)}); resume without {_FLAGS[key]}, or "
                             "start a new experiment with a new --name")
    return o.replace(**changes) if changes else o


def _shown(key: str, value: Any) -> str:
    if key == "smoke":
        return "--smoke" if value else "no --smoke"
    if key == "refit":
        return "--refit" if value else "--no-refit"
    if value is None:
        return f"no {_FLAGS[key]}"
    return f"{_FLAGS[key]} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def check_same_space(space: str | Path | None, saved: Path, state_file: Path, name: str) -> None:
    """On --resume: the space file given (if any) and the experiment's copy must be the text it started with."""
    try:
        recorded = json.loads(state_file.read_text()).get("space_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    recorded = recorded or space_sha256(saved)
    if recorded is None:
        return
    if space_sha256(saved) != recorded:
        raise ConfigError(str(saved), "changed since the experiment started (its SHA-256 differs from the one in "
                         f"{state_file}); restore it, or start a new experiment with a new --name")
    if space is not None and Path(space).is_file() and space_sha256(Path(space)) != recorded:
        raise ConfigError(str(space), f"differs from the space file experiment {name!r} started with "
                         f"({saved}); --resume runs that one: resume without the space file, or start a new "
                         "experiment with a new --name")


# the kernel's own filesystems: never storage, though root may create files in some of them
SPECIAL_FILESYSTEMS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs",
                                  "securityfs", "tracefs", "pstore", "bpf", "configfs", "fusectl", "mqueue",
                                  "hugetlbfs", "efivarfs", "binfmt_misc", "autofs"})


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem ``path`` is on (/proc/self/mounts: the longest mount point above it)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fs = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fs = mount, parts[2]
    return fs


def check_storage(storage_path: str | Path) -> Path:
    p = Path(storage_path).expanduser()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError("--storage-path", f"{p}: {probe} exists and is not a directory")
    fs = filesystem_type(probe.resolve())
    if fs in SPECIAL_FILESYSTEMS:
        raise ConfigError("--storage-path", f"{p}: {probe} is on a {fs} filesystem (the kernel's, not storage); "
                         "give a folder on a disk or a network share")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("--storage-path", f"{p}: {probe} is not writable")
    try:  # root passes os.access everywhere; a read-only mount or a full quota shows only when writing
        import tempfile

        os.rmdir(tempfile.mkdtemp(prefix=".sctune-probe-", dir=probe))
    except OSError as e:
        raise ConfigError("--storage-path", f"{p}: cannot create a folder in {probe} ({e.strerror or e})") from None
    return p.resolve()


def load_in_driver(spec: SpaceSpec, *, local: bool) -> dict[str, Any]:
    """The task's dataset and model, made once in the driver: ``{"sizes": split sizes, "param_bytes": the
    model's}``. On a local Ray the workers are this machine, so a dataset or model that fails here fails in
    every trial: a SpaceError (exit 2) with the user's exception, before Ray starts. With ``--address`` the
    data may live on the workers only: a warning, and {} (the plan then shows epochs only)."""
    from ..core.config import error_line
    from ..core.data import known_split_sizes, load_dataset
    from ..core.models import build_model
    from .space import SpaceError

    task = spec.base.task
    try:
        data = load_dataset(task)
    except Exception as e:
        if local:
            raise SpaceError(spec.path, "task.dataset", f"{task.dataset} fails to load: {error_line(e)}") from None
        sizes = known_split_sizes(task)
        if sizes is None:
            log.warning("could not load %s here to count iterations (%s); the plan shows epochs only",
                        task.dataset, e)
        return {"sizes": sizes}
    try:
        model = build_model(task.model, num_classes=data.num_classes, input_shape=data.input_shape,
                            dropout=spec.base.reg.dropout)
        param_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    except Exception as e:
        if local:
            raise SpaceError(spec.path, "task.model", f"{task.model} cannot be built for {task.dataset} "
                                                      f"({data.input_shape}, {data.num_classes} classes): "
                                                      f"{error_line(e)}") from None
        log.warning("could not build %s here (%s)", task.model, e)
        param_bytes = None
    return {"sizes": data.sizes(), "param_bytes": param_bytes}
