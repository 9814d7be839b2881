"""Frozen configuration dataclasses, one per concern.

Every config is built through ``from_dict`` which rejects unknown keys and bad values with a
``ConfigError`` naming the key path and the rule broken, so a typo in a search-space file fails
before any cluster work starts. Trainables receive a *flat* dict from Ray Tune (``max_lr``,
``weight_decay``...); ``TrainConfig.from_flat`` maps each flat name to its section. Field names
are therefore unique across the sections of ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A configuration value broke a rule. ``path`` is the dotted key path (e.g. ``space.max_lr.low``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.rule = message
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self):
        # Rebuilt from its own arguments: pickling (Ray sends a worker's exception to the driver) and
        # copy.copy would otherwise call __init__ with the message alone and fail.
        return type(self), (self.path, self.rule), self.__dict__


def error_line(err: Any) -> str | None:
    """Why a trial failed, in one line: the exception raised in the trial (``ConfigError: task.dataset: ...``),
    not Ray's wrapping of it (``RayTaskError(...)`` with the worker's traceback). None for no error."""
    if err is None:
        return None
    for _ in range(5):  # RayTaskError / TuneError -> the exception the trial raised
        cause = getattr(err, "cause", None)
        if cause is None or cause is err:
            break
        err = cause
    if isinstance(err, str):  # Tune's text trace: its last line names the exception
        lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else "unknown error"
    else:
        name = type(err).__name__
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        text = f"{name}: {first}" if first else name
    return text if len(text) <= 300 else text[:297] + "..."


_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """Coerce/validate a scalar against a simple type hint (int, float, bool, str, tuple, Optional)."""
    text = str(hint)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise ConfigError(path, "must not be null")
    if "bool" in text and "int" not in text:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {value!r}")
        return value
    if "tuple" in text:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {type(value).__name__} {value!r}")
        inner = float if "float" in text else (int if "int" in text else None)
        out = []
        for i, v in enumerate(value):
            if inner is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"{path}[{i}]", f"must be a number, got {v!r}")
                v = inner(v)
            out.append(v)
        return tuple(out)
    if "float" in text:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(path, f"must be finite, got {value!r}")
        return value
    if "int" in text:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"must be an integer, got {type(value).__name__} {value!r}")
        return value
    if "str" in text:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


class ConfigBase:
    """Mixin: strict construction from plain dicts, plus ``to_dict``."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: str = ""):
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"must be a mapping, got {type(data).__name__} {data!r}")
        data = dict(data)
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                _join(path, str(unknown[0])),
                f"unknown key (allowed: {', '.join(sorted(known))})",
            )
        kwargs = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            sub = hints[f.name]
            if isinstance(sub, type) and issubclass(sub, ConfigBase):
                kwargs[f.name] = sub.from_dict(data[f.name], _join(path, f.name))
            else:
                kwargs[f.name] = _check_type(_join(path, f.name), data[f.name], sub)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(_join(path, e.path), e.rule) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def require(cond: bool, key: str, rule: str) -> None:
    if not cond:
        raise ConfigError(key, rule)


@dataclass(frozen=True)
class TaskConfig(ConfigBase):
    """What to train: dataset, model and data split."""

    dataset: str = "digits"
    model: str = "digits_cnn"
    data_root: str = "~/.cache/sctune"  # cifar10/100 live here (torchvision's on-disk format)
    download: bool = False  # never fetch data unless asked
    train_subset: int | None = None  # paper Table 2: 10k/20k/30k/40k of CIFAR-10's 50k
    val_frac: float = 0.15  # held out of the training split for range-test accuracy and trial metrics
    augment: bool | None = None  # None = the dataset's default (crop+flip for CIFAR)
    data_seed: int = 0  # fixes the train/val split across every trial
    modules: tuple[str, ...] = ()  # imported first in the driver and every worker (their register_* calls run)
    train_on_val: bool = False  # train on train + validation (final.refit); val/* metrics are then seen data

    def __post_init__(self):
        for i, m in enumerate(self.modules):
            require(isinstance(m, str) and bool(_MODULE_NAME.match(m)), f"modules[{i}]",
                     f"must be a module name like my_pkg.tasks, got {m!r}")
        require(0.0 < self.val_frac < 0.9, "val_frac", f"must be in (0, 0.9), got {self.val_frac}")
        require(self.train_subset is None or self.train_subset > 0, "train_subset",
                 f"must be a positive integer, got {self.train_subset}")


