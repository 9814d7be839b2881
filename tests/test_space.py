"""Search-space resolution for stage 2: relative ranges, Smith's recipe point, Optuna distributions."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sctune.space import Anchors, load_space, recipe_point, resolve, to_optuna

REPO = Path(__file__).resolve().parent.parent
SPEC = load_space(REPO / "search_spaces" / "digits.yaml")


def test_relative_ranges_scale_with_the_range_test_anchors():
    dists, constants = resolve(SPEC, Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=1e-4))
    assert constants == {}
    assert (dists["max_lr"].low, dists["max_lr"].high) == pytest.approx((0.5, 2.0))  # [max/4, max]
    assert (dists["weight_decay"].low, dists["weight_decay"].high) == pytest.approx((1e-6, 1e-4))
    assert dists["max_lr"].log and dists["max_lr"].scale is None
    assert dists["dropout"] == SPEC.space["dropout"]  # absolute ranges pass through


def test_zero_wd_prior_searches_below_the_smallest_tested_weight_decay():
    dists, constants = resolve(SPEC, Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=0.0))
    smallest = min(w for w in SPEC.range_test.weight_decays if w > 0)
    assert "weight_decay" not in constants
    assert dists["weight_decay"].high == pytest.approx(smallest)
    assert dists["weight_decay"].low == pytest.approx(0.01 * smallest)


def test_zero_wd_prior_with_no_positive_weight_decay_tested_collapses_to_zero():
    spec = load_space(REPO / "search_spaces" / "digits.yaml")
    spec = type(spec)(spec.path, spec.base, spec.range_test.replace(weight_decays=(0.0,)), spec.search,
                      spec.final, spec.space, spec.raw)
    dists, constants = resolve(spec, Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=0.0))
    assert constants == {"weight_decay": 0.0} and "weight_decay" not in dists


def test_recipe_point_is_smith_clipped_into_the_space():
    anchors = Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=1e-4)
    dists, _ = resolve(SPEC, anchors)
    point = recipe_point(dists, anchors, divisor=4.0)
    assert point["max_lr"] == pytest.approx(2.0)  # the range test's max bound
    assert point["div_factor"] == pytest.approx(4.0)
    assert point["cycle_frac"] == pytest.approx(0.9)
    assert point["annihilation_factor"] == pytest.approx(1000.0)
    assert point["max_momentum"] == pytest.approx(0.95) and point["min_momentum"] == pytest.approx(0.85)
    assert point["weight_decay"] == pytest.approx(1e-4) and point["dropout"] == 0.0
    for name, d in dists.items():
        assert d.low <= point[name] <= d.high, name


def test_optuna_distributions_match_the_space():
    dists, _ = resolve(SPEC, Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=1e-4))
    od = to_optuna(dists)
    assert isinstance(od["max_lr"], optuna.distributions.FloatDistribution) and od["max_lr"].log
    assert (od["cycle_frac"].low, od["cycle_frac"].high) == (0.75, 0.95) and not od["cycle_frac"].log
