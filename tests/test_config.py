"""sctune.core.config: strict from_dict (unknown keys, types, values, key paths) and the flat <-> nested mapping."""

import dataclasses

import pytest

from sctune.core.config import (
    BaselineConfig,
    ConfigError,
    OneCycleConfig,
    RangeTestConfig,
    RegularizationConfig,
    TaskConfig,
    TrainConfig,
)


def _error(cls, data) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        cls.from_dict(data)
    return info.value


# -- unknown keys -------------------------------------------------------------------------------

def test_one_cycle_defaults_are_the_recipe():
    """A parameter left out of `space:` takes the recipe's value (issue 18: the README's space left div_factor
    out and trained from max/4, 2.6 points below Adam): max/10, cycle 90%, annihilation x1000, momentum
    0.95 -> 0.85 cyclical; the range test's CLR divisor stays 3..4."""
    oc = OneCycleConfig()
    assert (oc.div_factor, oc.cycle_frac, oc.annihilation_factor) == (10.0, 0.9, 1000.0)
    assert (oc.max_momentum, oc.min_momentum, oc.cycle_momentum) == (0.95, 0.85, True)
    assert 3.0 <= RangeTestConfig().divisor <= 4.0


def test_defaults_build():
    cfg = TrainConfig.from_dict({})
    assert cfg == TrainConfig()
    assert cfg.onecycle.min_lr == pytest.approx(0.1 / 10.0)  # one-cycle's max/10, not CLR's max/4
    assert TrainConfig.from_dict(None) == TrainConfig()


def test_unknown_top_level_key_named():
    err = _error(TrainConfig, {"epochs": 3, "epoch": 3})
    assert err.path == "epoch"
    assert "unknown key" in str(err)
    assert "epochs" in str(err)  # the allowed keys are listed


def test_unknown_nested_key_has_full_path():
    err = _error(TrainConfig, {"onecycle": {"max_lr": 1.0, "max_rl": 2.0}})
    assert err.path == "onecycle.max_rl"
    assert str(err).startswith("onecycle.max_rl:")
    assert "max_lr" in str(err)


def test_unknown_key_with_prefix_path():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"reg": {"wd": 1e-4}}, path="fixed")
    assert info.value.path == "fixed.reg.wd"


def test_section_must_be_mapping():
    err = _error(TrainConfig, {"onecycle": 0.5})
    assert err.path == "onecycle"
    assert "mapping" in str(err)


# -- types --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        ({"epochs": "10"}, "epochs", "integer"),
        ({"epochs": 2.5}, "epochs", "integer"),
        ({"epochs": True}, "epochs", "integer"),
        ({"epochs": None}, "epochs", "null"),
        ({"nesterov": 1}, "nesterov", "true or false"),
        ({"schedule": 3}, "schedule", "string"),
        ({"onecycle": {"max_lr": "big"}}, "onecycle.max_lr", "number"),
        ({"onecycle": {"max_lr": True}}, "onecycle.max_lr", "number"),
        ({"onecycle": {"max_lr": float("nan")}}, "onecycle.max_lr", "finite"),
        ({"onecycle": {"max_lr": float("inf")}}, "onecycle.max_lr", "finite"),
        ({"onecycle": {"cycle_momentum": "yes"}}, "onecycle.cycle_momentum", "true or false"),
        ({"baseline": {"milestones_frac": 0.5}}, "baseline.milestones_frac", "list"),
        ({"baseline": {"milestones_frac": [0.5, "x"]}}, "baseline.milestones_frac[1]", "number"),
        ({"task": {"train_subset": "10k"}}, "task.train_subset", "integer"),
        ({"task": {"download": "no"}}, "task.download", "true or false"),
    ],
)
def test_wrong_types_rejected_with_path(data, path, words):
    err = _error(TrainConfig, data)
    assert err.path == path
    assert words in str(err)


def test_type_coercions_that_are_allowed():
    cfg = TrainConfig.from_dict({"epochs": 3.0, "onecycle": {"max_lr": 1}, "task": {"train_subset": None,
                                                                                  "augment": None}})
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.onecycle.max_lr == 1.0 and isinstance(cfg.onecycle.max_lr, float)
    assert cfg.task.train_subset is None and cfg.task.augment is None
    base = BaselineConfig.from_dict({"milestones_frac": [0.5, 1 / 3 + 0.5]})
    assert base.milestones_frac == (0.5, 1 / 3 + 0.5) and isinstance(base.milestones_frac, tuple)


