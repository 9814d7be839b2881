"""Importing the core must not pull in Ray: only trainables.py and searchers.py import it at import time; the
CLI, the experiment, the stages' wiring and their summaries load it only when a stage runs."""

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sctune"
# every module of sctune/core, and the service and presentation modules that load Ray only when a stage runs
CORE = ["sctune", *sorted(f"sctune.core.{p.stem}" for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__"),
        "sctune.service.space", "sctune.service.budget", "sctune.service.experiment", "sctune.service.fidelity",
        "sctune.service.plan", "sctune.service.summaries", "sctune.service.tune_state", "sctune.service.stages",
        "sctune.service.pipeline", "sctune.present.report", "sctune.present.progress", "sctune.search"]


def test_core_imports_without_ray():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        + "print('LEAKED', leaked)\n"
        + "assert not leaked, leaked\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LEAKED []" in proc.stdout
