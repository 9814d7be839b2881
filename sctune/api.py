"""``sctune.tune(model_fn, data_fn, budget=4)``: the whole service from Python, no YAML.

The model factory and the data function are registered in the driver (they travel to every Ray worker with
the trials, as ``register_dataset`` / ``register_model`` do), the space is a task-only one completed from the
data (``autofill``), and the answer is the recommended configuration (``recommend.recommended``) with its
expected test accuracy.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

DATASET_NAME, MODEL_NAME = "sctune_tune_data", "sctune_tune_model"


class _WithoutTask:
    """``data_fn()`` as a registered dataset function ``fn(task)``. Carries the user's module name: sctune
    ships to the workers only registrations that are not its own (``tasks.registrations``)."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.__module__ = getattr(fn, "__module__", None) or "__main__"

    def __call__(self, task: Any) -> Any:
        return self.fn()


def _takes_task(fn: Callable) -> bool:
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return True


def tune(model_fn: Callable[..., Any], data_fn: Callable[..., Any], *, budget: float | None = 4.0,
         space: Mapping[str, Any] | None = None, name: str = "tune", storage_path: str | Path = "sctune_results",
         **options: Any) -> dict[str, Any]:
    """Run the three stages on ``model_fn`` and ``data_fn`` and return the recommended configuration.

    ``model_fn(num_classes, input_shape, dropout) -> nn.Module``; ``data_fn()`` (or ``data_fn(task)``) ->
    ``(x_train, y_train, x_test, y_test, num_classes, augment)``, tensors, x normalised (see
    ``sctune.core.data.register_dataset``). ``budget``: the whole experiment's compute in full trainings (FTE).
    ``space``: any sections of a space file to use instead of the defaults (e.g. ``{"fixed": {"epochs": 20}}``).
    Other keywords are ``Options`` (``smoke=True``, ``max_concurrent=...``). An experiment ``name`` that
    exists is resumed (``exist_ok``), so a script calling this can be run again.

    Returns the configuration (``recommend.recommended``: max_lr, div_factor, ..., epochs) plus
    ``test_acc_mean`` / ``test_acc_std`` of the final fit, ``experiment`` (its folder) and ``snippet``
    (PyTorch code reproducing it).
    """
    from .core.data import register_dataset
    from .core.models import register_model
    from .core.tasks import DATASETS, MODELS
    from .present.recommend import recommended, torch_snippet
    from .service.autofill import fill_missing
    from .service.pipeline import run
    from .service.space import SpaceError, parse_space

    raw = dict(space or {})
    if "task" in raw:
        raise SpaceError("sctune.tune", "space.task", "is set by model_fn and data_fn: leave it out")
    data = data_fn if _takes_task(data_fn) else _WithoutTask(data_fn)
    register_dataset(DATASET_NAME, data, overwrite=True)
    register_model(MODEL_NAME, model_fn, overwrite=True)
    try:  # the names serve this call only: the process's registries are left as they were
        raw["task"] = {"dataset": DATASET_NAME, "model": MODEL_NAME}
        raw, filled = fill_missing(raw, "sctune.tune")
        spec = dataclasses.replace(parse_space(raw, "sctune.tune", smoke=bool(options.get("smoke"))),
                                   filled=tuple(filled))
        options.setdefault("exist_ok", True)
        res = run(spec, name=name, storage_path=storage_path, budget=budget, **options)
    finally:
        DATASETS.entries.pop(DATASET_NAME, None)
        MODELS.entries.pop(MODEL_NAME, None)
    best = res.best or {}
    config = best.get("config") or {}
    final = best.get("final") or {}
    return {**recommended(config), "test_acc_mean": final.get("test_acc_mean"),
            "test_acc_std": final.get("test_acc_std"), "experiment": str(res.root),
            "snippet": torch_snippet(config) if config else None}
