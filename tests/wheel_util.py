"""Build sctune's wheel and install it into a fresh venv (test_packaging.py, and the README default-run check
in test_readme.py, which runs ``python -m sctune.search`` as a user who installed the wheel would)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_wheel(tmp_path: Path) -> tuple[Path, str]:
    """The wheel of a copy of the checkout (the build's egg-info and build/ folders stay out of the tree):
    (wheel, the build's output)."""
    src = tmp_path / "src"
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


def install_wheel(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """The wheel in a fresh venv (no network: --no-index --no-deps; the dependencies come from this
    interpreter's site-packages through a .pth file, so torch is reused, not reinstalled), an empty folder
    outside the checkout, and an environment without PYTHONPATH: (python, folder, env)."""
    wheel, _ = build_wheel(tmp_path)
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