@dataclass(frozen=True)
class OneCycleConfig(ConfigBase):
    """The 1cycle policy (METHOD.md section 3): one linear cycle then annihilation."""

    max_lr: float = 0.1
    # min_lr = max_lr / div_factor: one-cycle starts at max/10 (Smith 0.08 -> 0.8, 1803.09820 Fig. 2; 0.1 -> 3 on
    # ResNet-56). Not the range test's divisor (max/3..4): that is CLR's lower bound (RangeTestConfig.divisor).
    div_factor: float = 10.0
    cycle_frac: float = 0.9  # share of iterations spent in the cycle; the rest annihilates
    annihilation_factor: float = 1000.0  # final lr = min_lr / this (paper: 0.05 -> 5e-5)
    max_momentum: float = 0.95  # momentum cycles opposite to the LR: 0.95 -> 0.85 -> 0.95
    min_momentum: float = 0.85
    cycle_momentum: bool = True

    def __post_init__(self):
        require(self.max_lr > 0, "max_lr", f"must be > 0, got {self.max_lr}")
        require(self.div_factor >= 1, "div_factor", f"must be >= 1, got {self.div_factor}")
        require(0 < self.cycle_frac <= 1, "cycle_frac", f"must be in (0, 1], got {self.cycle_frac}")
        require(self.annihilation_factor >= 1, "annihilation_factor",
                 f"must be >= 1, got {self.annihilation_factor}")
        require(0 <= self.min_momentum <= self.max_momentum < 1, "min_momentum",
                 f"need 0 <= min_momentum <= max_momentum < 1, got {self.min_momentum}, {self.max_momentum}")

    @property
    def min_lr(self) -> float:
        return self.max_lr / self.div_factor


@dataclass(frozen=True)
class BaselineConfig(ConfigBase):
    """Non-1cycle schedules: piecewise-constant (the paper's baseline), CLR, constant."""

    lr: float = 0.1  # piecewise/constant base LR; CLR uses it as base_lr
    milestones_frac: tuple[float, ...] = (0.625, 0.875)  # paper: x0.1 at 50k and 70k of 80k iterations
    gamma: float = 0.1
    momentum: float = 0.9  # fixed momentum (paper baseline: 0.9)
    clr_max_lr: float = 1.0
    clr_step_epochs: float = 4.0  # CLR stepsize in epochs (Smith: 2-10x an epoch)
    clr_mode: str = "triangular"  # triangular | triangular2 | exp_range

    def __post_init__(self):
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(all(0 < m < 1 for m in self.milestones_frac), "milestones_frac",
                 f"each must be in (0, 1), got {self.milestones_frac}")
        require(list(self.milestones_frac) == sorted(self.milestones_frac), "milestones_frac",
                 "must be increasing")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.clr_mode in ("triangular", "triangular2", "exp_range"), "clr_mode",
                 f"must be triangular, triangular2 or exp_range, got {self.clr_mode!r}")


@dataclass(frozen=True)
class RegularizationConfig(ConfigBase):
    """Regularization to *reduce* when the LR is large (METHOD.md section 4)."""

    weight_decay: float = 1e-4
    dropout: float = 0.0
    label_smoothing: float = 0.0
    wd_norm_bias: bool = False  # apply weight decay to norm weights and biases too (default: no)

    def __post_init__(self):
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(0 <= self.label_smoothing < 1, "label_smoothing",
                 f"must be in [0, 1), got {self.label_smoothing}")


