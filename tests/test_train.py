"""sctune.core.train: parameter groups, the step loop, fit (accuracy, determinism, resume, checkpoints,
divergence, reported LR) on tiny seeded tasks."""

import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from sctune.core.config import TaskConfig, TrainConfig
from sctune.core.data import load_dataset
from sctune.core.tasks import MODELS
from sctune.core.train import (
    HF_LR,
    HF_LR_EMA,
    LR,
    MOMENTUM,
    TEST_ACC,
    TEST_LOSS,
    THROUGHPUT,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    evaluate,
    fit,
    make_optimizer,
    param_groups,
    recalibrate_bn,
    rng_state,
    run_steps,
    seed_everything,
    set_rng_state,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(TaskConfig(dataset="digits"))


@pytest.fixture(scope="module")
def small(digits):
    """320 training / 96 validation digits: 5 steps per epoch at batch 64, for tests not about accuracy."""
    return dataclasses.replace(digits, x_train=digits.x_train[:320], y_train=digits.y_train[:320],
                               x_val=digits.x_val[:96], y_val=digits.y_val[:96])


def _cfg(**flat) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 64, "device": "cpu", "max_lr": 0.2, "weight_decay": 5e-4}
    base.update(flat)
    return TrainConfig.from_flat(base)


def _no_timing(history):
    return [{k: v for k, v in h.items() if k != THROUGHPUT} for h in history]


# -- parameter groups and optimizers ------------------------------------------------------------

class _AllNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3, bias=True)
        self.frozen = nn.Linear(3, 3)
        self.frozen.weight.requires_grad_(False)


def test_param_groups_exempt_norms_and_biases():
    m = _AllNorms()
    decay, no_decay = param_groups(m, 1e-3)
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([m.conv.weight, m.fc.weight])
    assert ids(no_decay["params"]) == ids([m.conv.bias, m.bn.weight, m.bn.bias, m.gn.weight, m.gn.bias,
                                           m.ln.weight, m.ln.bias, m.fc.bias, m.frozen.bias])
    assert id(m.frozen.weight) not in ids(decay["params"]) | ids(no_decay["params"])


def test_param_groups_wd_norm_bias_includes_everything():
    m = _AllNorms()
    groups = param_groups(m, 1e-3, wd_norm_bias=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-3
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in trainable}
    assert len(groups[0]["params"]) == len(trainable)


def test_make_optimizer_from_config():
    m = _AllNorms()
    sgd = make_optimizer(m, _cfg(weight_decay=1e-5, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-5, 0.0]
    assert sgd.param_groups[0]["momentum"] == 0.95 and sgd.param_groups[0]["nesterov"] is True  # onecycle max
    base = make_optimizer(m, _cfg(schedule="piecewise", momentum=0.8, wd_norm_bias=True), lr=0.3)
    assert base.param_groups[0]["momentum"] == 0.8 and base.param_groups[0]["lr"] == 0.3
    assert len(base.param_groups) == 1
    adamw = make_optimizer(m, _cfg(optimizer="adamw"), momentum=0.9, weight_decay=0.01)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.999)
    assert adamw.param_groups[0]["weight_decay"] == 0.01


# -- rng, evaluate, run_steps -------------------------------------------------------------------

def test_rng_state_round_trip():
    import random

    import numpy as np

    seed_everything(3)
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_evaluate_restores_mode_and_counts():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    model.train()
    loss, acc = evaluate(model, x, y, batch_size=3)
    assert model.training
    assert acc == 0.75
    expected = nn.functional.cross_entropy(x, y).item()  # eval mode: dropout off, logits = x
    assert loss == pytest.approx(expected, rel=1e-6)


def test_recalibrate_bn_exact_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(0.5), nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[0].momentum = 0.3
    x = torch.randn(100, 3) * torch.tensor([1.0, 2.0, 5.0]) + torch.tensor([0.0, -1.0, 3.0])
    model.train()
    model(torch.randn(8, 3))  # stale running statistics
    rng = torch.get_rng_state()
    assert recalibrate_bn(model, x, batch_size=512) is True
    assert torch.allclose(model[0].running_mean, x.mean(0), atol=1e-5)
    assert torch.allclose(model[0].running_var, x.var(0, unbiased=True), rtol=1e-4)
    with torch.no_grad():  # all BNs run in train mode together (as fvcore's precise BN does)
        h = model[2](nn.functional.batch_norm(x, None, None, model[0].weight, model[0].bias, training=True))
    assert torch.allclose(model[3].running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(model[3].running_var, h.var(0, unbiased=True), rtol=1e-4)
    assert model[0].momentum == 0.3 and model[3].momentum == 0.1  # restored
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)  # dropout stayed off: no RNG drawn
    assert model[0].num_batches_tracked == 1
    # several batches: a cumulative average of the per-batch statistics
    recalibrate_bn(model, x, batch_size=50)
    assert torch.allclose(model[0].running_mean, x.mean(0), atol=1e-5)
    assert recalibrate_bn(nn.Linear(3, 3), x) is False


