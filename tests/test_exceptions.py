"""sctune's exceptions survive pickling and copying with their message and fields intact.

Ray sends an exception raised in a worker to the driver by pickling it; an exception that cannot be
rebuilt from its pickle buries the real message under a second traceback
(``TypeError: __init__() missing 1 required positional argument``).
"""

from __future__ import annotations

import copy
import pickle

import pytest

from sctune.core.config import ConfigError, TaskConfig
from sctune.service.cluster import PreflightError
from sctune.service.experiment import StageError, UsageError
from sctune.service.space import SpaceError

CASES = [
    (ConfigError("task.dataset", "unknown dataset 'x'"), "task.dataset: unknown dataset 'x'",
     {"path": "task.dataset", "rule": "unknown dataset 'x'"}),
    (ConfigError("", "no path"), "no path", {"path": "", "rule": "no path"}),
    (SpaceError("space.yaml", "task.model", "cannot import my_pkg"), "space.yaml: task.model: cannot import my_pkg",
     {"file": "space.yaml", "path": "task.model", "rule": "cannot import my_pkg"}),
    (UsageError("--num-samples", "must be >= 1"), "--num-samples: must be >= 1",
     {"path": "--num-samples", "rule": "must be >= 1"}),
    (StageError("no usable bounds"), "no usable bounds", {}),
    (PreflightError("--gpus-per-trial 1 needs a GPU"), "--gpus-per-trial 1 needs a GPU", {}),
]


@pytest.mark.parametrize("exc,text,fields", CASES, ids=[type(c[0]).__name__ + str(i) for i, c in enumerate(CASES)])
@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_exception_round_trips(exc, text, fields, how):
    out = {"pickle": lambda e: pickle.loads(pickle.dumps(e)), "copy": copy.copy, "deepcopy": copy.deepcopy}[how](exc)
    assert type(out) is type(exc)
    assert str(out) == str(exc) == text
    for k, v in fields.items():
        assert getattr(out, k) == v


def test_config_error_from_a_config_round_trips():
    with pytest.raises(ConfigError) as info:
        TaskConfig.from_dict({"val_frac": 2.0}, "task")
    out = pickle.loads(pickle.dumps(info.value))
    assert (out.path, out.rule, str(out)) == (info.value.path, info.value.rule, str(info.value))
    assert out.path == "task.val_frac"