SCHEDULE_NAMES = ("onecycle", "piecewise", "clr", "constant")  # the names of schedules.SCHEDULES, without torch
OPTIMIZERS = ("sgd", "adamw", "adam")


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Everything one training run needs. Flat Tune keys map onto the sections by field name."""

    task: TaskConfig = field(default_factory=TaskConfig)
    onecycle: OneCycleConfig = field(default_factory=OneCycleConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    reg: RegularizationConfig = field(default_factory=RegularizationConfig)
    schedule: str = "onecycle"
    optimizer: str = "sgd"
    nesterov: bool = False
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1024
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto = cuda if available else cpu
    amp: bool = False  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = False  # NHWC memory format for conv nets on GPU
    compile: bool = False  # torch.compile the model
    track_curvature: bool = False  # log the Hessian-free LR estimate (METHOD.md section 6)
    # Precise BatchNorm before every held-out evaluation, as in the range test (train.recalibrate_bn):
    # running averages lag fast-moving weights and swing eval accuracy by tens of points at high LR,
    # and these numbers decide pruning and selection.
    precise_bn: bool = True
    precise_bn_samples: int = 512  # training samples (a fixed, evenly spaced subset) for the statistics

    def __post_init__(self):
        require(self.schedule in SCHEDULE_NAMES, "schedule", f"must be one of {SCHEDULE_NAMES}, got {self.schedule!r}")
        require(self.optimizer in OPTIMIZERS, "optimizer",
                 f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        require(self.precise_bn_samples >= 1, "precise_bn_samples", f"must be >= 1, got {self.precise_bn_samples}")

    # -- flat <-> nested ------------------------------------------------------------------
    @classmethod
    def flat_keys(cls) -> dict[str, str]:
        """Map each flat key to its section ('' for top-level fields)."""
        out: dict[str, str] = {}
        hints = get_type_hints(cls)
        for f in fields(cls):
            sub = hints[f.name]
            if isinstance(sub, type) and issubclass(sub, ConfigBase):
                for g in fields(sub):
                    out[g.name] = f.name
            else:
                out[f.name] = ""
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], path: str = "") -> TrainConfig:
        keys = cls.flat_keys()
        nested: dict[str, Any] = {}
        for k, v in flat.items():
            if k not in keys:
                raise ConfigError(_join(path, k), "unknown training parameter "
                                  f"(known: {', '.join(sorted(keys))})")
            section = keys[k]
            if section:
                nested.setdefault(section, {})[k] = v
            else:
                nested[k] = v
        return cls.from_dict(nested, path)

    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update(v)
            else:
                out[k] = v
        return out

    def with_flat(self, **changes: Any) -> TrainConfig:
        flat = self.to_flat()
        flat.update(changes)
        return TrainConfig.from_flat(flat)


# The range test's reading, one definition each: ``RangeTestConfig``'s fields and the readers' defaults
# (bounds_smith, loss_bounds) both take these.
# min_lr = max_lr / MIN_LR_DIVISOR: Smith's CLR lower bound, max/3..4 (1506.01186).
MIN_LR_DIVISOR = 4.0
# The high band: held-out accuracy counts as "still high" while its running median stays within this fraction
# of the learned range (best running median - untrained accuracy) below its best. On the authors' ResNet-56
# tests (shared reference curves) high-LR accuracy swings by 0.1-0.2 around ~0.75 after learning from 0.1:
# single points fall 15-30% of the learned range, the running median stays within ~10%.
HIGH_FRAC = 0.2
# Super-convergence verdict: the band must reach >= 3x the LR at which the model learned (a cycle between
# Smith's max_lr/3 and max_lr then lies wholly inside it) and cover most (>= 60%) of the sweep past that LR:
# MNIST-1D's BatchNorm CNN, where one-cycle does not beat the baseline at 8x fewer iterations (BENCHMARKS.md),
# collapses at 30-50% of a 0->3 sweep; every curve of the authors' stays high to the end (100%).
SC_MIN_HEADROOM = 3.0
SC_MIN_COVERAGE = 0.6


@dataclass(frozen=True)
class RangeTestConfig(ConfigBase):
    """The LR range test (METHOD.md section 2). Names follow pytorch-lr-finder."""

    start_lr: float = 0.0  # Smith starts at zero; exp mode needs > 0
    end_lr: float = 3.0  # Smith: 0 -> 3.0 on CIFAR
    num_iter: int = 300
    step_mode: str = "linear"  # linear (Smith) | exp
    smooth_f: float = 0.05  # EMA factor of the smoothed loss
    diverge_th: float = 5.0  # stop when smoothed loss > diverge_th * best smoothed loss (and > the starting one)
    eval_every: int = 10  # held-out accuracy every k steps
    eval_samples: int = 2048  # cap on the held-out set size, keeps evaluation cheap
    bn_recalibrate: bool = True  # precise BN before each evaluation (see train.recalibrate_bn)
    recal_samples: int = 512  # training samples used to recompute BatchNorm statistics
    divisor: float = MIN_LR_DIVISOR  # min_lr = max_lr / divisor (Smith: 3..4)
    method: str = "smith"  # smith | steepest | valley | divergence
    weight_decays: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 0.0)  # Smith's WD comparison (1803.09820)
    repeats: int = 3  # seeds per WD: range tests are noisy, aggregate with the median
    high_frac: float = HIGH_FRAC  # accuracy within this share of its learned range below the best: "still high"
    sc_min_headroom: float = SC_MIN_HEADROOM  # super-convergence: the band reaches >= this x the LR where it learned
    sc_min_coverage: float = SC_MIN_COVERAGE  # ...and covers >= this share of the sweep past that LR (bounds_smith)
    # One test's length at most this share of one full training's iterations (the paper: 5k-iteration tests
    # for a 10k-iteration training); longer tests are shortened by ``budget.plan_compute``, ``eval_every``
    # scaled so the curve keeps its number of evaluations. null: as long as ``num_iter`` says.
    max_fte: float | None = 0.5

    def __post_init__(self):
        require(self.step_mode in ("linear", "exp"), "step_mode",
                 f"must be 'linear' or 'exp', got {self.step_mode!r}")
        require(self.start_lr >= 0, "start_lr", f"must be >= 0, got {self.start_lr}")
        require(self.step_mode != "exp" or self.start_lr > 0, "start_lr",
                 "must be > 0 for step_mode 'exp' (a geometric ramp cannot start at zero)")
        require(self.end_lr > self.start_lr, "end_lr",
                 f"must be > start_lr ({self.start_lr}), got {self.end_lr}")
        require(self.num_iter >= 10, "num_iter", f"must be >= 10, got {self.num_iter}")
        require(0 < self.smooth_f < 1, "smooth_f", f"must be in (0, 1), got {self.smooth_f}")
        require(self.diverge_th > 1, "diverge_th", f"must be > 1, got {self.diverge_th}")
        require(1 <= self.eval_every <= self.num_iter, "eval_every",
                 f"must be in [1, num_iter], got {self.eval_every}")
        require(self.eval_samples >= 1, "eval_samples", f"must be >= 1, got {self.eval_samples}")
        require(self.recal_samples >= 1, "recal_samples", f"must be >= 1, got {self.recal_samples}")
        require(self.divisor >= 1, "divisor", f"must be >= 1, got {self.divisor}")
        require(self.max_fte is None or self.max_fte > 0, "max_fte", f"must be > 0 or null, got {self.max_fte}")
        require(self.method in ("smith", "steepest", "valley", "divergence"), "method",
                 f"must be smith, steepest, valley or divergence, got {self.method!r}")
        require(len(self.weight_decays) >= 1, "weight_decays", "must list at least one value")
        require(all(w >= 0 for w in self.weight_decays), "weight_decays",
                 f"each must be >= 0, got {self.weight_decays}")
        require(self.repeats >= 1, "repeats", f"must be >= 1, got {self.repeats}")
        require(0 < self.high_frac < 1, "high_frac", f"must be in (0, 1), got {self.high_frac}")
        require(self.sc_min_headroom >= 1, "sc_min_headroom", f"must be >= 1, got {self.sc_min_headroom}")
        require(0 <= self.sc_min_coverage <= 1, "sc_min_coverage", f"must be in [0, 1], got {self.sc_min_coverage}")
