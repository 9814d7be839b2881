"""Benchmark 1's statistics (``benchmarks/search_efficiency.py``, ``benchmarks/summarize.py``): a time to target
counts the repeats that never reached it, arms are compared repeat by repeat, and a partial rerun keeps what
it does not rerun. Pure functions on small made-up inputs: no training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import stats  # noqa: E402
from benchmarks.search_efficiency import _rerun_budgets, censored, paired  # noqa: E402
from benchmarks.summarize import to_target  # noqa: E402


def test_time_to_target_counts_the_repeats_that_never_reached_it():
    once = censored(stats([1.0, None, None]))  # reached in 1 of 3 repeats, fast
    always = censored(stats([3.0, 4.0, 5.0]))
    assert once["median"] == 1.0  # over the repeats that reached it: looks best
    assert once["median_all"] is None and always["median_all"] == 4.0  # over all: never, in the median repeat
    assert censored(stats([2.0, 6.0, None]))["median_all"] == 6.0
    assert censored(stats([2.0, 4.0, None, None]))["median_all"] is None  # even count: the middle two
    assert censored(stats([2.0, 4.0, 6.0, None]))["median_all"] == 5.0
    assert censored(stats([]))["median_all"] is None
    assert to_target(once) == "never [1.0–1.0]" and to_target(always) == "4.0 [3.0–5.0]"
    assert to_target(censored(stats([None, None]))) == "never"


def test_paired_differences_follow_the_repeats():
    p = paired([0.97, 0.96, None, 0.98], [0.96, 0.96, 0.99, 0.99])
    assert p["n"] == 3 and (p["wins"], p["ties"], p["losses"]) == (1, 1, 1)  # the missing repeat is left out
    assert p["mean"] == pytest.approx(0.0)
    lo, hi = p["ci95"]
    assert lo < 0 < hi
    # the same values as unpaired medians would tie; paired, one arm is ahead in every repeat
    q = paired([0.950, 0.960, 0.970], [0.949, 0.959, 0.969])
    assert q["wins"] == 3 and q["ci95"][0] > 0
    assert paired([0.9], [0.8])["ci95"] is None and paired([None], [0.8])["mean"] is None


def test_a_partial_rerun_drops_only_the_budgets_it_runs_again():
    runs = [{"rep": 0, "by_budget": {"2": {"events": [1]}, "8": {"events": [2]}, "16": {"events": [3]}}}]
    kept = _rerun_budgets(runs, [8.0])
    assert set(kept[0]["by_budget"]) == {"2", "16"} and kept[0]["rep"] == 0
    assert set(runs[0]["by_budget"]) == {"2", "8", "16"}  # the earlier file's runs are not touched
    assert kept[0]["by_budget"]["16"] == {"events": [3]}
