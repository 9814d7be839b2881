"""Search-space files: YAML -> validated ``SpaceSpec`` (stage 2's plan from it: ``sctune.service.plan``).

A file has these sections (all but ``task`` optional)::

    task:        TaskConfig fields (dataset, model, modules, data_root, train_subset, ...); dataset and model
                 are built-in or registered names, or module:attribute references (see ``sctune.core.tasks``)
    fixed:       flat TrainConfig fields applied to every trial (epochs, batch_size, optimizer, ...)
    range_test:  RangeTestConfig fields (end_lr, num_iter, weight_decays, repeats, ...)
    search:      SearchConfig fields (metric, num_samples, max_concurrent, ASHA settings, seed, ...)
    final:       FinalConfig fields (seeds)
    space:       flat TrainConfig field -> {type: float|int, low, high, log, scale} or {choices: [...]}
    smoke:       overrides of the sections above used with --smoke (tiny budgets for tests and CI)

``scale`` expresses a range relative to stage 1's result, so one file serves any model:
``max_lr_bound`` / ``min_lr_bound`` (the range test's LR bounds) and ``wd_prior`` (the weight
decay that let the LR go highest). ``max_lr: {low: 0.25, high: 1.0, log: true, scale: max_lr_bound}``
searches max_lr log-uniformly inside [max_bound / 4, max_bound].

Every rule is checked by ``load_space`` with ``yaml.safe_load`` before any cluster work; errors
name the file, the key path and the rule broken.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.config import ConfigBase, ConfigError, RangeTestConfig, TaskConfig, TrainConfig, require

SECTIONS = ("task", "fixed", "range_test", "search", "final", "space", "smoke")
# Budgets beyond these cannot end in reasonable time on any hardware sctune targets (the paper's longest
# CIFAR run is 800 epochs; its range tests are a few thousand iterations); generous on purpose.
LIMITS = {
    "range_test.num_iter": 100_000,  # one range test
    "range_test.tests": 1_000,  # range tests in all: len(weight_decays) x repeats
    "fixed.epochs": 10_000,  # one training run (also any searched epochs)
    "search.num_samples": 100_000,
    "final.seeds": 1_000,
}
SCALES = ("max_lr_bound", "min_lr_bound", "wd_prior")
# Installed (pip install .): the shipped files are package data in the package (pyproject.toml maps the
# checkout's top-level search_spaces/ to sctune/search_spaces/); in a checkout they are that folder.
_PACKAGED_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
DEFAULT_SPACE_DIR = (_PACKAGED_SPACES if _PACKAGED_SPACES.is_dir()
                     else Path(__file__).resolve().parents[2] / "search_spaces")


class SpaceError(ConfigError):
    """A search-space file broke a rule: message is ``FILE: key.path: rule``."""

    def __init__(self, file: str | Path, path: str, message: str):
        self.file = str(file)
        super().__init__(path, message)
        self.args = (f"{file}: {path}: {message}" if path else f"{file}: {message}",)

    def __reduce__(self):
        return type(self), (self.file, self.path, self.rule), self.__dict__

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class SearchConfig(ConfigBase):
    metric: str = "val/acc"  # reported every epoch (precise BN); ASHA's rungs compare it at equal phase
    mode: str = "max"
    select_last: int = 3  # trials are ranked by the mean of their last this-many evaluations (``<metric>_tail``)
    num_samples: int = 16  # at most this many trials (with a budget: fewer when the budget runs out first)
    max_concurrent: int = 2
    # halving: successive halving over complete one-cycle schedules of 1/8 .. 1 of the training (``fidelity``);
    # asha: full-length trials, Ray's ASHA with rungs at equal schedule phase; none: full-length trials
    scheduler: str = "halving"
    rung_phase: float = 2.0  # first ASHA rung, in schedule phase: 0 start, 1 LR peak, 2 cycle end, 3 run end
    grace_period: int | None = None  # epochs; set: rungs by epoch instead of by phase (not like with like)
    reduction_factor: float = 2.0
    budget: float | None = None  # whole experiment's compute in full-training equivalents (FTE), or none
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

    def __post_init__(self):
        require(self.mode in ("max", "min"), "mode", f"must be 'max' or 'min', got {self.mode!r}")
        require(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        require(self.select_last >= 1, "select_last", f"must be >= 1, got {self.select_last}")
        require(0 < self.rung_phase < 3, "rung_phase",
                 f"must be in (0, 3) (0 start, 1 LR peak, 2 cycle end, 3 run end), got {self.rung_phase}")
        require(self.budget is None or self.budget > 0, "budget",
                 f"must be > 0 full-training equivalents, got {self.budget}")
        require(self.num_samples <= LIMITS["search.num_samples"], "num_samples",
                 f"must be <= {LIMITS['search.num_samples']:,} (a search that cannot end), got {self.num_samples:,}")
        require(self.max_concurrent >= 1, "max_concurrent", f"must be >= 1, got {self.max_concurrent}")
        require(self.scheduler in ("halving", "asha", "none"), "scheduler",
                 f"must be 'halving', 'asha' or 'none', got {self.scheduler!r}")
        require(self.grace_period is None or self.grace_period >= 1, "grace_period",
                 f"must be >= 1, got {self.grace_period}")
        require(self.reduction_factor > 1, "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        require(self.cpus_per_trial > 0, "cpus_per_trial", f"must be > 0, got {self.cpus_per_trial}")
        require(self.gpus_per_trial >= 0, "gpus_per_trial", f"must be >= 0, got {self.gpus_per_trial}")
        require(self.gpus_per_trial <= 1 or float(self.gpus_per_trial).is_integer(), "gpus_per_trial",
                 f"above 1 must be a whole number of GPUs, got {self.gpus_per_trial}")


@dataclass(frozen=True)
class FinalConfig(ConfigBase):
    seeds: int = 3  # final fit repeated over this many seeds: mean and spread of test accuracy
    # Retrain on train + validation, as the paper's numbers do (its ResNet-56 trained on all 50k CIFAR
    # images), for as many iterations as a search trial ran (its budgets are in iterations).
    refit: bool = False

    def __post_init__(self):
        require(self.seeds >= 0, "seeds", f"must be >= 0 (0: test the search's best trial itself), got {self.seeds}")


@dataclass(frozen=True)
class Dist:
    """One searched parameter."""

    name: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    scale: str | None = None
    choices: tuple = ()

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        d = {"type": self.kind, "low": self.low, "high": self.high, "log": self.log}
        if self.scale:
            d["scale"] = self.scale
        return d


@dataclass(frozen=True)
class SpaceSpec:
    path: str
    base: TrainConfig  # task + fixed values: what every trial starts from
    range_test: RangeTestConfig
    search: SearchConfig
    final: FinalConfig
    space: dict[str, Dist] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    filled: tuple[str, ...] = ()  # what ``autofill.fill_missing`` added to the file, and why (one line each)

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def with_search(self, **changes: Any) -> SpaceSpec:
        """Override SearchConfig fields (CLI options), re-validated."""
        data = self.search.to_dict() | {k: v for k, v in changes.items() if v is not None}
        try:
            search = SearchConfig.from_dict(data, "search")
        except ConfigError as e:
            raise SpaceError("command line", e.path, e.rule) from None
        return dataclasses.replace(self, search=search)


def _parse_dist(file: str, path: str, name: str, spec: Any) -> Dist:
    if not isinstance(spec, Mapping):
        raise SpaceError(file, path, f"must be a mapping like {{type: float, low: .., high: ..}} or "
                         f"{{choices: [...]}}, got {spec!r}")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise SpaceError(file, f"{path}.{extra[0]}", "unknown key next to 'choices'")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(file, f"{path}.choices", f"must be a non-empty list, got {choices!r}")
        for i, c in enumerate(choices):
            if not isinstance(c, (int, float, str, bool)) or (isinstance(c, float) and not math.isfinite(c)):
                raise SpaceError(file, f"{path}.choices[{i}]", f"must be a number, string or bool, got {c!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise SpaceError(file, f"{path}.choices", f"has duplicates: {choices!r}")
        return Dist(name, "categorical", choices=tuple(choices))
    allowed = {"type", "low", "high", "log", "scale"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise SpaceError(file, f"{path}.{extra[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))}, or choices)")
    kind = spec.get("type", "float")
    if kind not in ("float", "int"):
        raise SpaceError(file, f"{path}.type", f"must be 'float' or 'int', got {kind!r}")
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(file, f"{path}.{key}", "is required")
        v = spec[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpaceError(file, f"{path}.{key}", f"must be a finite number, got {v!r}")
        if kind == "int" and not float(v).is_integer():
            raise SpaceError(file, f"{path}.{key}", f"must be an integer for type int, got {v!r}")
    low, high = spec["low"], spec["high"]
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(file, f"{path}.log", f"must be true or false, got {log!r}")
    if not low < high:
        raise SpaceError(file, f"{path}.low", f"must be < high, got low={low} high={high}")
    if log and low <= 0:
        raise SpaceError(file, f"{path}.low", f"must be > 0 with log: true, got {low}")
    scale = spec.get("scale")
    if scale is not None and scale not in SCALES:
        raise SpaceError(file, f"{path}.scale", f"must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale is not None and low < 0:
        raise SpaceError(file, f"{path}.low", f"must be >= 0 with scale (a multiplier), got {low}")
    return Dist(name, kind, low=float(low) if kind == "float" else int(low),
                high=float(high) if kind == "float" else int(high), log=log, scale=scale)


def _merge(base: dict, override: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "space":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_space(raw: Any, file: str = "<space>", *, smoke: bool = False) -> SpaceSpec:
    """Validate a parsed YAML document (see module docstring)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SpaceError(file, "", f"top level must be a mapping of sections ({', '.join(SECTIONS)}), "
                         f"got {type(raw).__name__}")
    for k in raw:
        if k not in SECTIONS:
            raise SpaceError(file, str(k), f"unknown section (allowed: {', '.join(SECTIONS)})")
    for k in SECTIONS:
        if k in raw and raw[k] is not None and not isinstance(raw[k], Mapping):
            raise SpaceError(file, k, f"must be a mapping, got {type(raw[k]).__name__} {raw[k]!r}")
    doc = {k: dict(raw.get(k) or {}) for k in SECTIONS}
    if smoke:
        smoke_over = doc.pop("smoke")
        for k in smoke_over:
            if k not in SECTIONS or k == "smoke":
                raise SpaceError(file, f"smoke.{k}", "unknown section")
        doc = _merge(doc, smoke_over)
    try:
        task = TaskConfig.from_dict(doc["task"], "task")
        task_keys = set(TaskConfig.__dataclass_fields__)
        flat_keys = TrainConfig.flat_keys()
        for k in doc["fixed"]:
            if k in task_keys:
                raise ConfigError(f"fixed.{k}", "is a task setting: put it under task:")
            if k not in flat_keys:
                raise ConfigError(f"fixed.{k}", f"unknown training parameter (known: {', '.join(sorted(set(flat_keys) - task_keys))})")
        base = TrainConfig.from_flat(doc["fixed"], "fixed").replace(task=task)
        rt = RangeTestConfig.from_dict(doc["range_test"], "range_test")
        search = SearchConfig.from_dict(doc["search"], "search")
        final = FinalConfig.from_dict(doc["final"], "final")
    except SpaceError:
        raise
    except ConfigError as e:
        raise SpaceError(file, e.path, e.rule) from None
    _check_budgets(file, base, rt, final)
    space: dict[str, Dist] = {}
    searchable = set(TrainConfig.flat_keys()) - set(TaskConfig.__dataclass_fields__)
    for name, spec in doc["space"].items():
        if name not in searchable:
            raise SpaceError(file, f"space.{name}", f"unknown training parameter (searchable: {', '.join(sorted(searchable))})")
        space[name] = _parse_dist(file, f"space.{name}", name, spec)
    if "schedule" not in space:  # else which parameters matter depends on the sample
        from .autofill import unused_by_schedule

        for name in unused_by_schedule(base.schedule, space):
            raise SpaceError(file, f"space.{name}", f"is not used by schedule {base.schedule!r}: it sets the LR and "
                             "momentum from its own parameters, so searching it changes nothing; remove it or "
                             "set fixed.schedule")
    _check_space_consistency(file, base, space)
    _check_names(file, base)
    return SpaceSpec(path=str(file), base=base, range_test=rt, search=search, final=final, space=space,
                     raw={k: v for k, v in raw.items()})


