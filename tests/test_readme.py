"""The README's Python examples run as written and print what the README says they print."""

from __future__ import annotations

import contextlib
import io
import re
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


def test_readme_registration_example_plugs_into_the_core():
    from sctune import data, models

    try:
        _run(BLOCKS[1])
        splits = load_dataset(TaskConfig(dataset="my_data", model="my_net"))
        assert splits.sizes()["test"] == 200 and splits.num_classes == 10
        model = build_model("my_net", num_classes=10, input_shape=splits.input_shape, dropout=0.1)
        assert model(splits.x_val[:4]).shape == (4, 10)
        assert TrainConfig().with_flat(dataset="my_data", model="my_net").task.dataset == "my_data"
    finally:
        data._DATASETS.pop("my_data", None)
        models._MODELS.pop("my_net", None)
