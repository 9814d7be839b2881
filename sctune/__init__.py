"""sctune: Leslie Smith's super-convergence recipe as a distributed hyperparameter service on Ray Tune.

The plain-PyTorch core (schedules, range test, bounds, curvature, data, models, training loop) is
importable without Ray; ``sctune.search.run`` (and ``python -m sctune.search``) runs the three
stages on Ray Tune (``import sctune.search`` imports Ray lazily, on the first run).
"""

from .bounds import LRBounds, SuperConvergenceVerdict, aggregate_bounds, bounds_from_frame, smith_bounds
from .config import (
    ConfigError,
    OneCycleConfig,
    RangeTestConfig,
    RegularizationConfig,
    TaskConfig,
    TrainConfig,
)
from .curvature import HessianFreeLR
from .data import DatasetSplits, DeviceLoader, load_dataset, register_dataset
from .models import build_model, register_model
from .range_test import RangeTestResult, range_test, run_range_test
from .space import SpaceSpec, load_space
from .train import FitResult, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DatasetSplits", "DeviceLoader", "FitResult", "HessianFreeLR", "LRBounds", "OneCycleConfig",
    "RangeTestConfig", "RangeTestResult", "RegularizationConfig", "SpaceSpec", "SuperConvergenceVerdict",
    "TaskConfig", "TrainConfig", "aggregate_bounds", "bounds_from_frame", "build_model", "evaluate", "fit",
    "load_dataset", "load_space", "range_test", "register_dataset", "register_model", "run_range_test",
    "smith_bounds",
]

