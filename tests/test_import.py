"""Importing the core must not pull in Ray: only trainables.py imports it at import time; the CLI, the
experiment, the stages' wiring and their summaries load it only when a stage runs."""

import subprocess
import sys

CORE = ["sctune", "sctune.config", "sctune.schedules", "sctune.range_test", "sctune.curvature", "sctune.data",
        "sctune.models", "sctune.train", "sctune.tasks", "sctune.bounds", "sctune.loss_bounds", "sctune.space",
        "sctune.budget", "sctune.report", "sctune.experiment", "sctune.fidelity", "sctune.plan", "sctune.summaries", "sctune.progress",
        "sctune.tune_state", "sctune.stages", "sctune.pipeline", "sctune.search"]


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
