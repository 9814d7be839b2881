"""Stage 2's multi-fidelity search: successive halving where the fidelity is the length of a COMPLETE
one-cycle schedule (pure promotion math; no Ray, no Optuna).

Super-convergence's premise is that a short one-cycle training is already a good training (1708.07120:
CIFAR-10 ResNet-56 at 10k iterations matches the 80k of a step schedule), while a one-cycle run cut short
stops before its LR annealed and says little about where it would end (ASHA's rungs inside a cycle: on
recorded MNIST-1D histories an early rung pruned the eventual winner in ~40% of trial orders,
``tests/test_early_stopping.py``). So every rung trains a complete schedule (warm-up, anneal,
annihilation) over ``rung_epochs`` epochs: 1/8, 1/4, 1/2, then all of the full training's epochs.

Promotion is asynchronous successive halving (Li et al. 2020, the rule Ray's ASHA uses, applied to
complete schedules): a configuration is promoted to the next length as soon as it ranks in the top
1/``eta`` of the results completed at its rung; otherwise a new configuration starts at the shortest
length. With ``eta`` 2 and lengths that double, every rung costs the same compute (8 x 1/8 = 4 x 1/4 = ...),
and no worker ever waits for a rung to fill. The budget is counted in epochs: a trial at 1/8 costs 1/8 of
a full-training equivalent. The recommendation is the best configuration at the longest length reached.

Two choices come from benchmark 1. Smith's recipe point is an *anchor*: it trains at the full length
first, never at a short rung, because short cycles under-rate large LRs (1a) and a ladder that drops the
recipe can end below it (1b: MNIST-1D at 8 FTE). And the answer is decided at the full length among
several: a ladder is sized so its full length holds at least ``TOP_CONFIGS`` promoted configurations
beside the anchor (``rungs_for_budget``), since one short ranking agrees with the full length no better
than a second seed does (1a), while the full length's own validation score is what picks the answer.

``benchmarks/fidelity_rank.py`` measured how far a short complete cycle ranks configurations as the full
length does (``benchmarks/results/fidelity_rank.json``, BENCHMARKS.md section 1); ``RUNG_FRACTIONS`` is set
from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# the lengths of the rungs' complete schedules, as fractions of the full training (issue 18: 1/8 .. 1)
RUNG_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
ETA = 2  # keep the top half: with lengths that double, each rung then costs the same compute
TOP_CONFIGS = 2  # a ladder's full length holds at least this many configurations (beside the anchor)


def rung_epochs(epochs: int, fractions: Sequence[float] = RUNG_FRACTIONS) -> tuple[int, ...]:
    """Epochs of each rung's complete schedule: ``ceil(fraction x epochs)``, at least 1, strictly
    increasing (lengths that round to the same epoch count are one rung), the last the full training."""
    out: list[int] = []
    for f in fractions:
        e = max(1, min(epochs, math.ceil(f * epochs - 1e-9)))
        if not out or e > out[-1]:
            out.append(e)
    if out[-1] != epochs:
        out.append(epochs)
    return tuple(out)


def rungs_for_budget(rungs: Sequence[int], budget_epochs: float | None,
                     top: int = TOP_CONFIGS) -> tuple[int, ...]:
    """The rungs a budget can carry: with lengths that double and ``eta`` 2 every rung costs the same, so a
    ladder over ``k`` rungs that ends with ``top`` configurations at the full length costs about ``k x top``
    full trainings. With ``B`` FTE the ladder uses the longest ``floor(B / top)`` rungs, at least one (3 FTE:
    three full trainings, no halving; 4 FTE: four at 1/2, the better two in full)."""
    rungs = tuple(rungs)
    if budget_epochs is None:
        return rungs
    k = max(1, min(len(rungs), math.floor(budget_epochs / (rungs[-1] * top) + 1e-9)))
    return rungs[len(rungs) - k:]


@dataclass
class Suggestion:
    """What to run next: configuration ``cid`` (``config`` its parameters; None: a new one is to be drawn)
    at rung ``rung``, a complete schedule of ``epochs`` epochs."""

    cid: int | None
    rung: int
    epochs: int


@dataclass
class Promotion:
    """Asynchronous successive halving over complete schedules, with a compute budget in epochs.

    ``suggest(trial_id)`` -> a ``Suggestion``, ``None`` (wait: running trials may free a promotion) or
    ``"finished"``; ``add_config(cid_params)`` registers a new configuration drawn for a rung-0 suggestion;
    ``complete(trial_id, score, epochs_run)`` records a trial's result (NaN: failed or diverged, never
    promoted). ``mode``: "max" or "min" (the score's direction).
    """

    rungs: tuple[int, ...]
    eta: int = ETA
    mode: str = "max"
    budget_epochs: float | None = None
    max_configs: int | None = None  # new configurations drawn at most (None: the budget decides)
    configs: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[int, float]] = field(default_factory=list)  # per rung: config id -> score
    running: dict[str, tuple[int, int]] = field(default_factory=dict)  # trial id -> (config id, rung)
    started: list[set[int]] = field(default_factory=list)  # per rung: config ids started there
    spent: float = 0.0  # epochs run by finished trials
    committed: float = 0.0  # epochs the running trials may still run (their full lengths)
    trial_of: dict[str, tuple[int, int]] = field(default_factory=dict)  # every trial id -> (config id, rung)
    anchors: list[int] = field(default_factory=list)  # config ids trained at the full length directly
    _drawing: set[str] = field(default_factory=set)  # trial ids suggested a new configuration, not yet drawn

    def __post_init__(self):
        if not self.scores:
            self.scores = [{} for _ in self.rungs]
            self.started = [set() for _ in self.rungs]

    # -- the rule ------------------------------------------------------------------------------------

    def _ranked(self, rung: int) -> list[int]:
        done = [(c, s) for c, s in self.scores[rung].items() if math.isfinite(s)]
        sign = -1.0 if self.mode == "max" else 1.0
        return [c for c, _ in sorted(done, key=lambda cs: (sign * cs[1], cs[0]))]

    @property
    def in_flight(self) -> int:
        """Trials suggested and not finished yet."""
        return len(self.running) + len(self._drawing)

    def planned(self, n: int) -> float:
        """Epochs the anchors and a ladder from ``n`` configurations cost: ``n // eta^r`` at rung ``r``, at
        least one (the best goes on to the full length)."""
        total, m = len(self.anchors) * float(self.rungs[-1]), n
        for e in self.rungs if n else ():
            total += max(1, m) * e
            m //= self.eta
        return total

    def can_draw(self) -> bool:
        """Whether a new configuration may start: one more still leaves room to promote the best to the end."""
        n = len(self.configs) - len(self.anchors) + len(self._drawing)
        return ((self.max_configs is None or n < self.max_configs)
                and (self.budget_epochs is None or self.planned(n + 1) <= self.budget_epochs + 1e-9))

    def promotable(self) -> tuple[int, int] | None:
        """(config id, next rung): the best configuration, from the highest rung down, that ranks in the top
        1/eta of its rung's completed results and has not started at the next rung yet, while fewer than
        1/eta of the rung's results went on. Once no new
        configuration may be drawn, the best of a rung goes on even where the rung holds fewer than eta."""
        last_call = not self.can_draw()
        for r in range(len(self.rungs) - 2, -1, -1):
            ranked = self._ranked(r)
            k = len(self.scores[r]) // self.eta  # failed results count in the rung's size, never promote
            if last_call:
                k = max(k, 1)
            # at most k go on from this rung in all: a configuration promoted early and overtaken later keeps
            # its place, so the ladder costs no more than planned (``planned``) and the budget still reaches
            # the full length
            if len(self.started[r + 1].difference(self.anchors)) >= k:
                continue
            for c in ranked[:k]:
                if c not in self.started[r + 1]:
                    return c, r + 1
        return None

    def _fits(self, epochs: int) -> bool:
        return self.budget_epochs is None or self.spent + self.committed + epochs <= self.budget_epochs + 1e-9

    def suggest(self, trial_id: str) -> Suggestion | str | None:
        if trial_id in self.trial_of:  # asked again for a trial already placed (a restored searcher)
            c, r = self.trial_of[trial_id]
            return Suggestion(c, r, self.rungs[r])
        top = len(self.rungs) - 1
        anchor = next((c for c in self.anchors if c not in self.started[top]), None)
        if anchor is not None:  # the anchors first: at the full length, never at a short rung
            return self._start(trial_id, anchor, top) if self._fits(self.rungs[top]) else (
                None if self.running else "finished")
        promo = self.promotable()
        if promo is not None:
            c, r = promo
            if self._fits(self.rungs[r]):
                return self._start(trial_id, c, r)
        elif self.can_draw() and self._fits(self.rungs[0]):
            self._drawing.add(trial_id)
            return self._start(trial_id, None, 0)
        # nothing fits now: trials still running may make room (a pruned one) or a promotion
        return None if self.running else "finished"

    def _start(self, trial_id: str, cid: int | None, rung: int) -> Suggestion:
        if cid is not None:
            self.running[trial_id] = (cid, rung)
            self.trial_of[trial_id] = (cid, rung)
            self.started[rung].add(cid)
        self.committed += self.rungs[rung]
        return Suggestion(cid, rung, self.rungs[rung])

    def add_anchor(self, params: dict[str, Any]) -> int:
        """A configuration to train at the full length before any other (Smith's recipe point): its id. It
        counts in the budget first; the ladder gets what is left."""
        cid = len(self.configs)
        self.configs.append(dict(params))
        self.anchors.append(cid)
        return cid

    def add_config(self, trial_id: str, params: dict[str, Any]) -> int:
        """The parameters drawn for ``trial_id``'s rung-0 suggestion: its configuration id."""
        self._drawing.discard(trial_id)
        cid = len(self.configs)
        self.configs.append(dict(params))
        self.running[trial_id] = (cid, 0)
        self.trial_of[trial_id] = (cid, 0)
        self.started[0].add(cid)
        return cid

    def complete(self, trial_id: str, score: float | None, epochs_run: float) -> None:
        where = self.running.pop(trial_id, None)
        if where is None:
            return
        c, r = where
        self.committed -= self.rungs[r]
        self.spent += float(epochs_run)
        # a schedule that did not run to its end (stopped, failed, diverged) has no comparable score
        ok = score is not None and math.isfinite(score) and epochs_run >= self.rungs[r]
        self.scores[r][c] = float(score) if ok else math.nan

    # -- the answer ----------------------------------------------------------------------------------

    def incumbent(self) -> tuple[int, int, float] | None:
        """(config id, rung, score): the best configuration at the longest length that has a result."""
        for r in range(len(self.rungs) - 1, -1, -1):
            ranked = self._ranked(r)
            if ranked:
                return ranked[0], r, self.scores[r][ranked[0]]
        return None
