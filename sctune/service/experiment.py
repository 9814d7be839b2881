"""An experiment on disk: its folder, its files, its state, and the request that runs it.

Layout of ``<storage-path>/<name>/`` (each name is spelled once, in ``ExperimentPaths``)::

    state.json                  stages done, options, spec (for --resume)
    space.yaml                  the search-space file as run
    range_test/bounds.json      per-WD bounds + spread + status, verdict, chosen prior
    range_test/curves.csv       every range-test curve (wd, seed, step, lr, loss, smooth_loss, acc, val_loss)
    range_test/range_test.png   accuracy and loss vs LR per WD, bounds marked
    search_plan.json            stage 2's plan: ranges, constants, anchors, recipe point, rungs (from stage 1)
    summary.csv                 one row per search trial
    search.png                  the search trials' scores vs each searched parameter
    best.json                   best configuration + final-fit results
    report.md                   readable summary with the plots
    tensorboard/                one logdir, a run per trial
    ray/<stage>/                Ray Tune's own experiment state (checkpoints, searcher state)

Here too: ``Options`` (every option of a run, as the CLI, the Python API and the tests give them),
``prepare`` (all validation of a request, before Ray starts: bad input is a ``UsageError``, exit 2),
the state (``state.json``, rebuilt from the stage outputs when it is corrupted), the readers of stage
outputs. Stage 2's plan (search_plan.json) is ``sctune.service.plan``'s.

No torch and no Ray at import: the CLI refuses bad input in milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.config import ConfigError
from .lifecycle import LOCK_NAME
from .safeguards import check_same_space, check_storage, restore_options
from .space import DEFAULT_SPACE_DIR, SearchConfig, SpaceError, SpaceSpec, load_space

log = logging.getLogger("sctune")

DEFAULT_SPACE = DEFAULT_SPACE_DIR / "digits.yaml"
DEFAULT_STORAGE = "./sctune_results"
STAGE_CHOICES = ("range", "search", "final", "all", "plan")


class UsageError(ConfigError):
    """Bad option or state detected before any cluster work."""

    def __init__(self, where: str, message: str):
        super().__init__(where, message)


class StageError(RuntimeError):
    """A stage cannot go on (e.g. no usable LR bounds); the message says what to do."""


# -- the options of a run ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """Every option of a run; the CLI's flags are these names with dashes (``--num-samples``).

    ``None`` means "as the space file says" for the overrides of its ``search:``/``final:`` sections
    (num_samples ... budget, refit)."""

    name: str | None = None  # experiment folder; None: <space>-<timestamp>
    storage_path: str | Path = DEFAULT_STORAGE
    stage: str = "all"  # range | search | final | all | plan (a dry run)
    resume: bool = False
    smoke: bool = False
    address: str | None = None  # a Ray cluster to connect to; None: RAY_ADDRESS, else a local Ray
    num_samples: int | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    seed: int | None = None
    lr_bounds: tuple[float, float] | None = None  # (min, max): used when the range tests give none
    wd_prior: float | None = None
    verbose: bool = False
    quiet: bool = False
    dashboard: bool = False
    num_cpus: int | None = None  # of a local Ray
    cluster_yaml: str | None = None
    budget: float | None = None  # FTE
    refit: bool | None = None
    # Python API: an experiment of this name that exists is resumed (finished stages are read back, not
    # rerun), one that does not is started, so a driver script can simply be run again
    exist_ok: bool = False

    def replace(self, **changes: Any) -> Options:
        return dataclasses.replace(self, **changes)


def as_options(options: Options | None = None, **changes: Any) -> Options:
    """``options`` with ``changes`` (keyword options of the Python API); a TypeError names an unknown one."""
    return dataclasses.replace(options or Options(), **changes)


# -- files --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExperimentPaths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def space(self) -> Path:
        return self.root / "space.yaml"

    @property
    def range_dir(self) -> Path:
        return self.root / "range_test"

    @property
    def bounds(self) -> Path:
        return self.range_dir / "bounds.json"

    @property
    def curves(self) -> Path:
        return self.range_dir / "curves.csv"

    @property
    def range_png(self) -> Path:
        return self.range_dir / "range_test.png"

    @property
    def search_plan(self) -> Path:
        return self.root / "search_plan.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.csv"

    @property
    def search_png(self) -> Path:
        return self.root / "search.png"

    @property
    def best(self) -> Path:
        return self.root / "best.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    def ray_stage(self, stage: str) -> Path:
        return self.ray / stage

    def tensorboard_command(self) -> str:
        return f"tensorboard --logdir {self.tensorboard.resolve()} --host 127.0.0.1 --port 6006"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    """Atomic write: a crash mid-write leaves the previous file, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def clean(obj: Any) -> Any:
    """NaN/inf -> None recursively, numpy scalars -> Python: strict JSON."""
    from ..core.bounds_common import jsonable

    return jsonable(obj)


