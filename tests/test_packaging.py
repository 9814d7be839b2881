"""Building sctune prints no deprecation warnings of ours (setuptools' "`project.license` as a TOML table
is deprecated" banner came up on every install), and the built wheel works outside the checkout: installed
into a fresh venv, ``python -m sctune.search`` finds its embedded default space (package data) from an
unrelated folder: ``--stage plan`` prints its plan, and the whole default search runs to its answer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _build_wheel(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src"  # a copy: the build's egg-info and build/ folders stay out of the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("sctune", "search_spaces"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                        "-v", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sctune-*.whl")
    return wheel, out


def test_wheel_builds_without_deprecation_warnings(tmp_path):
    pytest.importorskip("setuptools")
    wheel, out = _build_wheel(tmp_path)
    bad = [ln for ln in out.splitlines() if "deprecat" in ln.lower() or "BuildBackendWarning" in ln]
    assert not bad, "\n".join(bad)
    names = zipfile.ZipFile(wheel).namelist()
    assert "sctune/core/tasks.py" in names and "sctune/search.py" in names
    meta = next(n for n in names if n.endswith("METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(meta).decode()
    shipped = {f"sctune/search_spaces/{p.name}" for p in (REPO / "search_spaces").glob("*.yaml")}
    assert shipped and shipped <= set(names), sorted(shipped - set(names))
    extras = [ln for ln in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
              if ln.startswith("Provides-Extra:")]
    assert {e.split(":")[1].strip() for e in extras} >= {"tensorboard", "bench", "dev"}, extras


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """The wheel in a fresh venv (no network: --no-index --no-deps; the dependencies come from this
    interpreter's site-packages through a .pth file, so torch is reused, not reinstalled), an empty folder
    outside the checkout, and an environment without PYTHONPATH: (python, folder, env)."""
    pytest.importorskip("setuptools")
    tmp_path = tmp_path_factory.mktemp("wheel")
    wheel, _ = _build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # a plain path line: appended after the venv's own site-packages, so the installed wheel's sctune wins
    # over any editable sctune here (the editable finder's own .pth is not processed from an added path)
    Path(purelib, "_reuse_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir",
                        "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS")}
    where = subprocess.run([str(py), "-c", "import sctune.service.space as s; print(s.__file__); print(s.DEFAULT_SPACE_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    module, space_dir = where.stdout.split()
    assert Path(module).is_relative_to(env_dir) and Path(space_dir).is_relative_to(env_dir), where.stdout
    return py, elsewhere, env


def test_installed_wheel_plans_the_default_search_from_another_folder(installed):
    py, elsewhere, env = installed
    p = subprocess.run([str(py), "-m", "sctune.search", "--stage", "plan"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "[plan] stage 1:" in p.stdout and "1221 training samples" in p.stdout, p.stdout  # digits
    assert not (elsewhere / "sctune_results").exists()  # a dry run writes nothing


@pytest.mark.ray
@pytest.mark.slow
def test_installed_wheel_runs_the_default_search_from_another_folder(installed, tmp_path, ray_tmp):
    """The whole default search (the embedded digits space, the default budget of 8 FTE, ~50 s on 2 cores)
    from the installed wheel: the three stages run and the answer is printed."""
    py, elsewhere, env = installed
    storage = tmp_path / "storage"
    env = dict(env, RAY_TMPDIR=str(ray_tmp), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    p = subprocess.run([str(py), "-m", "sctune.search", "--storage-path", str(storage), "--name", "digits"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    best = json.loads((storage / "digits" / "best.json").read_text())
    runs = best["final"]["runs"]
    assert runs and all(0.0 <= r["test/acc"] <= 1.0 for r in runs if not r["diverged"]), runs
    m = re.search(r"^Expected accuracy: ([\d.]+) \(test accuracy", p.stdout, flags=re.M)
    assert m and 0.0 <= float(m.group(1)) <= 1.0, p.stdout[-3000:]
    assert "Super-convergence" in p.stdout and "optimizer = torch.optim.SGD(" in p.stdout, p.stdout[-3000:]
    assert not (elsewhere / "sctune_results").exists()  # --storage-path is honoured
