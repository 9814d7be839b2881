"""Shared helpers: environment, machine/version stamp, statistics, result files, CLI options.

Nothing here times anything by itself; each benchmark records ``os.getloadavg()`` next to its
measurements because this machine is shared (other jobs run concurrently) and wall-clock numbers
are only comparable *within* one run, side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Any Ray a benchmark starts stays on this machine and never phones home.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
SCHEMA_VERSION = 1


# -- environment ------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    """Machine, software versions, git revision and date: stamped on every result file."""
    status = _git("status", "--porcelain", "--untracked-files=no", "sctune")
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "gpu": "none (CPU only)",
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "torchvision", "ray", "optuna", "numpy", "pandas",
                                              "scikit-learn", "mnist1d")},
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "sctune_source_modified": bool(status) if status is not None else None,
        "loadavg_at_start": list(os.getloadavg()),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (from /proc)."""
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            f = _stat_fields(int(p.name))
            if f is not None:
                kids.setdefault(int(f[1]), []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


class CpuTracker:
    """CPU seconds used by a process tree between ``start()`` and ``stop()``, robust to processes
    that come and go (Ray actors): a thread polls /proc every ``interval`` s and keeps, per (pid,
    start time), the first and last user+system ticks seen; the total is the sum of the differences
    (a process first seen after start counts from zero). It misses at most ``interval`` s of work of
    each process that exits, and processes that live less than ``interval``."""

    def __init__(self, root: int | None = None, interval: float = 0.2):
        import threading

        self.root = os.getpid() if root is None else root
        self.interval = interval
        self._first: dict[tuple[int, str], int] = {}
        self._last: dict[tuple[int, str], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self, initial: bool = False) -> None:
        for pid in process_tree(self.root):
            f = _stat_fields(pid)
            if f is None:
                continue
            key, ticks = (pid, f[19]), int(f[11]) + int(f[12])
            self._first.setdefault(key, ticks if initial else 0)
            self._last[key] = ticks

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def start(self) -> CpuTracker:
        self._poll(initial=True)
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._poll()
        return sum(self._last[k] - self._first[k] for k in self._last) / _TICK


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds (user + system) used so far by ``root`` (default: this process), its live descendants,
    and the children they have already reaped. On a shared machine CPU time measures the work done far
    more stably than wall time, which also counts the time other jobs held the cores."""
    total = 0
    for pid in process_tree(os.getpid() if root is None else root):
        f = _stat_fields(pid)
        if f is not None:  # fields after ')': state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / _TICK


# -- statistics -------------------------------------------------------------------------------

def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Median and spread of repeated measurements (None/NaN entries are counted as missing)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    out: dict[str, Any] = {"n": len(vals), "missing": len(values) - len(vals), "values": vals}
    if not vals:
        return out | {"median": None, "mean": None, "std": None, "min": None, "max": None, "iqr": None}
    a = np.asarray(vals)
    q25, q75 = np.percentile(a, [25, 75])
    return out | {"median": float(np.median(a)), "mean": float(a.mean()),
                  "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                  "min": float(a.min()), "max": float(a.max()), "iqr": [float(q25), float(q75)]}


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Per-repeat ratios num[i]/den[i] (paired, same repeat), then their median and spread."""
    return stats([a / b if (a is not None and b) else None for a, b in zip(num, den, strict=True)])


# -- results ----------------------------------------------------------------------------------

def command_line() -> str:
    """The command that reproduces this run, as typed from the repository root."""
    mod = Path(sys.argv[0]).stem
    return shlex.join([".venv/bin/python", "-m", f"benchmarks.{mod}", *sys.argv[1:]])


def write_result(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2, allow_nan=False))
    os.replace(tmp, path)
    return path


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def envelope(name: str, args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """The common head of every result file."""
    return {"schema": SCHEMA_VERSION, "benchmark": name, "quick": bool(args.quick), "command": command_line(),
            "machine": machine_info(), "settings": settings}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the pipeline end to end (tests)")
    p.add_argument("--out", type=Path, default=None,
                   help="result folder (default: benchmarks/results, or benchmarks/results/quick with --quick)")
    return p


def out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    return DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)
