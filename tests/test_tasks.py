"""sctune.core.tasks without Ray: how task names resolve, and which of the user's modules must be shipped."""

from __future__ import annotations

import sys

import pytest

from sctune.core.config import ConfigError, TaskConfig
from sctune.core.tasks import (
    DATASETS,
    MODELS,
    check_task,
    is_reference,
    py_modules_to_ship,
    registrations,
    resolve_reference,
)

MODULE = '''\
import torch

CONSTANT = 3


def load(task):
    x = torch.randn(40, 4)
    y = torch.arange(40) % 2
    return x[:30], y[:30], x[30:], y[30:], 2, False
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``sct_user_mod`` in a folder of its own on sys.path (as a driver script would put it there)."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "sct_user_mod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "sct_user_mod", raising=False)
    yield folder
    sys.modules.pop("sct_user_mod", None)


def test_references_and_reserved_prefixes():
    assert is_reference("my_pkg.data:load_cells") and is_reference("nets:Net")
    assert not is_reference("torchvision:resnet18")  # sctune's own prefix, not a module
    assert not is_reference("digits") and not is_reference("a b:c") and not is_reference("pkg:")


def test_resolve_names_the_key_and_the_rule(user_module):
    assert callable(resolve_reference("sct_user_mod:load", "task.dataset"))
    with pytest.raises(ConfigError, match=r"^task.dataset: cannot import nopkg_x.data: No module named 'nopkg_x'$"):
        resolve_reference("nopkg_x.data:load", "task.dataset")
    with pytest.raises(ConfigError, match=r"^task.model: module sct_user_mod \(.*sct_user_mod.py\) has no attribute 'Net'"):
        resolve_reference("sct_user_mod:Net", "task.model")
    with pytest.raises(ConfigError, match=r"^task.dataset: sct_user_mod:CONSTANT is a int, not a function or class"):
        resolve_reference("sct_user_mod:CONSTANT", "task.dataset")
    check_task(TaskConfig(dataset="sct_user_mod:load", model="mlp", modules=("sct_user_mod",)))
    with pytest.raises(ConfigError, match=r"^task.modules\[0\]: cannot import nopkg_y"):
        check_task(TaskConfig(modules=("nopkg_y",)))


def test_modules_must_be_module_names():
    with pytest.raises(ConfigError, match=r"modules\[1\]: must be a module name"):
        TaskConfig.from_dict({"modules": ["ok.mod", "not ok"]}, "task")
    with pytest.raises(ConfigError, match=r"task.modules: must be a list"):
        TaskConfig.from_dict({"modules": "my_pkg"}, "task")


def test_only_modules_the_workers_cannot_see_are_shipped(user_module, monkeypatch, tmp_path):
    task = TaskConfig(dataset="sct_user_mod:load", model="mlp", modules=("json", "sctune.core.data"))
    check_task(task)
    regs = registrations(task)
    assert regs == {"datasets": {}, "models": {}}  # nothing registered: references travel as names
    want = [str(user_module / "sct_user_mod.py")]
    # a folder only the driver put on sys.path: shipped, locally and on a cluster; stdlib and sctune never
    assert py_modules_to_ship(task, regs, local=True, job_working_dir=False) == want
    assert py_modules_to_ship(task, regs, local=False, job_working_dir=False) == want
    # the folder the driver runs in: local workers see it; a job's working_dir is on every node
    monkeypatch.chdir(user_module)
    assert py_modules_to_ship(task, regs, local=True, job_working_dir=False) == []
    assert py_modules_to_ship(task, regs, local=False, job_working_dir=True) == []
    assert py_modules_to_ship(task, regs, local=False, job_working_dir=False) == want  # --address, no job
    # PYTHONPATH is inherited by local workers
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(user_module))
    assert py_modules_to_ship(task, regs, local=True, job_working_dir=False) == []


def test_driver_registrations_are_what_the_task_names(user_module):
    import sct_user_mod

    from sctune.core import data, models

    try:
        data.register_dataset("sct_cells", sct_user_mod.load)
        models.register_model("sct_net", lambda nc, shape, dropout: None)
        regs = registrations(TaskConfig(dataset="sct_cells", model="sct_net"))
        assert set(regs["datasets"]) == {"sct_cells"} and set(regs["models"]) == {"sct_net"}
        assert registrations(TaskConfig()) == {"datasets": {}, "models": {}}  # built-ins stay home
        # the registered function's module is shipped when the workers could not import it
        ship = py_modules_to_ship(TaskConfig(dataset="sct_cells"), {"datasets": regs["datasets"], "models": {}},
                                  local=True, job_working_dir=False)
        assert ship == [str(user_module / "sct_user_mod.py")]
    finally:
        DATASETS.entries.pop("sct_cells", None)
        MODELS.entries.pop("sct_net", None)
