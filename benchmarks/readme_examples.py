"""How much the README's example output moves between machines, seeds and thread counts.

The README's Python API example prints a range test's bounds, its super-convergence verdict and a one-cycle
training's accuracy. Those numbers come from training, so they differ in the last digits between CPUs (other
kernels, other summation orders) and more between seeds. ``tests/test_readme.py`` compares a fresh run with
the README within tolerances; this script measures the spread those tolerances must cover: it runs the example
as written at several seeds (the range test's ``seed=`` and the training's seed) and torch thread counts,
parses every printed number, and writes the per-number range.

    .venv/bin/python -m benchmarks.readme_examples            # 4 seeds x 2 thread counts, ~5 min on 2 cores
    .venv/bin/python -m benchmarks.readme_examples --quick    # 2 runs
"""

from __future__ import annotations

import contextlib
import io
import re
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
    args = parser(__doc__).parse_args(argv)
    seeds, threads = ([0, 1], [2]) if args.quick else ([0, 1, 2, 3], [1, 2])
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
