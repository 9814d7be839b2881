"""Benchmark 5: end to end. ``python -m sctune.search`` on its default (digits) from a fresh shell.

Each repeat launches ``bash -c '/usr/bin/time -v .venv/bin/python -m sctune.search --name N
--storage-path P'`` (a new interpreter: imports, Ray start-up and shutdown included) and, while it
runs, polls the whole process tree under that shell every 0.25 s (/proc: the driver, Ray's GCS,
raylet, dashboard agents and every worker) for the sum of RSS and of PSS (proportional set size:
shared pages split between the processes sharing them, so the sum does not double-count torch's
libraries). Reported: wall time, peak summed RSS, peak summed PSS, the driver's own max RSS from
``/usr/bin/time -v``, the CPU seconds (user + system) of every process of the tree as last seen by the
poller (``/usr/bin/time``'s own total misses Ray workers, whose parent is killed before reaping them;
the poller misses at most the last 0.25 s of each process), per-stage wall time (from sctune's progress lines), and the range-test stage's
share of the run's training compute (iterations: range-test steps vs search and final-fit epochs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, envelope, loadavg, log, out_dir, parser, stats, write_result

NAME = "end_to_end"
FULL = {"args": [], "repeats": 3, "space": "search_spaces/digits.yaml"}
# quick: the CLI from a fresh shell with Ray, but only stage 1 of the smoke settings (tests)
QUICK = {"args": ["--smoke", "--stage", "range"], "repeats": 1, "space": "search_spaces/digits.yaml"}
POLL_S = 0.25


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(p.name))
    return kids


def tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _kib(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Poller(threading.Thread):
    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.peak_rss_kib = self.peak_pss_kib = self.peak_procs = 0
        self.samples = 0
        self.cpu_ticks: dict[tuple[int, str], int] = {}  # (pid, start time) -> utime + stime last seen

    def run(self) -> None:
        while not self.stop.is_set():
            pids = tree(self.root)
            rss = sum(_kib(Path(f"/proc/{p}/status"), "VmRSS:") for p in pids)
            pss = sum(_kib(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in pids)
            for p in pids:
                f = _stat(p)
                if f is not None:  # after ')': utime = field 11, stime = 12, starttime = 19
                    self.cpu_ticks[(p, f[19])] = int(f[11]) + int(f[12])
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.samples += 1
            self.stop.wait(POLL_S)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


STAGE_LINE = re.compile(r"^\[(range|search|final)\] .*\| (\d+)s$")


def stage_walls(stderr: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in stderr.splitlines():
        m = STAGE_LINE.match(line.strip())
        if m:
            out[m.group(1)] = float(m.group(2))  # the last line of a stage holds its elapsed time
    return out


def compute_share(exp: Path, *, smoke: bool) -> dict[str, Any]:
    """Training iterations per stage, from the experiment folder sctune wrote."""
    import pandas as pd

    from sctune.core.data import load_dataset
    from sctune.service.space import load_space

    spec = load_space(exp / "space.yaml", smoke=smoke)
    data = load_dataset(spec.base.task)
    spe = len(data.y_train) // min(spec.base.batch_size, len(data.y_train))
    curves = pd.read_csv(exp / "range_test" / "curves.csv")
    range_iters = len(curves)
    summary = pd.read_csv(exp / "summary.csv") if (exp / "summary.csv").exists() else None
    search_iters = int(summary["epochs_run"].sum()) * spe if summary is not None else 0
    import json

    best = json.loads((exp / "best.json").read_text()) if (exp / "best.json").exists() else None
    final_iters = sum(int(r.get("epochs") or 0) for r in best["final"]["runs"]) * spe if best else 0
    total = range_iters + search_iters + final_iters
    fte = spec.base.epochs * spe
    return {"steps_per_epoch": spe, "iterations": {"range": range_iters, "search": search_iters, "final": final_iters},
            "fte": {"range": range_iters / fte, "search": search_iters / fte, "final": final_iters / fte},
            "range_share": range_iters / total, "search_trials": len(summary) if summary is not None else 0,
            "search_pruned": int((summary["status"] == "pruned").sum()) if summary is not None else 0,
            "final_test_acc_mean": best["final"].get("test_acc_mean") if best else None}


def one_run(extra: list[str], workdir: Path, name: str) -> dict[str, Any]:
    storage = workdir / "storage"
    cmd = (f"/usr/bin/time -v {REPO}/.venv/bin/python -m sctune.search --name {name} "
           f"--storage-path {storage} {' '.join(extra)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                 "RAY_USAGE_STATS_ENABLED": "0"})
    poller = Poller(proc.pid)
    poller.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    tv_wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    cpu = sum(poller.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")
    exp = storage / name
    share = compute_share(exp, smoke="--smoke" in extra) if proc.returncode == 0 else None
    return {"returncode": proc.returncode, "wall_s": wall, "time_v_elapsed": tv_wall.group(1) if tv_wall else None,
            "driver_max_rss_mib": int(m.group(1)) / 1024 if m else None, "tree_cpu_s": cpu,
            "tree_peak_rss_mib": poller.peak_rss_kib / 1024, "tree_peak_pss_mib": poller.peak_pss_kib / 1024,
            "tree_peak_processes": poller.peak_procs, "poll_samples": poller.samples,
            "stage_wall_s": stage_walls(stderr), "compute": share, "loadavg": loadavg(),
            "stderr_tail": stderr[-1500:] if proc.returncode else None, "stdout_tail": stdout[-800:]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["returncode"] == 0]
    return {
        "runs": runs,
        "wall_s": stats([r["wall_s"] for r in ok]),
        "tree_cpu_s": stats([r["tree_cpu_s"] for r in ok]),
        "tree_peak_rss_mib": stats([r["tree_peak_rss_mib"] for r in ok]),
        "tree_peak_pss_mib": stats([r["tree_peak_pss_mib"] for r in ok]),
        "driver_max_rss_mib": stats([r["driver_max_rss_mib"] for r in ok]),
        "stage_wall_s": {s: stats([r["stage_wall_s"].get(s) for r in ok]) for s in ("range", "search", "final")},
        "range_share_of_iterations": stats([r["compute"]["range_share"] for r in ok if r["compute"]]),
        "range_fte": stats([r["compute"]["fte"]["range"] for r in ok if r["compute"]]),
        "range_share_of_stage_wall": stats([r["stage_wall_s"].get("range", 0) / sum(r["stage_wall_s"].values())
                                            for r in ok if r["stage_wall_s"]]),
        "final_test_acc": stats([r["compute"]["final_test_acc_mean"] for r in ok if r["compute"]]),
        "failed_runs": len(runs) - len(ok),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int)
    args = p.parse_args(argv)
    conf = dict(QUICK if args.quick else FULL)
    if args.repeats:
        conf["repeats"] = args.repeats
    out = out_dir(args)
    payload = envelope(NAME, args, conf | {"poll_s": POLL_S,
                                           "command": "python -m sctune.search " + " ".join(conf["args"])})
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    path = None
    for r in range(conf["repeats"]):
        with tempfile.TemporaryDirectory(prefix="sctune-e2e-") as d:
            name = f"e2e{'-smoke' if args.quick else ''}-{r}"
            res = one_run(conf["args"], Path(d), name)
        runs.append(res)
        log(f"repeat {r}: rc {res['returncode']} wall {res['wall_s']:.1f}s cpu {res['tree_cpu_s']}s "
            f"peak RSS {res['tree_peak_rss_mib']:.0f} MiB PSS {res['tree_peak_pss_mib']:.0f} MiB "
            f"stages {res['stage_wall_s']} (load {res['loadavg']})")
        # written after every repeat, so a long run interrupted later keeps what it measured
        payload["results"] = summarize(runs)
        payload["repeats_done"] = len(runs)
        payload["wall_s"] = time.perf_counter() - t_start
        payload["loadavg_at_end"] = loadavg()
        path = write_result(out, NAME, payload)
    log(f"wrote {path}")
    ok = [r for r in runs if r["returncode"] == 0]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