# -- stage outputs read back ------------------------------------------------------------------------

def read_output(path: Path, read) -> Any:
    """A stage output read back; None if it is missing or unreadable (truncated, corrupted): the stage
    then runs again, and on --resume Tune restores its finished trials, so nothing is retrained."""
    if not path.exists():
        return None
    try:
        return read(path)
    except Exception as e:
        log.warning("%s is unreadable (%s: %s); it is rebuilt if its stage runs", path, type(e).__name__, e)
        return None


def read_dict(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def read_summary(path: Path) -> Any:
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


# -- state -----------------------------------------------------------------------------------------

def rebuild_state(paths: ExperimentPaths) -> dict[str, Any]:
    """The stages done, from the outputs present: a stage whose output is missing or unreadable runs
    again, and Tune restores its finished trials (nothing is retrained)."""
    outputs = (("range", paths.bounds), ("search", paths.summary), ("final", paths.best))
    return {"done": [stage for stage, out in outputs if out.exists()]}


def mark_done(state: dict[str, Any], stage: str) -> None:
    if stage not in state["done"]:  # a stage redone on --resume is listed once
        state["done"].append(stage)


_WARNED: set[str] = set()  # corruption warnings already printed (prepare runs twice: before and under the lock)


def _load_state(paths: ExperimentPaths, name: str, root_storage: Path, resume: bool) -> dict[str, Any]:
    """state.json of an existing experiment; corrupted: a UsageError, or on --resume rebuilt from the outputs."""
    try:
        state = read_json(paths.state)
        if not isinstance(state, dict) or not isinstance(state.get("done", []), list):
            raise ValueError("not an sctune experiment state")
        return state
    except (OSError, ValueError) as e:
        if not resume:
            raise UsageError("--name", f"experiment {name!r} already exists in {root_storage}, and its "
                             f"{paths.state} is corrupted ({e}). Resume it with --resume --name {name} (the "
                             "state is rebuilt from the stage outputs), or pick a new --name.") from None
        if str(paths.state) not in _WARNED:
            _WARNED.add(str(paths.state))
            log.warning("%s is corrupted (%s): rebuilding the experiment state from the stage outputs",
                        paths.state, e)
        return rebuild_state(paths)


def resumed_options(o: Options) -> Options:
    """On ``--resume --name``: ``o`` with what the experiment's state.json kept (``restore_options``);
    unchanged when there is nothing to resume (``prepare`` then says why)."""
    if not o.resume or not o.name or "/" in o.name or o.name.startswith("."):
        return o
    exp = Path(o.storage_path).expanduser() / o.name
    paths = ExperimentPaths(exp)
    if not paths.state.is_file():
        return o
    try:
        state = _load_state(paths, o.name, exp.parent, resume=True)
    except UsageError:
        return o
    return restore_options(o, state, exp)


# -- validation of a request --------------------------------------------------------------------------

def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _check_not_in_use(exp: Path) -> None:
    from .lifecycle import holder

    in_use = holder(exp) if exp.is_dir() else None
    if in_use:
        raise UsageError("--name", f"experiment {exp.name!r} in {exp.parent} is in use by {in_use}: one run per "
                         "experiment. Wait for it to end, or stop it (Ctrl-C) and rerun with --resume.")


def cluster_address(address: str | None) -> str | None:
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


def _check_options(o: Options) -> None:
    """The options' own rules: refused in milliseconds, before the space file pulls in torch."""
    if o.stage not in STAGE_CHOICES:
        raise UsageError("--stage", f"must be range, search, final, all or plan, got {o.stage!r}")
    overrides = {"num_samples": o.num_samples, "max_concurrent": o.max_concurrent,
                 "cpus_per_trial": o.cpus_per_trial, "gpus_per_trial": o.gpus_per_trial, "seed": o.seed,
                 "budget": o.budget}
    try:
        SearchConfig.from_dict({k: v for k, v in overrides.items() if v is not None}, "search")
    except ConfigError as e:
        raise UsageError(_flag(e.path), e.rule) from None
    if o.lr_bounds is not None:
        lo, hi = o.lr_bounds
        if not (0 < lo < hi):
            raise UsageError("--lr-bounds", f"need 0 < MIN_LR < MAX_LR, got {lo} {hi}")
    if o.wd_prior is not None and o.wd_prior < 0:
        raise UsageError("--wd-prior", f"must be >= 0, got {o.wd_prior}")


def _flag(key_path: str) -> str:
    """``search.num_samples`` -> ``--num-samples``: the option that set it."""
    return f"--{key_path.rsplit('.', 1)[-1].replace('_', '-')}"


def prepare(space: str | Path | SpaceSpec | None = None, options: Options | None = None,
            **changes: Any) -> tuple[SpaceSpec, Path, dict[str, Any]]:
    """All validation, no side effects beyond reading files. Returns (spec, experiment dir, state).

    ``options``, or the same as keywords (``prepare(space, smoke=True, name=...)``)."""
    o = as_options(options, **changes)
    _check_options(o)
    root_storage = check_storage(o.storage_path)
    o = resumed_options(o)  # a resumed experiment runs with the options it started with
    address = cluster_address(o.address)  # RAY_ADDRESS counts: inside `ray job submit` the local checks don't apply
    name, resume = o.name, o.resume
    state: dict[str, Any] = {}
    if name is not None and (not name or "/" in name or name.startswith(".")):
        raise UsageError("--name", f"must be a plain folder name, got {name!r}")
    if resume and name is None:
        raise UsageError("--resume", "needs --name of the experiment to resume "
                         f"(see the folders in {root_storage})")
    if name is not None:
        _check_not_in_use(root_storage / name)  # before the space file is read: refused in milliseconds
        if o.exist_ok and not resume and ExperimentPaths(root_storage / name).state.exists():
            resume = True
    if isinstance(space, SpaceSpec):
        spec = space
    else:
        space_path = Path(space) if space is not None else DEFAULT_SPACE
        if resume:
            # a resumed experiment runs with the space it started with
            saved = ExperimentPaths(root_storage / name).space
            if saved.exists():
                check_same_space(space, saved, ExperimentPaths(root_storage / name).state, name)
                space_path = saved
        spec = load_space(space_path, smoke=o.smoke)
    if name is None:
        name = f"{spec.name}{'-smoke' if o.smoke else ''}-{datetime.now():%Y%m%d-%H%M%S}"
    exp = root_storage / name
    paths = ExperimentPaths(exp)
    _check_not_in_use(exp)
    if exp.exists() and any(p.name != LOCK_NAME for p in exp.iterdir()):
        if not paths.state.exists():
            if resume:
                raise UsageError("--resume", f"{exp} holds no sctune experiment state (state.json missing); "
                                 "it cannot be resumed. Use a new --name.")
            raise UsageError("--name", f"{exp} exists and is not an sctune experiment; choose another --name")
        state = _load_state(paths, name, root_storage, resume)
        if not resume and o.stage == "all":
            raise UsageError("--name", f"experiment {name!r} already exists in {root_storage}. "
                             f"Resume it (--resume --name {name}; in Python resume=True, or exist_ok=True to "
                             "resume it when it exists), or pick a new name.")
    elif resume:
        raise UsageError("--resume", f"no experiment {name!r} in {root_storage} to resume")
    budget = o.budget
    if budget is None and resume:
        budget = state.get("budget")  # a resumed experiment keeps the budget it was planned with
    spec = _with_options(spec, o, budget=budget)
    if o.stage == "plan":  # a dry run: nothing below (Ray, GPUs, stage outputs) matters
        return spec, exp, state | {"name": name}
    if address is None:
        _check_local_resources(spec)
    if o.stage in ("search", "final") and not resume and not paths.bounds.exists() and o.lr_bounds is None:
        raise UsageError("--stage", f"stage {o.stage!r} needs stage-1 bounds: run --stage range first with "
                         f"--name {name}, or give --lr-bounds MIN_LR MAX_LR")
    if o.stage == "final" and not paths.summary.exists():
        raise UsageError("--stage", f"stage 'final' needs a finished search in {exp} (summary.csv)")
    return spec, exp, state | {"name": name}


def _with_options(spec: SpaceSpec, o: Options, *, budget: float | None) -> SpaceSpec:
    """The space file's search: and final: sections overridden by the options."""
    try:
        spec = spec.with_search(num_samples=o.num_samples, max_concurrent=o.max_concurrent,
                                cpus_per_trial=o.cpus_per_trial, gpus_per_trial=o.gpus_per_trial, seed=o.seed,
                                budget=budget)
    except SpaceError as e:
        raise UsageError(_flag(e.path), e.rule) from None
    if o.refit is not None:
        spec = dataclasses.replace(spec, final=spec.final.replace(refit=o.refit))
    return spec


def _check_local_resources(spec: SpaceSpec) -> None:
    """GPUs and CPUs per trial that this machine (a local Ray) does not have."""
    if spec.search.gpus_per_trial > 0:
        gpus = _local_gpu_count()
        if gpus == 0:
            raise UsageError("--gpus-per-trial", f"{spec.search.gpus_per_trial:g} GPUs per trial requested but this "
                             "machine has no CUDA GPU; use 0 here, or --address to submit to a GPU cluster")
        if spec.search.gpus_per_trial > gpus:
            raise UsageError("--gpus-per-trial", f"{spec.search.gpus_per_trial:g} GPUs per trial but this machine "
                             f"has {gpus}")
    if spec.search.cpus_per_trial > (os.cpu_count() or 1):
        raise UsageError("--cpus-per-trial", f"{spec.search.cpus_per_trial:g} CPUs per trial but this machine has "
                         f"{os.cpu_count()}")
