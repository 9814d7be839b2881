"""sctune.service.fidelity: successive halving over complete schedules, the promotion math alone (no Ray, no Optuna)."""

from __future__ import annotations

import math
import random

import pytest

from sctune.service.fidelity import Promotion, Suggestion, rung_epochs, rungs_for_budget


def test_rungs_are_complete_schedules_of_an_eighth_to_all_of_the_training():
    assert rung_epochs(20) == (3, 5, 10, 20)  # MNIST-1D: ceil(2.5) = 3
    assert rung_epochs(12) == (2, 3, 6, 12)  # digits
    assert rung_epochs(200) == (25, 50, 100, 200)
    assert rung_epochs(4) == (1, 2, 4)  # 1/8 and 1/4 of 4 epochs are both 1 epoch: one rung
    assert rung_epochs(1) == (1,)
    assert rung_epochs(10, (0.5,)) == (5, 10)  # the full length is always the last rung


def _run(books: Promotion, score_of, *, concurrency: int = 1, limit: int = 1000) -> list[tuple[int, int]]:
    """Drive the books as Tune would: start trials while suggestions come, finish the oldest running one."""
    ran: list[tuple[int, int]] = []
    running: list[tuple[str, int, int]] = []
    n = 0
    while n < limit:
        while len(running) < concurrency:
            tid = f"t{n}"
            s = books.suggest(tid)
            if not isinstance(s, Suggestion):
                break
            n += 1
            cid = s.cid if s.cid is not None else books.add_config(tid, {"x": len(books.configs)})
            running.append((tid, cid, s.rung))
        if not running:
            assert books.suggest("probe") == "finished"
            return ran
        tid, cid, rung = running.pop(0)
        books.complete(tid, score_of(cid, rung), books.rungs[rung])
        ran.append((cid, rung))
    raise AssertionError("the search never finished")


def test_the_budget_is_spent_as_complete_schedules_and_never_exceeded():
    rungs = rung_epochs(16)  # 2, 4, 8, 16: every rung of 8 -> 4 -> 2 -> 1 configs costs 16 epochs
    for budget in (16, 40, 64, 100):
        for concurrency in (1, 2, 3):
            books = Promotion(rungs_for_budget(rungs, budget), budget_epochs=budget)
            ran = _run(books, lambda c, r: random.Random(c).random(), concurrency=concurrency)
            spent = sum(books.rungs[r] for _, r in ran)
            assert spent == books.spent <= budget
            assert books.committed == 0
            # every ladder ends at the full length: the best configuration is trained in full
            assert any(books.rungs[r] == rungs[-1] for _, r in ran)
            assert books.rungs[books.incumbent()[1]] == rungs[-1]