def _check_budgets(file: str, base: TrainConfig, rt: RangeTestConfig, final: FinalConfig) -> None:
    """Refuse budgets that cannot end in reasonable time (``LIMITS``), naming the key."""
    checks = [("range_test.num_iter", rt.num_iter, ""),
              ("range_test.repeats", len(rt.weight_decays) * rt.repeats,
               f" range tests in all (len(weight_decays) {len(rt.weight_decays)} x repeats {rt.repeats})"),
              ("fixed.epochs", base.epochs, ""), ("final.seeds", final.seeds, "")]
    for path, value, what in checks:
        limit = LIMITS["range_test.tests" if path == "range_test.repeats" else path]
        if value > limit:
            raise SpaceError(file, path, f"must be <= {limit:,}{' ' + what.strip() if what else ''} (a budget that "
                             f"cannot end in reasonable time; see LIMITS in sctune/service/space.py), got {value:,}")


def _check_space_consistency(file: str, base: TrainConfig, space: dict[str, Dist]) -> None:
    # Each sampled point must build a valid TrainConfig: check the corners of every range.
    for name, d in space.items():
        if d.scale is not None:
            continue  # resolved against stage-1 results; checked again then
        values = list(d.choices) if d.kind == "categorical" else [d.low, d.high]
        for v in values:
            try:
                base.with_flat(**{name: v})
            except ConfigError as e:
                raise SpaceError(file, f"space.{name}", f"value {v!r} is invalid: {e.rule}") from None
    mn, mx = space.get("min_momentum"), space.get("max_momentum")
    if mn is not None and mx is not None and mn.kind != "categorical" and mx.kind != "categorical":
        if mn.high > mx.low:
            raise SpaceError(file, "space.min_momentum.high",
                             f"must be <= space.max_momentum.low ({mx.low}) so every sample keeps "
                             f"min_momentum <= max_momentum, got {mn.high}")