def test_run_steps_counts_and_stops():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    seen = []
    taken = run_steps(model, opt, batches, criterion=nn.functional.cross_entropy, num_steps=7, start_step=10,
                      on_step=lambda info: seen.append((info.step, info.batch_size)))
    assert taken == 7 and [s for s, _ in seen] == list(range(10, 17))  # re-iterates the 3 batches
    assert taken == len(seen) and all(b == 4 for _, b in seen)
    assert run_steps(model, opt, batches, criterion=nn.functional.cross_entropy) == 3  # one pass
    stop_at = run_steps(model, opt, batches, criterion=nn.functional.cross_entropy, num_steps=10,
                        on_step=lambda info: info.step == 1)
    assert stop_at == 2


def test_run_steps_reports_lr_used_and_sums_loss():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    infos = []
    loss_sum = torch.zeros(())
    run_steps(model, opt, batches, criterion=nn.functional.cross_entropy, scheduler=sched, num_steps=4,
              on_step=infos.append, loss_sum=loss_sum)
    assert [i.lr for i in infos] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert float(loss_sum) == pytest.approx(sum(float(i.loss) for i in infos), rel=1e-6)


# -- fit ----------------------------------------------------------------------------------------

def test_fit_learns_digits(digits):
    result = fit(_cfg(epochs=3, batch_size=128), data=digits)  # seeds 0/1/2 reach 0.96/0.94/0.95
    assert result.epochs_run == 3 and not result.diverged and not result.stopped_early
    assert result.final[VAL_ACC] > 0.9
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1][TRAIN_LOSS] < result.history[0][TRAIN_LOSS]
    for key in (TRAIN_LOSS, VAL_LOSS, VAL_ACC, LR, MOMENTUM, THROUGHPUT, "diverged"):
        assert key in result.final


def test_fit_same_seed_same_history(small):
    a = fit(_cfg(epochs=2, dropout=0.1), data=small)
    b = fit(_cfg(epochs=2, dropout=0.1), data=small)
    c = fit(_cfg(epochs=2, dropout=0.1, seed=1), data=small)
    assert _no_timing(a.history) == _no_timing(b.history)
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert _no_timing(a.history) != _no_timing(c.history)


def test_fit_lr_reported_is_lr_used(small):
    cfg = _cfg(epochs=3, max_lr=0.4)
    n_steps = len(small.y_train) // 64
    result = fit(cfg, data=small)
    lrs = [h[LR] for h in result.history]
    assert all(lr > 0 for lr in lrs)
    # the last step of the run uses min_lr / annihilation_factor (torch's OneCycleLR after T-1 steps)
    assert lrs[-1] == pytest.approx(0.4 / 10 / 1000, rel=1e-6)  # the default div_factor 10
    assert result.history[-1][MOMENTUM] == pytest.approx(0.95)
    # the first epoch ends on the way up: LR used at step n_steps - 1 of a 3 * n_steps cycle
    total = 3 * n_steps
    up_end = 0.45 * total - 1
    expected = 0.04 + (0.4 - 0.04) * (n_steps - 1) / up_end
    assert lrs[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "piecewise", "clr"])
def test_fit_baseline_schedules(small, schedule):
    result = fit(_cfg(epochs=2, schedule=schedule, lr=0.05, clr_max_lr=0.2, clr_step_epochs=1.0,
                      milestones_frac=[0.5]), data=small)
    lrs = [h[LR] for h in result.history]
    moms = [h[MOMENTUM] for h in result.history]
    assert moms == [0.9, 0.9]  # baseline momentum, fixed
    if schedule == "constant":
        assert lrs == [0.05, 0.05]
    elif schedule == "piecewise":
        assert lrs == pytest.approx([0.05, 0.005])
    else:  # stepsize = 1 epoch: the last step of epoch 1 is one step short of the peak
        n = len(small.y_train) // 64
        assert lrs[0] == pytest.approx(0.05 + 0.15 * (n - 1) / n)
        assert lrs[1] == pytest.approx(0.05 + 0.15 / n)


def test_fit_adamw_reports_beta1(small):
    result = fit(_cfg(epochs=2, optimizer="adamw", max_lr=0.01), data=small)
    assert result.history[0][MOMENTUM] < 0.95 and result.history[-1][MOMENTUM] == pytest.approx(0.95)
    assert result.final[TRAIN_LOSS] < result.history[0][TRAIN_LOSS] and not result.diverged


def test_fit_tracks_curvature(small):
    result = fit(_cfg(epochs=1, track_curvature=True), data=small)
    assert result.final[HF_LR] > 0 and math.isfinite(result.final[HF_LR])
    assert result.final[HF_LR_EMA] > 0
    assert HF_LR not in fit(_cfg(epochs=1), data=small).final


