"""Importing the core must not pull in Ray: only the trainables/stages layer may import it."""

import importlib.util
import subprocess
import sys

CORE = ["sctune", "sctune.config", "sctune.schedules", "sctune.range_test", "sctune.curvature", "sctune.data",
        "sctune.models", "sctune.train", "sctune.tasks"]
OPTIONAL_CORE = ["sctune.bounds"]  # pure functions of a curve; checked once the module exists


def _core_modules() -> list[str]:
    return CORE + [m for m in OPTIONAL_CORE if importlib.util.find_spec(m) is not None]


def test_core_imports_without_ray():
    mods = _core_modules()
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        + "print('LEAKED', leaked)\n"
        + "assert not leaked, leaked\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LEAKED []" in proc.stdout

