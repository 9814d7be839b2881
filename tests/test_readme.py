"""The README's Python examples run as written and print what the README says they print.

What the README shows comes from one run on one machine. A range test and a training are seeded, but their
floats differ between CPUs (other kernels and summation orders), thread counts and seeds. So the words (the
status, the verdict, the lower-bound note) must be the same everywhere, and every number must lie within a
tolerance that covers its measured spread: ``benchmarks/readme_examples.py`` ran the example at 4 seeds x 1 and
2 torch threads (``benchmarks/results/readme_examples.json``), and each tolerance below is about 1.5x the
range it measured. CI runs this file a second time at another seed and thread count
(``SCTUNE_README_SEED``, ``SCTUNE_README_THREADS``) to show that it does not depend on the machine.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest

from sctune import TaskConfig, TrainConfig, build_model, load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.readme_examples import readme_example, run_example, with_seed  # noqa: E402

NUM = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
# One regex per printed line of the API example; named groups are the numbers and words compared.
LINES = [
    rf"range test: (?P<status>\w+), min_lr {NUM}, max_lr {NUM}(?P<note>.*)$",
    rf"Super-convergence (?P<verdict>\w+): held-out accuracy stays high \(>= {NUM}\) from LR {NUM}, where the "
    rf"model has learned, to {NUM}(?P<top_note>[^:]*): {NUM}x the learning LR, {NUM}% of the sweep past it; "
    rf"(?P<rest>.*)$",
    rf"recommended max_lr {NUM}: (?P<rule>[^,]*), in the band that starts at LR {NUM}(?P<why>.*)$",
    rf"one-cycle, (?P<epochs>\d+) epochs: val acc {NUM}, test acc {NUM}$",
]
# Per line, per number: (kind, tolerance, measured range over 4 seeds x 2 thread counts).
TOLERANCES = [
    # the bounds: the top of the high band (here the ramp's end, 3 on every run) and max/4; one evaluation
    # step of the sweep is 8% of it, so 25% allows a band that ends one or two evaluations earlier
    [("rel", 0.25), ("rel", 0.25)],
    # the band's level (measured 0.787-0.814), the LR where the model has learned (0.090-0.191: it sits on
    # the evaluation grid, one step apart between seeds), the band's top, the headroom top/learn (15.7-33.2x,
    # follows learn) and the coverage in % (100 on all); the rule's thresholds (3x, 60%) are words: constants
    [("abs", 0.04), ("factor", 3.0), ("rel", 0.25), ("factor", 3.0), ("abs", 15.0)],
    # the recommended max_lr (max/4 raised to the band's start: follows the bounds) and the band's start
    [("rel", 0.25), ("factor", 3.0)],
    # val acc (measured 0.977-0.991, 216 images: one image is 0.005) and test acc (0.989-0.997, 360 images);
    # at the band's top (max_lr 3, the example before the recommendation) they spread twice as far: 0.963-0.991
    [("abs", 0.04), ("abs", 0.03)],
]


def _within(kind: str, tol: float, shown: float, printed: float) -> bool:
    if kind == "abs":
        return abs(printed - shown) <= tol + 1e-9
    if kind == "rel":
        return abs(printed - shown) <= tol * abs(shown)
    return abs(math.log(printed / shown)) <= math.log(tol)  # "factor"


def compare(shown: list[str], printed: list[str]) -> list[str]:
    """Every difference between the README's lines and a run's that the tolerances do not allow."""
    if len(printed) != len(shown):
        return [f"{len(printed)} lines printed, the README shows {len(shown)}"]
    problems = []
    for i, (pattern, tols, want, got) in enumerate(zip(LINES, TOLERANCES, shown, printed, strict=True)):
        mw, mg = re.match(pattern, want), re.match(pattern, got)
        if mw is None or mg is None:
            problems.append(f"line {i + 1} is not of the form {pattern!r}: README {want!r}, printed {got!r}")
            continue
        if mw.groupdict() != mg.groupdict():  # status, verdict, notes, epochs: the same on every machine
            problems.append(f"line {i + 1}: words {mg.groupdict()} differ from the README's {mw.groupdict()}")
        named = set(mw.re.groupindex.values())
        numbers_w, numbers_g = ([float(m.group(k)) for k in range(1, m.re.groups + 1) if k not in named]
                                for m in (mw, mg))
        for (kind, tol), a, b in zip(tols, numbers_w, numbers_g, strict=True):
            if not _within(kind, tol, a, b):
                problems.append(f"line {i + 1}: {b} printed, README {a} ({kind} tolerance {tol})")
    return problems


def test_tolerances_are_checked_number_by_number():
    """The comparison itself: within tolerance passes, a number past it, another word or a missing line fails."""
    _, shown = readme_example()
    assert compare(shown, shown) == []
    assert compare(shown, shown[:-1])  # a line missing
    assert compare(shown, [shown[0].replace(": ok,", ": noisy,"), *shown[1:]])  # another status
    assert compare(shown, [shown[0], shown[1].replace("Super-convergence likely", "Super-convergence unlikely"),
                           *shown[2:]])
    last = re.sub(r"test acc [\d.]+", "test acc 0.500", shown[-1])
    assert compare(shown, [*shown[:-1], last]) == [f"line {len(shown)}: 0.5 printed, README "
                                                   f"{_shown_test_acc(shown)} (abs tolerance 0.03)"]


def _shown_test_acc(shown: list[str]) -> float:
    return float(re.search(r"test acc ([\d.]+)", shown[-1]).group(1))


def test_readme_example_prints_what_the_readme_shows():
    code, shown = readme_example()
    seed = int(os.environ.get("SCTUNE_README_SEED", "0"))
    threads = int(os.environ.get("SCTUNE_README_THREADS", "0")) or None
    printed = run_example(with_seed(code, seed), threads=threads).splitlines()
    assert compare(shown, printed) == [], "\n".join(printed)


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


@pytest.mark.parametrize("seed", [1])
def test_with_seed_changes_every_seed_the_example_sets(seed):
    code, _ = readme_example()
    changed = with_seed(code, seed)
    assert "seed=0" not in changed and f"seed={seed}" in changed and f"TrainConfig(seed={seed}," in changed
