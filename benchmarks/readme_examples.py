"""How much the README's example output moves between machines, seeds and thread counts.

The README's Python API example prints a range test's bounds, its super-convergence verdict and a one-cycle
training's accuracy. Those numbers come from training, so they differ in the last digits between CPUs (other
kernels, other summation orders) and more between seeds. ``tests/test_readme.py`` compares a fresh run with
the README within tolerances; this script measures the spread those tolerances must cover: it runs the example
as written at several seeds (the range test's ``seed=`` and the training's seed) and torch thread counts,
parses every printed number, and writes the per-number range.

    .venv/bin/python -m benchmarks.readme_examples            # 4 seeds x 2 thread counts, ~5 min on 2 cores
    .venv/bin/python -m benchmarks.readme_examples --quick    # 1 run
    .venv/bin/python -m benchmarks.readme_examples --default  # the default CLI run at 4 seeds, ~5 min

``--default`` measures the README's "What you get" block instead: ``python -m sctune.search`` with no space
file (the embedded digits default) from an empty folder, at ``--seed`` 0-3 (0 is the README's run: the
default seed), writing ``readme_default.json``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import REPO, envelope, loadavg, log, out_dir, parser, write_result

README = REPO / "README.md"
# A number as the examples print it: 0.75, 3, 15.7x, 100%, 1e-05 (a trailing "x" or "%" is not part of it).
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def readme_example() -> tuple[str, list[str]]:
    """The README's first Python block and the lines the README says it prints."""
    text = README.read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    shown = re.search(r"prints \(digits.*?\n\n```\n(.*?)```", text, flags=re.S).group(1).splitlines()
    return code, shown


def readme_default_block() -> list[str]:
    """The README's "What you get" block: the lines of the default run after its ``$ python -m sctune.search``."""
    block = re.search(r"## What you get\n\n```\n\$ python -m sctune\.search\n(.*?)```", README.read_text(),
                      flags=re.S).group(1)
    return block.splitlines()


