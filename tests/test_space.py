"""Search-space resolution for stage 2: relative ranges, Smith's recipe point, Optuna distributions."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sctune.core.config import OneCycleConfig, RegularizationConfig
from sctune.service.plan import RECIPE_DIV_FACTOR, Anchors, optuna_space, recipe_point, resolve
from sctune.service.space import load_space

REPO = Path(__file__).resolve().parent.parent
SPEC = load_space(REPO / "search_spaces" / "digits.yaml")


def test_relative_ranges_scale_with_the_range_test_anchors():
    dists, constants = resolve(SPEC, Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=1e-4))
    assert constants == {}
    assert (dists["max_lr"].low, dists["max_lr"].high) == pytest.approx((0.2, 2.0))  # [max/10, max]
    assert (dists["weight_decay"].low, dists["weight_decay"].high) == pytest.approx((1e-7, 1e-3))
    assert dists["max_lr"].log and dists["max_lr"].scale is None
    assert dists["dropout"] == SPEC.space["dropout"]  # absolute ranges pass through


def test_zero_wd_prior_searches_around_the_smallest_tested_weight_decay():
    dists, constants = resolve(SPEC, Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=0.0))
    smallest = min(w for w in SPEC.range_test.weight_decays if w > 0)
    assert "weight_decay" not in constants
    assert dists["weight_decay"].high == pytest.approx(10 * smallest)
    assert dists["weight_decay"].low == pytest.approx(1e-3 * smallest)


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
    # one cycle starts at max/10 (Smith's 0.08 -> 0.8), not at CLR's max/3..4 ...
    assert point["div_factor"] == pytest.approx(RECIPE_DIV_FACTOR) and dists["div_factor"].low < 4.0 < RECIPE_DIV_FACTOR
    # ... unless the range test's divisor asks for a lower start
    assert recipe_point(dists, anchors, divisor=15.0)["div_factor"] == pytest.approx(15.0)
    # every other searched value is the config's default (the recipe, METHOD.md 3; large LRs regularize:
    # no dropout), where the space holds it
    defaults = OneCycleConfig().to_dict() | RegularizationConfig().to_dict()
    for name in ("cycle_frac", "annihilation_factor", "max_momentum", "min_momentum", "dropout"):
        assert point[name] == pytest.approx(defaults[name]), name
    assert point["weight_decay"] == pytest.approx(1e-4)  # the prior stage 1 chose
    for name, d in dists.items():
        assert d.low <= point[name] <= d.high, name
    # where stage 1 found no super-convergence, the first point starts inside the band, the range unchanged,
    # and regularization is not reduced: the LR cannot stand in for it (dropout at its range's middle)
    inside = Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=1e-4, recipe_max_lr=0.9, sc_likely=False)
    assert resolve(SPEC, inside)[0]["max_lr"] == dists["max_lr"]
    modest = recipe_point(dists, inside, divisor=4.0)
    assert modest["max_lr"] == pytest.approx(0.9)
    drop = dists["dropout"]
    assert modest["dropout"] == pytest.approx((drop.low + drop.high) / 2) and drop.low < modest["dropout"] < drop.high
    assert modest["weight_decay"] == pytest.approx(1e-4)  # the range tests' WD either way
    assert {k: v for k, v in modest.items() if k not in ("max_lr", "dropout")} == \
        {k: v for k, v in point.items() if k not in ("max_lr", "dropout")}
    assert Anchors.from_dict(inside.to_dict()) == inside
    # where it is likely, the first point trains at the recommendation inside the band (not at its top), with
    # regularization reduced as before
    likely = Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=1e-4, recipe_max_lr=0.9, sc_likely=True)
    rec = recipe_point(dists, likely, divisor=4.0)
    assert rec["max_lr"] == pytest.approx(0.9) and rec["dropout"] == pytest.approx(defaults["dropout"])


def test_optuna_distributions_match_the_space():
    dists, _ = resolve(SPEC, Anchors(max_lr_bound=2.0, min_lr_bound=0.5, wd_prior=1e-4))
    od = optuna_space(dists)
    assert isinstance(od["max_lr"], optuna.distributions.FloatDistribution) and od["max_lr"].log
    assert (od["cycle_frac"].low, od["cycle_frac"].high) == (0.75, 0.95) and not od["cycle_frac"].log


SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spaces_search_around_what_stage_1_knows(path):
    spec = load_space(path)
    anchors = Anchors(max_lr_bound=2.0, min_lr_bound=2.0 / spec.range_test.divisor, wd_prior=1e-4)
    dists, constants = resolve(spec, anchors)
    assert constants == {}
    # max_lr from below the min bound (Smith: max/3..4) up to the max bound
    assert dists["max_lr"].low < anchors.min_lr_bound and dists["max_lr"].high >= anchors.max_lr_bound
    # weight decay on both sides of the prior: at least a decade above, several below (the authors'
    # ResNet-56 logs: 1e-4 won, 1e-5 / 1e-6 lost 4-5 points, 1e-3 diverged)
    wd = dists["weight_decay"]
    assert wd.high >= 10 * anchors.wd_prior and wd.low <= 1e-2 * anchors.wd_prior
    point = recipe_point(dists, anchors, divisor=spec.range_test.divisor)
    assert point["max_lr"] == pytest.approx(anchors.max_lr_bound)
    assert point["weight_decay"] == pytest.approx(anchors.wd_prior)
    for name, d in dists.items():
        if d.kind != "categorical":
            assert d.low <= point[name] <= d.high, name


def test_a_max_lr_that_is_only_a_lower_bound_widens_the_search_past_the_ramp():
    closed = Anchors(max_lr_bound=2.9, min_lr_bound=0.725, wd_prior=1e-4)
    open_ = Anchors(max_lr_bound=2.9, min_lr_bound=0.725, wd_prior=1e-4, max_lr_lower_bound=True, ramp_end_lr=3.0)
    d_closed, _ = resolve(SPEC, closed)
    d_open, _ = resolve(SPEC, open_)
    assert d_closed["max_lr"].high == pytest.approx(2.9)  # a real maximum caps the range
    assert d_open["max_lr"].high == pytest.approx(6.0)  # 2x the ramp's end: beyond what was measured
    assert d_open["max_lr"].low < open_.min_lr_bound
    assert d_open["max_lr"].log
    # unknown ramp end: 2x the bound
    d, _ = resolve(SPEC, Anchors(max_lr_bound=2.9, min_lr_bound=0.725, wd_prior=1e-4, max_lr_lower_bound=True))
    assert d["max_lr"].high == pytest.approx(5.8)
    # other ranges are unchanged by it
    assert d_open["weight_decay"] == d_closed["weight_decay"]


def test_anchors_round_trip_and_read_older_bounds_files():
    a = Anchors(max_lr_bound=2.9, min_lr_bound=0.725, wd_prior=1e-4, max_lr_lower_bound=True, ramp_end_lr=3.0)
    assert Anchors.from_dict(a.to_dict()) == a
    old = {"max_lr_bound": 1.0, "min_lr_bound": 0.25, "wd_prior": 0.0}  # bounds.json before the two fields
    b = Anchors.from_dict(old)
    assert (b.max_lr_lower_bound, b.ramp_end_lr) == (False, None)


@pytest.mark.parametrize("name", ["cifar10_resnet56", "cifar100_resnet56"])
def test_the_authors_resnet56_settings_are_inside_the_paper_spaces(name):
    """Smith & Topin's logs: CLR 0.1 -> 3 (div 30), WD 1e-4, fixed momentum 0.9 won; the range test stayed
    high up to the end of its 0 -> 3 ramp (a lower bound)."""
    spec = load_space(REPO / "search_spaces" / f"{name}.yaml")
    for prior in (1e-4, 1e-5, 0.0):  # a noisy stage 1 may pick a WD a decade low, or none
        anchors = Anchors(max_lr_bound=3.0, min_lr_bound=0.75, wd_prior=prior, max_lr_lower_bound=True,
                          ramp_end_lr=3.0)
        d, constants = resolve(spec, anchors)
        assert constants == {}

        for key, v in (("max_lr", 3.0), ("div_factor", 30.0), ("weight_decay", 1e-4)):
            assert d[key].low < v < d[key].high, (key, prior)  # strictly inside: not at a corner
    assert False in d["cycle_momentum"].choices and d["max_momentum"].low < 0.9 < d["max_momentum"].high
    assert spec.final.refit
    point = recipe_point(d, anchors, divisor=spec.range_test.divisor)
    assert point["cycle_momentum"] is True  # the recipe's first point: cyclical 0.95 -> 0.85