@pytest.mark.parametrize("model", ["digits_cnn", "mlp"])
def test_fit_diverges_on_huge_lr(small, model):
    # mlp overflows to NaN; the BatchNorm CNN can stay finite (train loss ~1e17) yet is just as diverged.
    result = fit(_cfg(epochs=3, max_lr=1e4, weight_decay=0.0, model=model), data=small)
    assert result.diverged and not result.stopped_early
    assert result.epochs_run < 3 and len(result.history) == result.epochs_run
    assert result.final["diverged"] == 1.0
    loss = result.final[TRAIN_LOSS]
    assert not math.isfinite(loss) or loss > 10 * math.log(10)


class _Scaled(nn.Module):
    """Linear classifier with logits multiplied by a fixed factor: a huge factor gives a huge, finite loss."""

    def __init__(self, num_classes, input_shape, scale):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)
        self.scale = scale

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.scale


@pytest.mark.parametrize(("scale", "diverged"), [(1e4, True), (1.0, False)])
def test_fit_flags_finite_exploded_loss(small, monkeypatch, scale, diverged):
    from sctune.core import models

    monkeypatch.setattr(MODELS, "entries", dict(MODELS.entries))
    models.register_model("scaled", lambda nc, shape, dropout: _Scaled(nc, shape, scale))
    result = fit(_cfg(epochs=2, model="scaled", schedule="constant", lr=1e-6), data=small)
    assert math.isfinite(result.history[0][TRAIN_LOSS]) and math.isfinite(result.history[0][VAL_LOSS])
    assert result.diverged is diverged
    assert result.epochs_run == (1 if diverged else 2)


def test_fit_test_at_end(small):
    with_test = fit(_cfg(epochs=2), data=small, test_at_end=True)
    assert TEST_ACC not in with_test.history[0] and TEST_LOSS not in with_test.history[0]
    loss, acc = evaluate(with_test.model, small.x_test, small.y_test)
    assert with_test.final[TEST_ACC] == acc and with_test.final[TEST_LOSS] == pytest.approx(loss, rel=1e-6)
    assert TEST_ACC not in fit(_cfg(epochs=1), data=small).final  # the search never sees test data


def test_fit_on_epoch_can_stop(small):
    seen = []
    result = fit(_cfg(epochs=3), data=small, on_epoch=lambda m, state_fn: seen.append(m["epoch"]) or True)
    assert seen == [1] and result.stopped_early and result.epochs_run == 1


def test_fit_resume_is_exact(small):
    """4 epochs straight == 2 epochs, checkpoint, resume for 2 more: bit for bit on CPU.

    The checkpoint is taken *during* an uninterrupted run (which continues afterwards), so it must be
    a snapshot, not a view of the live weights. Dropout makes the global RNG state part of the run.
    """
    cfg = _cfg(epochs=4, dropout=0.2)
    states = {}

    def keep(metrics, state_fn):
        if metrics["epoch"] == 2:
            states[2] = state_fn()

    full = fit(cfg, data=small, on_epoch=keep)
    state = states[2]
    assert state["epoch"] == 2 and len(state["history"]) == 2
    # the snapshot still holds epoch-2 weights although training went on to epoch 4
    assert any(not torch.equal(state["model"][k], v) for k, v in full.model.state_dict().items())

    resumed = fit(cfg, data=small, state=state)
    assert resumed.epochs_run == 4 and len(resumed.history) == 4
    assert _no_timing(resumed.history) == _no_timing(full.history)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_survives_weights_only_load(small):
    cfg = _cfg(epochs=2)
    saved = {}

    def keep(metrics, state_fn):
        buf = io.BytesIO()
        torch.save(state_fn(), buf)
        saved["bytes"] = buf.getvalue()
        return True

    first = fit(cfg, data=small, on_epoch=keep)
    state = torch.load(io.BytesIO(saved["bytes"]), weights_only=True)
    assert state["epoch"] == 1 and state["history"][0]["epoch"] == 1
    resumed = fit(cfg, data=small, state=state)
    straight = fit(cfg, data=small)
    assert _no_timing(resumed.history) == _no_timing(straight.history)
    assert _no_timing(resumed.history[:1]) == _no_timing(first.history)


def test_fit_evaluates_with_precise_bn_without_changing_training(small):
    """Trials evaluate as the range test does: BN statistics recomputed for the current weights from a
    fixed training subset before every evaluation. No RNG is drawn and no weight moves, so the training
    losses are bit-identical with and without it; only what the evaluation sees changes."""
    from sctune.core.train import recal_subset

    on = fit(_cfg(epochs=2, max_lr=1.5, dropout=0.1), data=small)
    off = fit(_cfg(epochs=2, max_lr=1.5, dropout=0.1, precise_bn=False), data=small)
    assert [h[TRAIN_LOSS] for h in on.history] == [h[TRAIN_LOSS] for h in off.history]
    assert [h[VAL_LOSS] for h in on.history] != [h[VAL_LOSS] for h in off.history]
    # the reported metrics are those of the recalibrated model (its BN buffers after the last epoch)
    model = off.model
    recalibrate_bn(model, recal_subset(small.x_train, 512), batch_size=1024)
    assert evaluate(model, small.x_val, small.y_val) == pytest.approx((on.final[VAL_LOSS], on.final[VAL_ACC]))
