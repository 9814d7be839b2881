"""The README's Python examples run as written and print what the README says they print."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

from sctune import TaskConfig, TrainConfig, build_model, load_dataset

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _run(code: str) -> tuple[dict, str]:
    out = io.StringIO()
    ns: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README is ours
    return ns, out.getvalue()


def test_readme_example_prints_what_the_readme_shows():
    ns, out = _run(BLOCKS[0])
    shown = re.search(r"prints \(digits.*?\n\n```\n(.*?)```", README, flags=re.S).group(1).splitlines()
    printed = out.splitlines()
    # the range test is seeded and deterministic on the CPU: its bounds and verdict print exactly as shown
    assert printed[:2] == shown[:2], out
    assert ns["bounds"].ok and ns["bounds"].verdict.possible is True
    acc = float(re.search(r"test acc ([\d.]+)", out).group(1))
    assert acc > 0.9  # digits with one cycle inside the tested bounds


def test_readme_user_module_plugs_into_the_core(tmp_path, monkeypatch):
    """The walk-through's my_task.py, named as module:attribute, without Ray (the full walk-through on Ray is
    tests/test_user_task.py)."""
    from user_task_util import readme_file

    (tmp_path / "my_task.py").write_text(readme_file("my_task.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_task", raising=False)
    task = TaskConfig(dataset="my_task:breast_cancer", model="my_task:TabularNet")
    splits = load_dataset(task)
    assert splits.sizes() == {"train": 386, "val": 69, "test": 114} and splits.num_classes == 2
    assert splits.input_shape == (30,)
    model = build_model(task.model, num_classes=2, input_shape=splits.input_shape, dropout=0.1)
    assert model.eval()(splits.x_val[:4]).shape == (4, 2)
    assert TrainConfig().with_flat(dataset=task.dataset, model=task.model).task == task
    sys.modules.pop("my_task", None)