def run_default(seed: int | None = None, *, timeout: int = 900, python: Path | None = None,
                env: dict[str, str] | None = None) -> tuple[int, list[str], float, Path]:
    """``python -m sctune.search`` (no space file: the embedded default) from a fresh empty folder, stdout and
    stderr in one stream as a shell shows them; returns (rc, lines, wall seconds, the folder). Ray stays on
    loopback with its temp dir under the folder's own short temp dir. The caller removes the folder.
    Without ``python``: this interpreter, with the checkout on PYTHONPATH; with it (a venv where sctune is
    installed): that interpreter and ``env`` as given, the checkout not on the path."""
    cwd = Path(tempfile.mkdtemp(prefix="sctdef", dir="/tmp"))  # short: Ray's socket paths stay < 108 bytes
    base = os.environ if env is None else env
    env = {k: v for k, v in base.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(cwd / "r"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    if python is None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    (cwd / "r").mkdir()
    cmd = [str(python or sys.executable), "-m", "sctune.search", *([] if seed is None else ["--seed", str(seed)])]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout.splitlines(), time.monotonic() - t0, cwd


def measure_default(args, seeds: list[int]) -> None:
    shown = readme_default_block()
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        rc, lines, wall, cwd = run_default(seed or None)
        shutil.rmtree(cwd, ignore_errors=True)
        runs.append({"seed": seed, "returncode": rc, "wall_s": round(wall, 1), "lines": lines})
        log(f"default run, seed {seed}: rc {rc}, {wall:.0f} s, {len(lines)} lines")
    # per line the README shows (its stages' last progress lines, then every other line): the range of each
    # number over the runs that printed that line with the README's words
    spread = []
    for i, line in enumerate(default_rows(shown)):
        same = [numbers(r[i]) for r in (default_rows(x["lines"]) for x in runs)
                if i < len(r) and shape(r[i]) == shape(line)]
        cols = list(zip(*same, strict=True)) if same else []
        spread.append({"readme": line, "runs_with_same_words": len(same), "of": len(runs),
                       "min": [min(c) for c in cols], "max": [max(c) for c in cols]})
    payload = envelope("readme_default", args, {"seeds": seeds})
    payload |= {"results": {"readme": shown, "runs": runs, "spread": spread}, "loadavg_at_end": loadavg()}
    log(f"wrote {write_result(out_dir(args), 'readme_default', payload)}")


PROGRESS = re.compile(r"^\[(range|search|final)\] \d+/(?:\d+|\?) done")
CLOCK = re.compile(r"^(?:ETA )?\d+(?:m\d+)?s$")  # a progress line's elapsed time and ETA fields


def split_default(lines: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """A default run's output as (progress lines per stage, every other line). Other lines are made
    comparable between machines and runs: trailing spaces dropped, the results folder shown as ``<results>``
    (``/tmp/demo/sctune_results/digits`` in the README, a temp folder and a timestamped name in a run), the
    best trial's id as ``<id>``. A progress line's clock fields (elapsed, ETA) are dropped: wall time depends
    on the machine and its load, so it is never compared."""
    progress: dict[str, list[str]] = {}
    other = []
    for line in lines:
        line = line.rstrip()
        m = PROGRESS.match(line)
        if m:
            progress.setdefault(m.group(1), []).append(" | ".join(f for f in line.split(" | ")
                                                                  if not CLOCK.match(f)))
            continue
        line = re.sub(r"\S*/sctune_results/[^/\s]+", "<results>", line)
        # the snippet names the model's dropout only where it is not 0 (the recipe point's may be); the value
        # itself is on the configuration's dropout row
        line = re.sub(r"; the model's dropout \S+$", "", line)
        other.append(re.sub(r"best trial [0-9a-f]+,", "best trial <id>,", line))
    return progress, other


def default_rows(lines: list[str]) -> list[str]:
    """The lines of a default run that are compared: each stage's last progress line, then every other line."""
    progress, other = split_default(lines)
    return [progress[k][-1] for k in ("range", "search", "final") if k in progress] + other


def with_seed(code: str, seed: int) -> str:
    """The example with every seed it sets (the range test's ``seed=``, the training's ``TrainConfig``) at
    ``seed``: another seed is another initialisation, batch order and validation draw."""
    code = code.replace("seed=0", f"seed={seed}")
    return code.replace("TrainConfig(epochs=12,", f"TrainConfig(seed={seed}, epochs=12,", 1)


def run_example(code: str, *, threads: int | None = None) -> str:
    """Execute the example in this process and return what it printed."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README is ours
    finally:
        torch.set_num_threads(before)
    return out.getvalue()


def shape(line: str) -> str:
    """A printed line with its numbers replaced by ``#``: the words (status, verdict, lower-bound note) that a
    run on any machine must print the same."""
    return NUMBER.sub("#", line)


def numbers(line: str) -> list[float]:
    return [float(m) for m in NUMBER.findall(line)]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--default", action="store_true", help="measure the default CLI run (README: What you get)")
    args = p.parse_args(argv)
    if args.default:
        return measure_default(args, [0, 1] if args.quick else [0, 1, 2, 3])
    seeds, threads = ([0], [2]) if args.quick else ([0, 1, 2, 3], [1, 2])
    code, shown = readme_example()
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for t in threads:
            printed = run_example(with_seed(code, seed), threads=t).splitlines()
            runs.append({"seed": seed, "threads": t, "lines": printed,
                         "shapes": [shape(x) for x in printed], "numbers": [numbers(x) for x in printed]})
            log(f"seed {seed}, {t} thread(s): " + " | ".join(printed))
    # per line and number: the range over runs whose line has the README's shape
    spread = []
    for i, line in enumerate(shown):
        same = [r["numbers"][i] for r in runs if i < len(r["shapes"]) and r["shapes"][i] == shape(line)]
        cols = list(zip(*same, strict=True)) if same else []
        spread.append({"readme": line, "runs_with_same_words": len(same), "of": len(runs),
                       "min": [min(c) for c in cols], "max": [max(c) for c in cols]})
    payload = envelope("readme_examples", args, {"seeds": seeds, "threads": threads})
    payload |= {"results": {"runs": runs, "spread": spread}, "loadavg_at_end": loadavg()}
    log(f"wrote {write_result(out_dir(args), 'readme_examples', payload)}")


if __name__ == "__main__":
    main()