def test_only_the_top_half_of_a_rung_is_promoted_and_the_full_length_winner_is_the_answer():
    rungs = (2, 4, 8, 16)
    quality = {c: random.Random(100 + c).random() for c in range(200)}
    books = Promotion(rungs, budget_epochs=64)  # one bracket's worth: 8 x 2 + 4 x 4 + 2 x 8 + 1 x 16
    assert books.planned(8) == 64 and books.planned(9) > 64
    ran = _run(books, lambda c, r: quality[c])
    for r in range(1, len(rungs)):
        promoted = {c for c, rr in ran if rr == r}
        below = sorted(books.scores[r - 1], key=lambda c: -books.scores[r - 1][c])
        # every promoted configuration was in the top half of the rung below when it was promoted
        assert promoted <= set(below[: max(1, len(below) // 2) + len(promoted)])
        assert len(promoted) <= len(books.scores[r - 1]) // 2
    assert any(r == len(rungs) - 1 for _, r in ran)  # the budget reached the full length
    cid, rung, score = books.incumbent()
    assert rung == len(rungs) - 1 and score == max(books.scores[rung].values())
    # with a ranking the short schedules share, the best configuration drawn is the one trained in full
    assert cid == max(books.scores[0], key=lambda c: quality[c])


def test_failed_and_unfinished_schedules_are_never_promoted_but_count_in_the_rung():
    books = Promotion((1, 2), budget_epochs=100, max_configs=4)
    for i in range(4):
        s = books.suggest(f"a{i}")
        assert s.rung == 0 and s.cid is None
        books.add_config(f"a{i}", {"i": i})
    books.complete("a0", math.nan, 1)  # diverged
    books.complete("a1", 0.9, 0)  # stopped before its schedule ended: not comparable
    assert books.promotable() is None  # 2 results: the top 1 is a failure
    books.complete("a2", 0.5, 1)
    books.complete("a3", 0.4, 1)
    assert books.promotable() == (2, 1)  # 4 results, top 2 of the finite ones: config 2 first
    s = books.suggest("b0")
    assert (s.cid, s.rung, s.epochs) == (2, 1, 2)
    assert books.suggest("b0") == s  # asked again (a restored searcher): the same placement
    assert books.promotable() == (3, 1)
    assert books.incumbent()[:2] == (2, 0)  # nothing finished at the full length yet
    books.complete("b0", 0.7, 2)
    assert books.incumbent() == (2, 1, 0.7)


def test_it_waits_for_running_trials_rather_than_start_configurations_that_cannot_be_promoted():
    books = Promotion((2, 4), budget_epochs=8)
    a, b = books.suggest("a"), books.suggest("b")
    books.add_config("a", {}), books.add_config("b", {})
    assert (a.rung, b.rung) == (0, 0)
    # 4 committed + 2 would fit, but a third configuration would leave no room to train the best in full
    assert books.suggest("c") is None
    books.complete("a", 0.8, 2)
    books.complete("b", 0.6, 2)
    s = books.suggest("c")
    assert (s.cid, s.rung) == (0, 1)
    books.complete("c", 0.9, 4)
    assert books.suggest("d") == "finished" and books.spent == 8


@pytest.mark.parametrize("mode", ["max", "min"])
def test_the_score_direction_decides_what_is_best(mode):
    books = Promotion((1, 2), mode=mode, budget_epochs=100, max_configs=2)
    for i, score in enumerate((0.2, 0.8)):
        books.suggest(f"t{i}")
        books.add_config(f"t{i}", {})
        books.complete(f"t{i}", score, 1)
    assert books.promotable() == ((1 if mode == "max" else 0), 1)


def test_a_small_budget_uses_only_the_longest_rungs():
    rungs = (2, 4, 8, 16)
    assert rungs_for_budget(rungs, None) == rungs
    assert rungs_for_budget(rungs, 16) == (16,)  # 1 FTE: one full training
    assert rungs_for_budget(rungs, 40) == (16,)  # 2.5 FTE: two full trainings, no halving
    assert rungs_for_budget(rungs, 64) == (8, 16)  # 4 FTE: four halves, the better two in full
    assert rungs_for_budget(rungs, 128) == rungs  # 8 FTE: 16 at 1/8 -> 8 -> 4 -> 2 in full
    assert rungs_for_budget(rungs, 64, top=1) == rungs  # one configuration in full: all four rungs
    assert rungs_for_budget(rungs, 8) == (16,)  # less than one training: Promotion then starts nothing
    assert Promotion((16,), budget_epochs=8).suggest("t") == "finished"


def test_a_configuration_overtaken_after_its_promotion_does_not_open_an_extra_place():
    books = Promotion((1, 2, 4), budget_epochs=1000, max_configs=4)
    ids = []
    for i in range(4):
        books.suggest(f"t{i}")
        ids.append(books.add_config(f"t{i}", {}))
    books.complete("t0", 0.9, 1)
    books.complete("t1", 0.8, 1)
    s = books.suggest("p0")
    assert (s.cid, s.rung) == (0, 1)  # the top half of two results
    books.complete("t2", 0.95, 1)
    books.complete("t3", 0.97, 1)  # config 0 is now third of four
    s = books.suggest("p1")
    assert (s.cid, s.rung) == (3, 1)  # the best takes the second place; config 2 gets none
    assert books.promotable() is None
    assert len(books.started[1]) == 4 // 2


def test_the_anchor_trains_first_at_the_full_length_and_the_ladder_gets_the_rest():
    """Smith's recipe point is trained in full before any other and never at a short rung; the ladder is
    planned with what is left, and the answer is the best at the full length, anchor included."""
    rungs = (2, 4, 8, 16)
    budget = 16 * 5  # 5 FTE: the anchor, then a ladder of 4 FTE over the two longest rungs
    books = Promotion(rungs_for_budget(rungs, budget - 16), budget_epochs=budget)
    assert books.rungs == (8, 16)
    anchor = books.add_anchor({"x": -1})
    first = books.suggest("a")
    assert first == Suggestion(anchor, 1, 16)
    books.complete("a", 0.5, 16)
    ran = _run(books, lambda c, r: 1 + 0.1 * c + 0.01 * r)  # later configurations score higher than the anchor
    assert (anchor, 0) not in ran  # never at a short rung
    assert books.spent <= budget
    top = [c for c, r in ran if r == 1]
    assert len(top) >= 2  # the full length holds two promoted configurations beside the anchor
    assert books.incumbent()[0] == max(top)
    # an anchor that scores best stays the answer
    books2 = Promotion((8, 16), budget_epochs=budget)
    a2 = books2.add_anchor({})
    books2.suggest("a")
    books2.complete("a", 9.0, 16)
    _run(books2, lambda c, r: 0.1 * c)
    assert books2.incumbent()[:2] == (a2, 1)


def test_an_anchor_that_does_not_fit_the_budget_finishes_the_search():
    books = Promotion((16,), budget_epochs=8)
    books.add_anchor({})
    assert books.suggest("t") == "finished"
