"""Live progress of a stage on stderr, and a failed trial's reason in one line.

``StageProgress`` is a Ray Tune callback: ``[search] 7/16 done (2 pruned, 0 errored) | 2 running | best
val/acc_tail 0.986 | FTE 5.2/8 | 31s | ETA 40s``. Where a person watches (stderr is a terminal) it is one
block per stage that updates in place (``rich.live.Live``); elsewhere (logs, CI, ``ray job submit``) a line
when a trial fails, brings a new best or ends the stage, when one finishes at most every ``COMPLETION_GAP_S``
seconds, and otherwise at most one every ``INTERVAL_S`` seconds, so a piped default run prints ~20 lines per stage. The clock runs from the start of the experiment (``start_clock``), not
of each stage; the final fit shows the mean test accuracy of its seeds so far, not the best seed. Its logic lives in ``ProgressLines`` (plain Python: the tests drive
it with stand-in trials); the class Tune gets adds Tune's ``Callback`` base, built on first use so that
importing this module does not load Ray. TensorBoard's session ends are not done here
(``trainables.TensorBoardSessions``).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ..core.config import error_line
from ..service.lifecycle import GUARD
from ..service.summaries import is_pruned

_ACTIVE: dict[str, Any] = {}  # the progress callback of the stage running now (the restored one on --resume)
# Non-TTY: a line at least this often while trials run (a trial's end always prints one). 30 s: the default
# digits search's 16 trials take ~3 minutes on 2 CPUs, so its stage stays under ~20 lines.
INTERVAL_S = 30.0
# Piped, a finished trial is news, but stage 2's halving finishes many short schedules in a burst (digits'
# default: 22 in 15 s): one line per COMPLETION_GAP_S at most, unless it brings a new best or ends the stage.
COMPLETION_GAP_S = 5.0


def start_clock() -> None:
    """The experiment's start: every stage's elapsed time and ETA count from here."""
    _ACTIVE["t0"] = time.monotonic()


def _clock() -> float:
    return _ACTIVE.setdefault("t0", time.monotonic())


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def active_progress() -> ProgressLines | None:
    return _ACTIVE.get("progress")


class ProgressLines:
    """Compact live progress on stderr, as Tune callback hooks.

    The best value is offered only by trials that ran to the end (``epochs``), so the line shows the number
    trials are selected by, never an intermediate epoch's. ``fte``: (spent before this stage, the
    experiment's budget or None, FTE per unit of this stage's trials: per epoch, or per range-test step).
    """

    def __init__(self, stage: str, total: int | None, *, metric: str, mode: str, epochs: int | None,
                 quiet: bool = False, fte: tuple[float, float | None, float | None] | None = None):
        self.stage, self.total, self.metric, self.mode, self.epochs = stage, total, metric, mode, epochs
        self.quiet = quiet
        self.fte_offset, self.fte_budget, self.fte_unit = fte if fte is not None else (0.0, None, None)
        self.units: dict[str, float] = {}  # trial id -> epochs (or range-test steps) it ran
        self.done = self.pruned = self.errored = self.running = 0
        self.best: float | None = None
        self.values: dict[str, float] = {}  # the final fit: seed -> test accuracy (shown as their mean)
        self._last_line = ""
        self._last_print = -math.inf
        self._errors_shown: set[str] = set()
        self._stage_t0 = time.monotonic()

    def setup(self, **info):
        # Called at the start of every fit, a restored one too (Tune unpickles this callback with the
        # tuner): the stage's own clock (for the ETA) restarts; counts are rebuilt from the trials.
        self._stage_t0 = time.monotonic()
        self._fte_t0 = self.fte_spent
        self._last_line = ""
        self._last_print = -math.inf
        self.values = {}
        self.recovered = set()
        _ACTIVE["progress"] = self
        _clock()
        old = _ACTIVE.pop("live", None)
        if old is not None:  # a stage that ended without on_experiment_end (an interrupt)
            old.stop()
        if not self.quiet and sys.stderr.isatty():
            _ACTIVE["live"] = _LiveBlock()

    def on_experiment_end(self, trials, **info):
        # the stage's last state, if the last completion was not shown (a search's total is not known ahead).
        # Not recounted after a stop (a signal, a full disk): Tune then marks the trials it stopped as
        # finished, and the counts would say they completed
        if not (GUARD.requested or GUARD.pending is not None):
            self._recount(trials)
        self._print(force=True)
        live = _ACTIVE.pop("live", None)
        if live is not None:
            live.stop()

    def on_step_begin(self, iteration, trials, **info):
        # An interrupt (SIGINT/SIGTERM, see lifecycle) asks Tune's loop to stop the way its own Ctrl-C does.
        GUARD.poke_tune()

    def _recount(self, trials, finished=None, errored: bool = False, started=None) -> None:
        """Counts from the trials' states (so a resumed stage counts what finished before the kill)."""
        def state(t):
            if t is finished:
                return "ERROR" if errored else "TERMINATED"
            if t is started:  # Tune calls on_trial_start just before it marks the trial RUNNING
                return "RUNNING"
            return t.status

        states = [(t, state(t)) for t in trials]
        for t, _ in states:  # a resumed stage counts the compute of trials that ran before the kill
            self._count(t, t.last_result or {})
        self.done = sum(st in ("TERMINATED", "ERROR") for _, st in states)
        self.errored = sum(st == "ERROR" for _, st in states)
        # a halving trial's own schedule is ``epochs`` of its config: shorter than the full length, not pruned
        self.pruned = sum(st == "TERMINATED" and is_pruned(t.last_result or {}, (getattr(t, "config", None) or {}).get("epochs", self.epochs))
                          for t, st in states)
        self.running = sum(st == "RUNNING" for t, st in states if t is not finished)
        for t, st in states:
            if st == "TERMINATED" and self.metric:
                self._offer(t.last_result or {}, t, finished=True)

    def _offer(self, result: dict, trial=None, finished: bool = False) -> bool:
        v = result.get(self.metric)
        ran = self.epochs is None or int(result.get("epoch", 0) or 0) >= self.epochs
        if self.stage == "final":  # the seeds' mean so far, never the best seed's value
            if trial is None or not (finished or ran) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return False
            new = self.values.get(trial.trial_id) != float(v)
            self.values[trial.trial_id] = float(v)
            return new
        if self.epochs is not None and int(result.get("epoch", 0) or 0) < self.epochs:
            return False  # a trial still running (or pruned): not comparable with a finished one
        if isinstance(v, (int, float)) and math.isfinite(v) and not result.get("diverged"):
            if self.best is None or (v > self.best if self.mode == "max" else v < self.best):
                self.best = float(v)
                return True
        return False

    def _count(self, trial, result: dict) -> None:
        key = "steps" if self.stage == "range" else "epoch"
        v = result.get(key)
        cost = result.get("cost_fte")  # a range test's own measured cost (stage 1 reports it), in FTE
        if self.stage == "range" and self.fte_unit and isinstance(cost, (int, float)) and math.isfinite(cost):
            v = cost / self.fte_unit
        if isinstance(v, (int, float)) and math.isfinite(v):
            self.units[trial.trial_id] = max(self.units.get(trial.trial_id, 0.0), float(v))

    @property
    def fte_spent(self) -> float | None:
        """FTE spent so far by the experiment (earlier stages + this one's trials)."""
        if self.fte_unit is None:
            return None
        return self.fte_offset + self.fte_unit * sum(self.units.values())

    def _eta(self) -> float | None:
        """Seconds left in this stage: by trials (elapsed / done x left), or by FTE against the budget."""
        elapsed = time.monotonic() - self._stage_t0
        if self.total is not None and 0 < self.done < self.total:
            return elapsed / self.done * (self.total - self.done)
        spent, start = self.fte_spent, getattr(self, "_fte_t0", None)
        if self.total is None and self.fte_budget is not None and spent is not None and start is not None:
            if spent > start and spent < self.fte_budget:
                return elapsed / (spent - start) * (self.fte_budget - spent)
        return None

    def _fields(self) -> dict[str, str]:
        n_rec = len(getattr(self, "recovered", ()))
        rec = f", {n_rec} resumed from an older checkpoint" if n_rec else ""
        total = self.total if self.total is not None else "?"
        f = {"done": f"{self.done}/{total} done", "running": f"{self.running} running"}
        if self.stage == "search":
            f["extra"] = f"({self.pruned} pruned, {self.errored} errored{rec})"
        elif self.errored or n_rec:
            f["extra"] = f"({self.errored} errored{rec})"
        if self.stage == "final" and self.values:
            vals = list(self.values.values())
            of = f" of {self.total}" if self.total is not None else ""  # "1 of 2": the mean is not final yet
            f["best"] = f"mean {self.metric} {sum(vals) / len(vals):.4f} over {len(vals)}{of} seed(s)"
        elif self.best is not None and self.metric:
            f["best"] = f"best {self.metric} {self.best:.4f}"
        spent = self.fte_spent
        if spent is not None:
            f["fte"] = f"FTE {spent:.2f}/{self.fte_budget:g}" if self.fte_budget is not None else f"FTE {spent:.2f}"
        f["time"] = _fmt_s(time.monotonic() - _clock())
        eta = self._eta()
        if eta is not None:
            f["eta"] = f"ETA {_fmt_s(eta)}"
        return f

    def _print(self, *, force: bool = False, gap: float = INTERVAL_S) -> None:
        f = self._fields()
        if self.quiet:
            return
        live = _ACTIVE.get("live")
        if live is not None:
            live.show(self.stage, self.done, self.total, f)
            return
        head = f["done"] + (f" {f['extra']}" if "extra" in f else "")
        line = " | ".join([f"[{self.stage}] {head}", f["running"], *(f[k] for k in ("best", "fte", "time", "eta")
                                                                      if k in f)])
        key = line.rsplit(" | ", 2 if "eta" in f else 1)[0]  # unchanged but for the clock: not news
        now = time.monotonic()
        force = force or f.get("best") != getattr(self, "_shown_best", None)  # a new best is always news
        if key != self._last_line and (force or now - self._last_print >= gap):
            print(line, file=sys.stderr, flush=True)
            self._last_line, self._last_print, self._shown_best = key, now, f.get("best")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._recount(trials, started=trial)
        # the first wave (nothing finished yet) shows each start, so the line says how many run at once:
        # at most max_concurrent lines more per stage
        self._print(force=self.done == 0)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        note = result.get("checkpoint_recovered")
        recovered = getattr(self, "recovered", None)
        if note and recovered is not None and trial.trial_id not in recovered:
            recovered.add(trial.trial_id)
            if not self.quiet:
                print(f"[{self.stage}] trial {trial.trial_id}: damaged checkpoint: {note}", file=sys.stderr, flush=True)
            self._print()
        before = self.fte_spent
        self._count(trial, result)
        # a line per new best, and per half FTE spent (a 200-epoch trial reports 200 times)
        if (self.metric and self._offer(result, trial)) or (
                self.stage != "range"  # a range test reports once, as it completes: that line follows
                and before is not None and math.floor(2 * self.fte_spent) > math.floor(2 * before)):
            self._print()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._count(trial, trial.last_result or {})
        self._recount(trials, finished=trial)
        self._offer(trial.last_result or {}, trial, finished=True)
        # the stage's end always shows; "0 running" alone is not one: the halving search starts its next
        # schedule only after one completes (a piped default run printed all 22 completions under load)
        self._print(force=self.total is not None and self.done >= self.total, gap=COMPLETION_GAP_S)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._recount(trials, finished=trial, errored=True)
        self._print_error(trial)
        self._print(force=True)

    def _print_error(self, trial) -> None:
        """The failure's reason, one line, the first time it is seen (12 identical range-test failures: one line)."""
        try:
            line = error_line(trial.get_pickled_error() or trial.get_error())
        except Exception as e:  # the error file could not be read back: say that much
            line = f"(its error could not be read: {type(e).__name__}: {e})"
        line = line or "unknown error"
        if line not in self._errors_shown and not self.quiet:
            self._errors_shown.add(line)
            print(f"[{self.stage}] trial {trial.trial_id} failed: {line}", file=sys.stderr, flush=True)


