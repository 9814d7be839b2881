"""The progress display: on a terminal one block per stage updated in place (rich), piped a few plain lines.

Both run the same stand-in stage (three trials through Tune's callback hooks) in a child process, once with
stderr on a pseudo-terminal (python's ``pty``) and once on a pipe."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STAGE = r'''
import sys
from types import SimpleNamespace
from sctune.present.progress import ProgressLines, start_clock

start_clock()
p = ProgressLines("search", 3, metric="m", mode="max", epochs=2, fte=(0.5, 4.0, 0.5))
p.setup()
ts = [SimpleNamespace(trial_id=f"t{i}", status="PENDING", last_result={}) for i in range(3)]
for i, t in enumerate(ts):
    t.status = "RUNNING"
    p.on_trial_start(0, ts, t)
    for e in (1, 2):
        t.last_result = {"epoch": e, "m": 0.5 + 0.1 * e + 0.01 * i}
        p.on_trial_result(0, ts, t, t.last_result)
    t.status = "TERMINATED"
    p.on_trial_complete(0, ts, t)
p.on_experiment_end(ts)
print("END", file=sys.stderr, flush=True)
'''


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TERM="xterm-256color", COLUMNS="140")
    env.pop("NO_COLOR", None)
    return env


def test_on_a_terminal_one_block_updates_in_place():
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", STAGE], stdin=subprocess.DEVNULL, stdout=child, stderr=child,
                            env=_env(), close_fds=True)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(main)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, out
    assert "END" in out
    # rich redraws the block: the cursor moves up over it and the line is erased, no new line per update
    assert re.search(r"\x1b\[\d*A", out) and "\x1b[2K" in out, repr(out[-2000:])
    last = out[out.rindex("[search]"):]
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", last)
    assert "3/3 done" in plain and "(0 pruned, 0 errored)" in plain and "best m 0.7200" in plain, plain
    assert "FTE 3.50/4" in plain and "elapsed" in plain, plain


def test_piped_a_line_per_finished_trial_and_no_escape_codes():
    p = subprocess.run([sys.executable, "-c", STAGE], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("[search]")]
    # each start of the first wave (nothing finished yet), each new best (every trial here beats the one before)
    # and the stage's end always show; nothing else in these few seconds (other finishes: one per
    # COMPLETION_GAP_S, other results: one per INTERVAL_S), so not one line per result (6) and start (3)
    assert len(lines) <= 3 + 3 + 1, lines
    assert "\x1b[" not in p.stderr
    assert re.match(r"\[search\] 3/3 done \(0 pruned, 0 errored\) \| 0 running \| best m 0\.7200 \| FTE 3\.50/4 \| \d+s$",
                    lines[-1]), lines[-1]


FINAL = r'''
import sys
from types import SimpleNamespace
from sctune.present.progress import ProgressLines, start_clock

start_clock()
p = ProgressLines("final", 2, metric="test/acc", mode="max", epochs=2)
p.setup()
ts = [SimpleNamespace(trial_id=f"s{i}", status="PENDING", last_result={}) for i in range(2)]
for t, acc in zip(ts, (0.9, 0.8)):
    t.status = "RUNNING"
    p.on_trial_start(0, ts, t)
    t.last_result = {"epoch": 2, "test/acc": acc}
    p.on_trial_result(0, ts, t, t.last_result)
    t.status = "TERMINATED"
    p.on_trial_complete(0, ts, t)
p.on_experiment_end(ts)
'''


def test_final_fit_shows_the_mean_over_the_seeds_finished_so_far():
    """Not the best seed: after the first seed (0.9) the mean of 1 of 2, after the second (0.8) the mean 0.85."""
    p = subprocess.run([sys.executable, "-c", FINAL], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("[final]")]
    assert any("| mean test/acc 0.9000 over 1 of 2 seed(s) |" in ln for ln in lines), lines
    assert "| mean test/acc 0.8500 over 2 of 2 seed(s) |" in lines[-1], lines
    assert not any("best test/acc" in ln for ln in lines), lines


HALVING = r'''
import sys
from types import SimpleNamespace
from sctune.present.progress import ProgressLines, start_clock

start_clock()
p = ProgressLines("search", None, metric="m", mode="max", epochs=2, fte=(0.5, 8.0, 0.1))
p.setup()
ts = []
for i in range(6):  # one schedule after another, as the halving search runs them on a busy machine
    t = SimpleNamespace(trial_id=f"t{i}", status="RUNNING", last_result={})
    ts.append(t)
    p.on_trial_start(0, ts, t)
    for e in (1, 2):
        t.last_result = {"epoch": e, "m": 0.9}
        p.on_trial_result(0, ts, t, t.last_result)
    t.status = "TERMINATED"
    p.on_trial_complete(0, ts, t)
p.on_experiment_end(ts)
'''


def test_piped_halving_search_does_not_print_every_completion():
    """'0 running' between two schedules is not the stage's end: finishes stay one per COMPLETION_GAP_S, and
    the stage's last state (its total unknown ahead: '?') is printed when the experiment ends."""
    p = subprocess.run([sys.executable, "-c", HALVING], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("[search]")]
    # the first start, the first best, the end (old: a line for each of the 6 completions as well)
    assert len(lines) <= 4, lines
    assert re.match(r"\[search\] 6/\? done \(0 pruned, 0 errored\) \| 0 running \| best m 0\.9000 \| FTE 1\.70/8",
                    lines[-1]), lines
