"""Bad input to ``python -m sctune.search``: exit code 2 within seconds, a message naming the file or
option and the key path, no traceback, and Ray never started (no session under a private RAY_TMPDIR),
nothing written to the storage path.

All cases run once, concurrently, in a module fixture; each test checks one case's outcome.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fault_util import REPO, cleanup_ray_tmp, cli_env, short_tmpdir

DIGITS = "task: {dataset: digits, model: digits_cnn}\n"


@dataclass
class Case:
    args: list[str]  # "{space}" is replaced by the case's space file, "{tmp}" by its temp dir
    expect: list[str]  # all must appear in stderr ("{space}"/"{tmp}" replaced as above)
    space: str | None = None  # YAML text of the space file, if the case has one
    skip_if_gpu: bool = False
    setup: str | None = None  # "file_in_way": {tmp}/blocker is a regular file; "broken_module": {tmp} on
    # PYTHONPATH holds sct_broken_task.py, which raises when imported
    module: str | None = None  # source of sct_case_task.py, put in {tmp} on PYTHONPATH


def _space(body: str) -> str:
    return DIGITS + body


CASES: dict[str, Case] = {
    # space files
    "yaml_python_tag": Case(["{space}"], ["{space}", "python/object/apply:os.system", "line"],
                            space='task: !!python/object/apply:os.system ["touch {tmp}/pwned"]\n'),
    "yaml_syntax": Case(["{space}"], ["{space}", "invalid YAML", "line"], space="task: {dataset: digits\n"),
    "unknown_section": Case(["{space}"], ["{space}", "searchh", "unknown section"],
                            space=_space("searchh: {num_samples: 4}\n")),
    "unknown_key": Case(["{space}"], ["{space}", "search.num_sample", "unknown key"],
                        space=_space("search: {num_sample: 4}\n")),
    "wrong_type_int": Case(["{space}"], ["{space}", "fixed.epochs", "integer"], space=_space("fixed: {epochs: ten}\n")),
    "wrong_type_bound": Case(["{space}"], ["{space}", "space.max_lr.low", "finite number"],
                             space=_space("space: {max_lr: {type: float, low: abc, high: 1.0}}\n")),
    "low_ge_high": Case(["{space}"], ["{space}", "space.max_lr.low", "< high"],
                        space=_space("space: {max_lr: {type: float, low: 1.0, high: 0.5}}\n")),
    "log_low_le_0": Case(["{space}"], ["{space}", "space.weight_decay.low", "log"],
                         space=_space("space: {weight_decay: {type: float, low: 0.0, high: 1.0e-3, log: true}}\n")),
    "empty_choices": Case(["{space}"], ["{space}", "space.dropout.choices", "non-empty"],
                          space=_space("space: {dropout: {choices: []}}\n")),
    "unknown_dataset": Case(["{space}"], ["{space}", "task.dataset", "imagenet99"],
                            space="task: {dataset: imagenet99, model: digits_cnn}\n"),
    "unknown_model": Case(["{space}"], ["{space}", "task.model", "resnet9000"],
                          space="task: {dataset: digits, model: resnet9000}\n"),
    # the user's own task: resolved in the driver before Ray starts (module:attr references, task.modules)
    "task_module_missing": Case(["{space}"], ["{space}: task.dataset: cannot import nopkg_sct.data: "
                                              "No module named 'nopkg_sct'"],
                                space="task: {dataset: nopkg_sct.data:load_cells, model: digits_cnn}\n"),
    "task_attribute_missing": Case(["{space}"], ["{space}: task.model: module sctune.core.models", "no attribute 'Nett'"],
                                   space="task: {dataset: digits, model: sctune.core.models:Nett}\n"),
    "task_not_callable": Case(["{space}"], ["{space}: task.dataset: sctune.core.data:KNOWN_TRAINVAL_SIZES is a dict",
                                            "not a function or class"],
                              space="task: {dataset: sctune.core.data:KNOWN_TRAINVAL_SIZES, model: digits_cnn}\n"),
    "task_modules_missing": Case(["{space}"], ["{space}: task.modules[1]: cannot import nopkg_sct_tasks"],
                                 space="task: {dataset: digits, model: digits_cnn, modules: [json, nopkg_sct_tasks]}\n"),
    "task_modules_bad_name": Case(["{space}"], ["{space}: task.modules[0]", "module name"],
                                  space="task: {dataset: digits, model: digits_cnn, modules: ['my pkg']}\n"),
    "task_module_raises": Case(["{space}"], ["{space}: task.dataset: cannot import sct_broken_task: "
                                             "RuntimeError: no GPU here"],
                               space="task: {dataset: sct_broken_task:load, model: digits_cnn}\n",
                               setup="broken_module"),
    "negative_epochs": Case(["{space}"], ["{space}", "fixed.epochs", ">= 1"], space=_space("fixed: {epochs: -1}\n")),
    "num_samples_0_file": Case(["{space}"], ["{space}", "search.num_samples", ">= 1"],
                               space=_space("search: {num_samples: 0}\n")),
    "momentum_overlap": Case(["{space}"], ["{space}", "space.min_momentum.high", "max_momentum"],
                             space=_space("space:\n  min_momentum: {type: float, low: 0.8, high: 0.95}\n"
                                          "  max_momentum: {type: float, low: 0.9, high: 0.97}\n")),
    "range_end_below_start": Case(["{space}"], ["{space}", "range_test.end_lr", "start_lr"],
                                  space=_space("range_test: {start_lr: 1.0, end_lr: 0.5}\n")),
    "missing_space_file": Case(["{tmp}/nope.yaml"], ["{tmp}/nope.yaml", "file not found"]),
    "empty_space_file": Case(["{space}"], ["{space}", "is empty"], space=""),
    "comments_only_space_file": Case(["{space}", "--smoke"], ["{space}", "is empty"], space="# nothing here\n"),
    "duplicate_section": Case(["{space}"], ["{space}: fixed: duplicate key", "line:column 2:1 and 3:1"],
                              space=_space("fixed: {epochs: 4}\nfixed: {epochs: 5}\n")),
    "duplicate_nested_key": Case(["{space}"], ["{space}: space.max_lr.low: duplicate key"],
                                 space=_space("space:\n  max_lr:\n    low: 0.1\n    high: 1.0\n    low: 0.2\n")),
    "smoke_without_section": Case(["{space}", "--smoke"], ["{space}: smoke:", "--smoke needs a smoke: section"],
                                  space=_space("fixed: {epochs: 4}\n")),
    "range_num_iter_unbounded": Case(["{space}"], ["{space}: range_test.num_iter", "<= 100,000",
                                                   "1,000,000,000,000"],
                                     space=_space("range_test: {num_iter: 1000000000000}\n")),
    "range_tests_unbounded": Case(["{space}"], ["{space}: range_test.repeats", "<= 1,000"],
                                  space=_space("range_test: {weight_decays: [0.0, 1.0e-4], repeats: 100000}\n")),
    "epochs_unbounded": Case(["{space}"], ["{space}: fixed.epochs", "<= 10,000"],
                             space=_space("fixed: {epochs: 1000000000}\n")),
    # options
    "num_samples_0_cli": Case(["--num-samples", "0"], ["--num-samples", ">= 1"]),
    "num_samples_unbounded_cli": Case(["--num-samples", "1000000000"], ["--num-samples", "<= 100,000"]),
    "num_samples_not_int": Case(["--num-samples", "abc"], ["--num-samples", "invalid int"]),
    "gpus_without_gpu": Case(["--gpus-per-trial", "1"], ["--gpus-per-trial", "no CUDA GPU"], skip_if_gpu=True),
    "gpus_more_than_machine": Case(["--gpus-per-trial", "64"], ["--gpus-per-trial", "64"]),
    "cpus_more_than_machine": Case(["--cpus-per-trial", str((os.cpu_count() or 1) + 1)],
                                   ["--cpus-per-trial", "this machine has"]),
    "storage_under_a_file": Case(["--storage-path", "{tmp}/blocker/results"],
                                 ["--storage-path", "{tmp}/blocker", "not a directory"], setup="file_in_way"),
    # storage that cannot hold an experiment (issue #20)
    "storage_in_proc": Case(["--storage-path", "/proc/sctune_x"], ["--storage-path", "/proc", "proc filesystem"]),
    "storage_in_sys": Case(["--storage-path", "/sys/sctune_x"], ["--storage-path", "/sys", "sysfs filesystem"]),
    "storage_is_a_file": Case(["--storage-path", "{tmp}/blocker"],
                              ["--storage-path", "{tmp}/blocker", "not a directory"], setup="file_in_way"),
    # a dataset or model that fails in the driver: the user's exception, before Ray starts
    "dataset_fails_in_driver": Case(["{space}"], ["{space}: task.dataset", "RuntimeError: boom: cells.npz is missing"],
                                    space="task: {dataset: sct_case_task:load, model: digits_cnn}\n",
                                    module="def load(task):\n    raise RuntimeError('boom: cells.npz is missing')\n"),
    "model_fails_in_driver": Case(["{space}"], ["{space}: task.model", "ValueError: needs 3 channels"],
                                  space="task: {dataset: digits, model: sct_case_task:Net}\n",
                                  module="def Net(num_classes, input_shape, dropout):\n"
                                         "    raise ValueError('needs 3 channels')\n"),
    # --smoke validates the main sections as well as the merged config
    "smoke_main_section_invalid": Case(["{space}", "--smoke"], ["{space}", "fixed.epochs", ">= 1"],
                                       space=_space("fixed: {epochs: -4}\nsmoke: {fixed: {epochs: 2}}\n")),
    "lr_bounds_reversed": Case(["--lr-bounds", "1.0", "0.1"], ["--lr-bounds", "MIN_LR < MAX_LR"]),
    "wd_prior_negative": Case(["--wd-prior", "-0.1"], ["--wd-prior", ">= 0"]),
    "resume_without_name": Case(["--resume"], ["--resume", "--name"]),
    "name_with_path": Case(["--name", "../escape"], ["--name", "plain folder name"]),
    "stage_search_without_bounds": Case(["--stage", "search", "--name", "fresh"], ["--stage", "--lr-bounds"]),
}


@dataclass
class Outcome:
    rc: int
    stderr: str
    wall: float
    tmp: Path
    ray_started: bool
    storage_written: bool
    extra: dict = field(default_factory=dict)


def _run_case(name: str, case: Case, root: Path) -> Outcome:
    tmp = root / name
    tmp.mkdir()
    ray_tmp = short_tmpdir("sce")
    fill = {"tmp": str(tmp), "space": str(tmp / "space.yaml")}
    try:
        if case.space is not None:
            (tmp / "space.yaml").write_text(case.space.format(**fill) if "{tmp}" in case.space else case.space)
        if case.setup == "file_in_way":
            (tmp / "blocker").write_text("a regular file where a folder is expected\n")
        env = cli_env(ray_tmp)
        if case.setup == "broken_module":
            (tmp / "sct_broken_task.py").write_text('raise RuntimeError("no GPU here")\n')
        if case.module is not None:
            (tmp / "sct_case_task.py").write_text(case.module)
        if case.setup == "broken_module" or case.module is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp), env.get("PYTHONPATH")]))
        args = [a.format(**fill) for a in case.args]
        if "--storage-path" not in args:
            args += ["--storage-path", str(tmp / "results")]
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "sctune.search", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        return Outcome(p.returncode, p.stderr, wall, tmp, ray_started=(ray_tmp / "ray").exists(),
                       storage_written=(tmp / "results").exists(),
                       extra={"pwned": (tmp / "pwned").exists()})
    finally:
        cleanup_ray_tmp(ray_tmp)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run_case, name, case, root) for name, case in CASES.items()}
        out = {name: f.result(timeout=300) for name, f in futures.items()}
    yield out
    shutil.rmtree(root, ignore_errors=True)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_cleanly(outcomes, name):
    case, o = CASES[name], outcomes[name]
    if case.skip_if_gpu and _has_gpu():
        pytest.skip("this machine has a GPU")
    fill = {"tmp": str(o.tmp), "space": str(o.tmp / "space.yaml")}
    assert o.rc == 2, f"rc {o.rc}: {o.stderr[-2000:]}"
    for text in case.expect:
        assert text.format(**fill) in o.stderr, f"{text.format(**fill)!r} not in: {o.stderr}"
    assert "Traceback" not in o.stderr, o.stderr
    # nothing hangs: each run has a 60 s timeout (a hang fails it); how fast a refusal is, is no test's business
    assert not o.ray_started, "Ray was started for bad input"
    assert not o.storage_written, "bad input left an experiment folder behind"
    assert not o.extra["pwned"], "a Python tag in YAML was executed"