# -- values -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"onecycle": {"div_factor": 0.5}}, "onecycle.div_factor"),
        ({"onecycle": {"cycle_frac": 0}}, "onecycle.cycle_frac"),
        ({"onecycle": {"cycle_frac": 1.2}}, "onecycle.cycle_frac"),
        ({"onecycle": {"max_lr": 0}}, "onecycle.max_lr"),
        ({"onecycle": {"max_lr": -1}}, "onecycle.max_lr"),
        ({"onecycle": {"annihilation_factor": 0.5}}, "onecycle.annihilation_factor"),
        ({"onecycle": {"min_momentum": 0.96}}, "onecycle.min_momentum"),  # above max_momentum 0.95
        ({"onecycle": {"max_momentum": 1.0}}, "onecycle.min_momentum"),
        ({"reg": {"weight_decay": -1e-4}}, "reg.weight_decay"),
        ({"reg": {"dropout": 1.0}}, "reg.dropout"),
        ({"reg": {"label_smoothing": -0.1}}, "reg.label_smoothing"),
        ({"baseline": {"milestones_frac": [0.8, 0.5]}}, "baseline.milestones_frac"),
        ({"baseline": {"milestones_frac": [0.5, 1.0]}}, "baseline.milestones_frac"),
        ({"baseline": {"clr_mode": "sine"}}, "baseline.clr_mode"),
        ({"baseline": {"momentum": 1.0}}, "baseline.momentum"),
        ({"task": {"val_frac": 0.0}}, "task.val_frac"),
        ({"task": {"train_subset": 0}}, "task.train_subset"),
        ({"schedule": "cosine"}, "schedule"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_values_rejected_with_path(data, path):
    err = _error(TrainConfig, data)
    assert err.path == path
    assert str(err).startswith(f"{path}: ")


def test_bad_value_message_names_the_value():
    err = _error(TrainConfig, {"onecycle": {"div_factor": 0.5}})
    assert "0.5" in str(err) and ">= 1" in str(err)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"step_mode": "exp", "start_lr": 0.0}, "start_lr"),
        ({"step_mode": "cubic"}, "step_mode"),
        ({"start_lr": -1.0}, "start_lr"),
        ({"start_lr": 1.0, "end_lr": 1.0}, "end_lr"),
        ({"num_iter": 5}, "num_iter"),
        ({"smooth_f": 1.0}, "smooth_f"),
        ({"diverge_th": 1.0}, "diverge_th"),
        ({"eval_every": 0}, "eval_every"),
        ({"num_iter": 20, "eval_every": 21}, "eval_every"),
        ({"method": "magic"}, "method"),
        ({"weight_decays": []}, "weight_decays"),
        ({"weight_decays": [1e-4, -1e-5]}, "weight_decays"),
        ({"repeats": 0}, "repeats"),
        ({"divisor": 0.5}, "divisor"),
    ],
)
def test_range_test_config_values(data, path):
    err = _error(RangeTestConfig, data)
    assert err.path == path


def test_range_test_config_exp_mode_ok_with_positive_start():
    cfg = RangeTestConfig.from_dict({"step_mode": "exp", "start_lr": 1e-5, "end_lr": 10, "weight_decays": [0]})
    assert cfg.step_mode == "exp" and cfg.end_lr == 10.0 and cfg.weight_decays == (0.0,)


def test_configs_are_frozen():
    cfg = OneCycleConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_lr = 3.0  # type: ignore[misc]
    assert cfg.replace(max_lr=3.0).max_lr == 3.0


def test_sections_from_dict_standalone():
    assert RegularizationConfig.from_dict({"weight_decay": 0}).weight_decay == 0.0
    assert TaskConfig.from_dict({"dataset": "mnist1d"}).dataset == "mnist1d"
    with pytest.raises(ConfigError) as info:
        TaskConfig.from_dict({"val_frac": 0.95}, path="task")
    assert info.value.path == "task.val_frac"


# -- flat <-> nested ----------------------------------------------------------------------------

def test_flat_keys_unique_and_mapped():
    keys = TrainConfig.flat_keys()
    assert keys["max_lr"] == "onecycle"
    assert keys["weight_decay"] == "reg"
    assert keys["clr_mode"] == "baseline"
    assert keys["dataset"] == "task"
    assert keys["epochs"] == ""
    n_fields = sum(len(dataclasses.fields(s)) for s in (TaskConfig, OneCycleConfig, BaselineConfig,
                                                        RegularizationConfig))
    n_top = len(dataclasses.fields(TrainConfig)) - 4
    assert len(keys) == n_fields + n_top  # no flat name shadows another


def test_flat_round_trip():
    cfg = TrainConfig.from_dict({
        "epochs": 7, "optimizer": "adamw", "onecycle": {"max_lr": 2.5, "cycle_frac": 0.8},
        "reg": {"weight_decay": 3e-6, "dropout": 0.1}, "baseline": {"milestones_frac": [0.3, 0.6]},
        "task": {"dataset": "mnist1d", "model": "mnist1d_cnn", "train_subset": 500},
    })
    flat = cfg.to_flat()
    assert flat["max_lr"] == 2.5 and flat["weight_decay"] == 3e-6 and flat["epochs"] == 7
    assert not any(isinstance(v, dict) for v in flat.values())
    assert TrainConfig.from_flat(flat) == cfg


def test_from_flat_partial_and_unknown():
    cfg = TrainConfig.from_flat({"max_lr": 0.8, "weight_decay": 0.0, "epochs": 2})
    assert cfg.onecycle.max_lr == 0.8 and cfg.reg.weight_decay == 0.0 and cfg.epochs == 2
    assert cfg.onecycle.div_factor == OneCycleConfig().div_factor
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_flat({"max_lrr": 1.0}, path="fixed")
    assert info.value.path == "fixed.max_lrr"
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_flat({"div_factor": 0.1})
    assert info.value.path == "onecycle.div_factor"


def test_with_flat():
    base = TrainConfig.from_dict({"epochs": 4, "onecycle": {"max_lr": 1.0}})
    new = base.with_flat(max_lr=2.0, weight_decay=1e-5, seed=3)
    assert (new.onecycle.max_lr, new.reg.weight_decay, new.seed) == (2.0, 1e-5, 3)
    assert new.epochs == 4 and base.onecycle.max_lr == 1.0  # others kept; original untouched
    assert new.onecycle.div_factor == base.onecycle.div_factor
    with pytest.raises(ConfigError):
        base.with_flat(not_a_key=1)
    with pytest.raises(ConfigError) as info:
        base.with_flat(cycle_frac=0.0)
    assert info.value.path == "onecycle.cycle_frac"


def test_to_dict_from_dict_round_trip():
    cfg = TrainConfig().with_flat(max_lr=1.5, clr_mode="triangular2", augment=True)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
