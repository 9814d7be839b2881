"""Building sctune prints no deprecation warnings of ours (setuptools' "`project.license` as a TOML table
is deprecated" banner came up on every install), and the built wheel works outside the checkout: installed
into a fresh venv, ``python -m sctune.search`` finds its embedded default space (package data) from an
unrelated folder: ``--stage plan`` prints its plan. The whole default search runs from the installed wheel in
test_readme.py, against the README's "What you get" block (the ``installed`` fixture, conftest.py)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
from wheel_util import build_wheel

REPO = Path(__file__).resolve().parent.parent


def test_wheel_builds_without_deprecation_warnings(tmp_path):
    pytest.importorskip("setuptools")
    wheel, out = build_wheel(tmp_path)
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


def test_installed_wheel_plans_the_default_search_from_another_folder(installed):
    py, elsewhere, env = installed
    p = subprocess.run([str(py), "-m", "sctune.search", "--stage", "plan"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "[plan] stage 1:" in p.stdout and "1221 training samples" in p.stdout, p.stdout  # digits
    assert not (elsewhere / "sctune_results").exists()  # a dry run writes nothing