class _LiveBlock:
    """One block per stage on a terminal, updated in place (rich): a bar, the counts, best, FTE, time, ETA.
    Kept in ``_ACTIVE``, not on the callback, which Tune pickles with the tuner for --resume."""

    def __init__(self):
        from rich.console import Console
        from rich.live import Live

        self._live = Live(console=Console(stderr=True), auto_refresh=False, transient=False)
        self._live.start()

    def show(self, stage: str, done: int, total: int | None, f: dict[str, str]) -> None:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        grid = Table.grid(padding=(0, 2))  # Text, not markup: "[search]" would read as a style tag
        grid.add_row(Text(f"[{stage}]", style="bold"), ProgressBar(total=total, completed=done, width=30),
                     Text(f["done"]), Text(f["running"]), Text(f.get("extra", "")))
        grid.add_row(Text(""), Text(f.get("best", "")), Text(f.get("fte", "")), Text(f"elapsed {f['time']}"),
                     Text(f.get("eta", "")))
        self._live.update(Group(grid), refresh=True)

    def stop(self) -> None:
        self._live.stop()


def __getattr__(name: str) -> Any:
    # ``StageProgress`` = ProgressLines + Tune's Callback base, made when first asked for (Ray loads then)
    # and kept as a module attribute, so Tune can pickle it by name with the tuner's state for --resume.
    if name == "StageProgress":
        from ray.tune import Callback

        cls = type("StageProgress", (ProgressLines, Callback), {"__module__": __name__, "__doc__": ProgressLines.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
