"""Shared pytest setup. Keep each section small; add new sections below with a header comment."""

# -- environment: set before anything imports torch or ray ---------------------------------------
import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# OpenMP threads sleep instead of spinning while idle: on a busy runner, spinning threads fight the
# other processes for the cores and made these tiny-op tests ~8x slower (201 s vs 27 s, 2 cores, load 9).
# libgomp reads this when torch loads, hence before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Unit tests use tiny tasks; two threads keep them fast and stop oversubscription on shared CI runners.
torch.set_num_threads(2)


# -- one real smoke experiment shared by the output tests ------------------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SmokeRun:
    root: Path  # <storage>/<name>
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """``python -m sctune.search --smoke`` on the embedded default, through the real CLI and Ray."""
    storage = tmp_path_factory.mktemp("smoke_storage")
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path_factory.mktemp("ray_tmp")))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sctune.search", "--smoke", "--storage-path", str(storage),
                           "--name", "smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return SmokeRun(storage / "smoke", proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


# -- a Ray temp dir of a test's own (short: Ray's socket paths have a length limit) ----------------------
@pytest.fixture
def ray_tmp():
    from fault_util import cleanup_ray_tmp, short_tmpdir

    d = short_tmpdir()
    yield d
    cleanup_ray_tmp(d)


# -- sctune's wheel installed into a fresh venv (test_packaging.py; test_readme.py's default run) ----------
@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(python of a venv with the built wheel, an empty folder outside the checkout, env without PYTHONPATH)."""
    pytest.importorskip("setuptools")
    from wheel_util import install_wheel

    return install_wheel(tmp_path_factory.mktemp("wheel"))
