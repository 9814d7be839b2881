"""sctune: Leslie Smith's super-convergence recipe as a distributed hyperparameter service on Ray Tune.

The plain-PyTorch core (schedules, range test, bounds, curvature, data, models, training loop) is
importable without Ray; ``sctune.search.run`` (and ``python -m sctune.search``) runs the three
stages on Ray Tune. Names below are imported on first use, so ``import sctune`` (and the CLI's
input validation) stays fast and does not pay for torch until it is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "api": ("tune",),
    "core.bounds": ("LRBounds", "SuperConvergenceVerdict", "aggregate_bounds", "bounds_from_frame", "smith_bounds"),
    "core.config": ("ConfigError", "OneCycleConfig", "RangeTestConfig", "RegularizationConfig", "TaskConfig",
               "TrainConfig"),
    "core.curvature": ("HessianFreeLR",),
    "core.data": ("DatasetSplits", "DeviceLoader", "load_dataset", "register_dataset"),
    "core.models": ("build_model", "register_model"),
    "core.range_test": ("RangeTestResult", "range_test", "run_range_test"),
    "service.space": ("SpaceSpec", "load_space"),
    "core.train": ("FitResult", "evaluate", "fit"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sctune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