def _check_names(file: str, base: TrainConfig) -> None:
    """The task's dataset and model resolve here, in the driver: ``task.modules`` import, ``module:attr``
    references import and name a callable, other names are registered (see ``sctune.core.tasks``)."""
    from ..core.tasks import check_task

    try:
        check_task(base.task)
    except ConfigError as e:
        raise SpaceError(file, e.path, e.rule) from None


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path, self.rule = path, message


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain YAML only) that refuses duplicate mapping keys at any level: PyYAML keeps
    the last one silently, so a repeated ``fixed:`` would drop the first without a word."""

    def construct_document(self, node):
        _refuse_duplicates(node, "")
        return super().construct_document(node)


def _refuse_duplicates(node: yaml.Node, path: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, str] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                where = f"{path}.{key}" if path else str(key)
                line = f"{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}"
                if key in seen:
                    raise DuplicateKeyError(where, f"duplicate key (at line:column {seen[key]} and {line}); YAML "
                                                   "would silently keep only the last one")
                seen[key] = line
                _refuse_duplicates(value_node, where)
            else:
                _refuse_duplicates(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, f"{path}[{i}]")


def safe_load_strict(text: str) -> Any:
    """``yaml.safe_load`` that also refuses duplicate keys (``DuplicateKeyError``, with the key path)."""
    loader = StrictSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_space(path: str | Path, *, smoke: bool = False) -> SpaceSpec:
    """Read and validate a search-space file with a ``yaml.SafeLoader`` that refuses duplicate keys."""
    p = Path(path)
    if not p.is_file():
        raise SpaceError(p, "", "file not found" if not p.exists() else "is not a file")
    try:
        raw = safe_load_strict(p.read_text())
    except DuplicateKeyError as e:
        raise SpaceError(p, e.path, e.rule) from None
    except yaml.YAMLError as e:
        raise SpaceError(p, "", f"invalid YAML (only plain YAML is accepted, no Python tags): {e}") from None
    except UnicodeDecodeError as e:
        raise SpaceError(p, "", f"not a text file: {e}") from None
    if raw is None:
        raise SpaceError(p, "", "is empty (no sections); a space file needs at least task: {dataset: ..., "
                                "model: ...}, see search_spaces/digits.yaml")
    filled: list[str] = []
    if isinstance(raw, Mapping):
        # loads the data (to scale the defaults) only if a section is missing
        from .autofill import fill_missing

        raw, filled = fill_missing(raw, str(p))
    if smoke and isinstance(raw, Mapping) and not raw.get("smoke"):
        raise SpaceError(p, "smoke", "--smoke needs a smoke: section in the space file (the tiny budgets it "
                                     "runs with), e.g. smoke: {fixed: {epochs: 2}, search: {num_samples: 2}}")
    if smoke:  # the main sections must be valid on their own too: a full run uses them as written
        import copy

        parse_space(copy.deepcopy(raw), str(p), smoke=False)
    return dataclasses.replace(parse_space(raw, str(p), smoke=smoke), filled=tuple(filled))
