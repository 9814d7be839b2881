"""Building sctune prints no deprecation warnings of ours (setuptools' "`project.license` as a TOML table
is deprecated" banner came up on every install)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_wheel_builds_without_deprecation_warnings(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: the build's egg-info and build/ folders stay out of the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "sctune", src / "sctune", ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                        "-v", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    bad = [ln for ln in out.splitlines() if "deprecat" in ln.lower() or "BuildBackendWarning" in ln]
    assert not bad, "\n".join(bad)
    (wheel,) = (tmp_path / "dist").glob("sctune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sctune/tasks.py" in names and "sctune/search.py" in names
    meta = next(n for n in names if n.endswith("METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(meta).decode()
