"""Live progress of a stage on stderr, one line per change, and a failed trial's reason in one line.

``StageProgress`` is a Ray Tune callback: ``[search] 7/16 done (2 pruned, 0 errored) | 2 running | best
val/acc_tail 0.986 | FTE 5.2/8 | 31s``. Its logic lives in ``ProgressLines`` (plain Python: the tests drive
it with stand-in trials); the class Tune gets adds Tune's ``Callback`` base, built on first use so that
importing this module does not load Ray. TensorBoard's session ends are not done here
(``trainables.TensorBoardSessions``).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from .lifecycle import GUARD
from .summaries import is_pruned

_ACTIVE: dict[str, Any] = {}  # the progress callback of the stage running now (the restored one on --resume)


def active_progress() -> ProgressLines | None:
    return _ACTIVE.get("progress")


def error_line(err: Any) -> str | None:
    """Why a trial failed, in one line: the exception raised in the trial (``ConfigError: task.dataset: ...``),
    not Ray's wrapping of it (``RayTaskError(...)`` with the worker's traceback). None for no error."""
    if err is None:
        return None
    for _ in range(5):  # RayTaskError / TuneError -> the exception the trial raised
        cause = getattr(err, "cause", None)
        if cause is None or cause is err:
            break
        err = cause
    if isinstance(err, str):  # Tune's text trace: its last line names the exception
        lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else "unknown error"
    else:
        name = type(err).__name__
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        text = f"{name}: {first}" if first else name
    return text if len(text) <= 300 else text[:297] + "..."


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
        self._last_line = ""
        self._errors_shown: set[str] = set()
        self._t0 = time.monotonic()

    def setup(self, **info):
        # Called at the start of every fit, a restored one too (Tune unpickles this callback with the
        # tuner, old clock included): restart the clock; counts are rebuilt from the trials.
        self._t0 = time.monotonic()
        self._last_line = ""
        self.recovered = set()
        _ACTIVE["progress"] = self

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
        self.pruned = sum(st == "TERMINATED" and is_pruned(t.last_result or {}, (t.config or {}).get("epochs", self.epochs))
                          for t, st in states)
        self.running = sum(st == "RUNNING" for t, st in states if t is not finished)
        for t, st in states:
            if st == "TERMINATED" and self.metric:
                self._offer(t.last_result or {})

    def _offer(self, result: dict) -> bool:
        v = result.get(self.metric)
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

    def _print(self) -> None:
        best = f" | best {self.metric} {self.best:.4f}" if self.best is not None and self.metric else ""
        n_rec = len(getattr(self, "recovered", ()))
        rec = f", {n_rec} resumed from an older checkpoint" if n_rec else ""
        extra = f" ({self.pruned} pruned, {self.errored} errored{rec})" if self.stage == "search" else (
            f" ({self.errored} errored{rec})" if self.errored or n_rec else "")
        spent = self.fte_spent
        fte = "" if spent is None else (f" | FTE {spent:.2f}/{self.fte_budget:g}" if self.fte_budget is not None
                                        else f" | FTE {spent:.2f}")
        total = self.total if self.total is not None else "?"
        line = (f"[{self.stage}] {self.done}/{total} done{extra} | {self.running} running{best}{fte} "
                f"| {time.monotonic() - self._t0:.0f}s")
        if line != self._last_line and not self.quiet:
            print(line, file=sys.stderr, flush=True)
            self._last_line = line

    def on_trial_start(self, iteration, trials, trial, **info):
        self._recount(trials, started=trial)
        self._print()

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
        if (self.metric and self._offer(result)) or (
                self.stage != "range"  # a range test reports once, as it completes: that line follows
                and before is not None and math.floor(2 * self.fte_spent) > math.floor(2 * before)):
            self._print()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._count(trial, trial.last_result or {})
        self._recount(trials, finished=trial)
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._recount(trials, finished=trial, errored=True)
        self._print_error(trial)
        self._print()

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


def __getattr__(name: str) -> Any:
    # ``StageProgress`` = ProgressLines + Tune's Callback base, made when first asked for (Ray loads then)
    # and kept as a module attribute, so Tune can pickle it by name with the tuner's state for --resume.
    if name == "StageProgress":
        from ray.tune import Callback

        cls = type("StageProgress", (ProgressLines, Callback), {"__module__": __name__, "__doc__": ProgressLines.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
