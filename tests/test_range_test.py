"""sctune.core.range_test: exact state restore, the recorded curve, evaluation cadence, divergence, run_range_test."""

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from sctune.core.config import RangeTestConfig, TaskConfig, TrainConfig
from sctune.core.data import load_dataset, make_synthetic
from sctune.core.range_test import COLUMNS, RangeTestResult, range_test, run_range_test
from sctune.core.train import evaluate


def _model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(4 * 4 * 4, 3),
    )


def _task(n=96, seed=0):
    x, y, xv, yv = make_synthetic(n_train=n, n_test=48, shape=(1, 4, 4), num_classes=3, seed=seed, noise=1.0)
    return x, y, xv, yv


def _cfg(**kw) -> RangeTestConfig:
    base = {"start_lr": 0.0, "end_lr": 1.0, "num_iter": 20, "eval_every": 5}
    base.update(kw)
    return RangeTestConfig.from_dict(base)


def _warm(model, opt, batches, steps=3):
    """A few real steps so momentum buffers and BN running stats are non-trivial."""
    for xb, yb in batches[:steps]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()


def _batches(x, y, bs=16):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


def _snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state(),
            np.random.get_state(), random.getstate(), model.training)


def _assert_same_state(model, opt, snap):
    model_sd, opt_sd, t_rng, np_rng, py_rng, training = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_sd[k]), k
    now = opt.state_dict()
    assert now["param_groups"] == opt_sd["param_groups"]
    assert now["state"].keys() == opt_sd["state"].keys() and len(now["state"]) > 0
    for k, st in now["state"].items():
        for name, v in st.items():
            assert torch.equal(v, opt_sd["state"][k][name]), (k, name)
    assert torch.equal(torch.get_rng_state(), t_rng)
    np_now = np.random.get_state()
    assert np_now[0] == np_rng[0] and np.array_equal(np_now[1], np_rng[1]) and np_now[2:] == np_rng[2:]
    assert random.getstate() == py_rng
    assert model.training is training


# -- restore ------------------------------------------------------------------------------------

def test_state_restored_bit_for_bit():
    x, y, xv, yv = _task()
    batches = _batches(x, y)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    _warm(model, opt, batches)
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    snap = _snapshot(model, opt)

    result = range_test(model, opt, batches, cfg=_cfg(), val=(xv, yv))
    assert len(result.frame) == 20  # it really trained
    _assert_same_state(model, opt, snap)
    assert "initial_lr" not in opt.param_groups[0] and opt.param_groups[0]["lr"] == 0.05

    # ... and training continues exactly as if the range test never ran (dropout draws included).
    _warm(model, opt, batches, steps=3)
    after = [p.detach().clone() for p in model.parameters()]
    twin = _model()
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    twin.load_state_dict(snap[0])
    twin_opt.load_state_dict(snap[1])
    torch.set_rng_state(snap[2])
    _warm(twin, twin_opt, batches, steps=3)
    for a, b in zip(after, twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bn_recalibration_restored_and_training_unaffected():
    x, y, xv, yv = _task()
    batches = _batches(x, y)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _warm(model, opt, batches)
    snap = _snapshot(model, opt)
    cfg = _cfg(end_lr=2.0, num_iter=20, eval_every=5)
    plain = range_test(model, opt, batches, cfg=cfg, val=(xv, yv))
    _assert_same_state(model, opt, snap)
    recal = range_test(model, opt, batches, cfg=cfg, val=(xv, yv), recalibrate_x=x)
    _assert_same_state(model, opt, snap)  # recalibrated BN buffers are put back too
    # recalibration draws no RNG and runs no training step: the loss curve is bit-identical
    assert recal.frame["loss"].tolist() == plain.frame["loss"].tolist()
    assert recal.evaluated["step"].tolist() == plain.evaluated["step"].tolist()
    assert recal.frame["val_loss"].dropna().tolist() != plain.frame["val_loss"].dropna().tolist()
    off = range_test(model, opt, batches, cfg=cfg.replace(bn_recalibrate=False), val=(xv, yv), recalibrate_x=x)
    assert off.frame["val_loss"].dropna().tolist() == plain.frame["val_loss"].dropna().tolist()


def test_restore_keeps_eval_mode_and_restores_on_error():
    x, y, xv, yv = _task()
    model = _model().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _warm(model, opt, _batches(x, y))
    model.eval()
    snap = _snapshot(model, opt)
    range_test(model, opt, _batches(x, y), cfg=_cfg(), val=(xv, yv))
    _assert_same_state(model, opt, snap)

    calls = []

    def failing_metric(m):
        calls.append(1)
        raise RuntimeError("metric broke")

    with pytest.raises(RuntimeError, match="metric broke"):
        range_test(model, opt, _batches(x, y), cfg=_cfg(), metric=failing_metric)
    assert calls
    _assert_same_state(model, opt, snap)


def test_restore_false_keeps_trained_weights():
    x, y, xv, yv = _task()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    range_test(model, opt, _batches(x, y), cfg=_cfg(), val=(xv, yv), restore=False)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- the recorded curve -------------------------------------------------------------------------

def test_frame_columns_lr_ramp_and_smoothing():
    x, y, xv, yv = _task()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = _cfg(start_lr=0.0, end_lr=0.5, num_iter=21, eval_every=7, smooth_f=0.1)
    res = range_test(model, opt, _batches(x, y), cfg=cfg, val=(xv, yv))
    f = res.frame
    assert tuple(f.columns) == COLUMNS
    assert res.stop_reason == "completed" and not res.diverged and res.diverged_at_lr is None
    assert f["step"].tolist() == list(range(21))
    assert f["lr"].tolist() == pytest.approx([0.5 * i / 20 for i in range(21)], rel=1e-12, abs=1e-15)
    assert f["lr"].iloc[0] == 0.0
    # bias-corrected EMA of the raw loss (pytorch-lr-finder's smooth_f)
    avg = 0.0
    for i, loss in enumerate(f["loss"]):
        avg = 0.1 * loss + 0.9 * avg
        assert f["smooth_loss"].iloc[i] == pytest.approx(avg / (1 - 0.9 ** (i + 1)), rel=1e-12)
    assert f["smooth_loss"].iloc[0] == pytest.approx(f["loss"].iloc[0], rel=1e-12)
    # the loss recorded at lr 0 is the untrained model's (no update happened before it)
    assert f["loss"].iloc[0] == pytest.approx(f["loss"].iloc[1], rel=0.5)


def test_accuracy_every_eval_every_and_last():
    x, y, xv, yv = _task()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    untrained = evaluate(model, xv, yv)
    res = range_test(model, opt, _batches(x, y), cfg=_cfg(num_iter=23, eval_every=5), val=(xv, yv))
    evaluated = res.frame.dropna(subset=["acc"])["step"].tolist()
    assert evaluated == [0, 4, 9, 14, 19, 22]  # row 0: the untrained model, where the learned range starts
    assert (res.frame["val_loss"].iloc[0], res.frame["acc"].iloc[0]) == pytest.approx(untrained)
    assert res.train_seconds > 0 and res.eval_seconds > 0
    assert res.evaluated["step"].tolist() == evaluated
    assert res.frame["val_loss"].notna().tolist() == res.frame["acc"].notna().tolist()
    acc = res.evaluated["acc"]
    assert ((acc >= 0) & (acc <= 1)).all()
    assert all(abs(a * 48 - round(a * 48)) < 1e-9 for a in acc)  # a fraction of the 48 held-out samples


def test_custom_metric_and_cadence():
    x, y, _, _ = _task()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []

    def metric(m):
        seen.append(m)
        return 0.25, 0.75

    res = range_test(model, opt, _batches(x, y), cfg=_cfg(num_iter=12, eval_every=4), metric=metric)
    assert len(seen) == 4 and all(m is model for m in seen)
    assert res.evaluated["step"].tolist() == [0, 3, 7, 11]
    assert res.evaluated["acc"].tolist() == [0.75] * 4 and res.evaluated["val_loss"].tolist() == [0.25] * 4


def test_needs_val_or_metric():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="held-out"):
        range_test(model, opt, [], cfg=_cfg())


def test_exp_mode():
    x, y, xv, yv = _task()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = _cfg(step_mode="exp", start_lr=1e-4, end_lr=1e-1, num_iter=13, eval_every=13)
    res = range_test(model, opt, _batches(x, y), cfg=cfg, val=(xv, yv))
    lrs = res.frame["lr"].to_numpy()
    expected = 1e-4 * (1e3 ** (np.arange(13) / 12))
    assert np.allclose(lrs, expected, rtol=1e-12, atol=0)
    assert lrs[6] == pytest.approx(math.sqrt(1e-4 * 1e-1), rel=1e-12)
    assert res.evaluated["step"].tolist() == [0, 12]


# -- divergence ---------------------------------------------------------------------------------

def test_diverges_with_huge_end_lr():
    x, y, xv, yv = _task()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    res = range_test(model, opt, _batches(x, y), cfg=_cfg(end_lr=1e6, num_iter=200, eval_every=10), val=(xv, yv))
    assert res.diverged
    assert res.stop_reason.startswith("diverged: ")
    assert "non-finite" in res.stop_reason or "smoothed loss" in res.stop_reason
    assert len(res.frame) < 200
    assert res.diverged_at_lr == res.frame["lr"].iloc[-1]
    assert res.frame["lr"].tolist() == pytest.approx([1e6 * i / 199 for i in range(len(res.frame))], rel=1e-12)


class _OffsetLoss:
    """Cross-entropy plus a constant that jumps at ``at``: the loss rises, gradients stay the same."""

    def __init__(self, at, offset):
        self.calls, self.at, self.offset = 0, at, offset

    def __call__(self, out, y):
        self.calls += 1
        return nn.functional.cross_entropy(out, y) + (self.offset if self.calls > self.at else 0.0)


def test_divergence_by_smoothed_loss_threshold():
    x, y, xv, yv = _task()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = _cfg(end_lr=0.01, num_iter=100, eval_every=10, diverge_th=2.0, smooth_f=0.2)
    res = range_test(model, opt, _batches(x, y), cfg=cfg, val=(xv, yv), criterion=_OffsetLoss(30, 50.0))
    f = res.frame
    assert res.stop_reason.startswith("diverged: smoothed loss")
    assert 30 < len(f) < 40  # stops within a few steps of the jump at step 30
    assert np.isfinite(f["loss"]).all()
    last = f["smooth_loss"].iloc[-1]
    assert last > 2.0 * f["smooth_loss"].iloc[:-1].min()
    assert (f["smooth_loss"].iloc[1:-1] <= 2.0 * f["smooth_loss"].iloc[:-1].cummin().iloc[:-1].to_numpy()).all()


class _ScriptedLoss:
    """Reports a scripted loss value per step (zero gradient): the curve shape under test, nothing else."""

    def __init__(self, values):
        self.values, self.calls = values, 0

    def __call__(self, out, y):
        v = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return (out * 0).sum() + v


def test_no_divergence_from_noise_near_zero_loss():
    # Training loss falls to ~0.001, then wobbles to 0.05: 50x the best, yet far below the untrained
    # model's 2.3. The relative rule alone would cut the curve here (seen on digits at LR 0.9 of 3.0).
    x, y, xv, yv = _task()
    values = [2.3] * 3 + [0.001] * 25 + [0.05] * 32
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = _cfg(num_iter=60, eval_every=60, diverge_th=5.0, smooth_f=0.3)
    res = range_test(model, opt, _batches(x, y), cfg=cfg, val=(xv, yv), criterion=_ScriptedLoss(values))
    assert res.stop_reason == "completed" and len(res.frame) == 60
    assert res.frame["smooth_loss"].iloc[-1] > 5.0 * res.frame["smooth_loss"].min()
    # ... while a rise above the starting loss is still divergence
    up = [2.3] * 3 + [0.001] * 25 + [5.0] * 32
    res = range_test(model, opt, _batches(x, y), cfg=cfg, val=(xv, yv), criterion=_ScriptedLoss(up))
    assert res.stop_reason.startswith("diverged: smoothed loss") and 28 < len(res.frame) < 35


class _NanLoss(_OffsetLoss):
    def __call__(self, out, y):
        loss = super().__call__(out, y)
        return loss * math.nan if self.calls > self.at else loss


def test_divergence_by_non_finite_loss():
    x, y, xv, yv = _task()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _warm(model, opt, _batches(x, y))
    snap = _snapshot(model, opt)
    res = range_test(model, opt, _batches(x, y), cfg=_cfg(num_iter=50), val=(xv, yv), criterion=_NanLoss(12, 0.0))
    assert res.stop_reason.startswith("diverged: non-finite loss")
    assert len(res.frame) == 13  # the NaN step is recorded, nothing after it
    assert math.isnan(res.frame["loss"].iloc[-1]) and np.isfinite(res.frame["loss"].iloc[:-1]).all()
    assert res.diverged_at_lr == pytest.approx(12 / 49)
    for p in model.parameters():  # NaN updates were undone by the restore
        assert torch.isfinite(p).all()
    _assert_same_state(model, opt, snap)


# -- run_range_test -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_dataset(TaskConfig(dataset="digits"))


def test_run_range_test_digits_300_iters(digits):
    train_cfg = TrainConfig.from_flat({"batch_size": 16, "device": "cpu"})  # small batches keep it ~1 s
    rt = RangeTestConfig.from_dict({"end_lr": 1.0, "num_iter": 300, "eval_every": 25, "eval_samples": 128})
    res = run_range_test(train_cfg, rt, weight_decay=1e-4, seed=0, data=digits)
    assert isinstance(res, RangeTestResult)
    assert res.stop_reason == "completed" and len(res.frame) == 300
    assert res.weight_decay == 1e-4 and res.seed == 0
    assert res.evaluated["step"].tolist() == [0, *range(24, 300, 25)]
    assert res.frame["lr"].iloc[-1] == pytest.approx(1.0)
    assert res.evaluated["acc"].max() > 0.8  # the model learns during the sweep


def test_run_range_test_uses_weight_decay_and_seed(digits):
    train_cfg = TrainConfig.from_flat({"batch_size": 16, "device": "cpu"})
    rt = RangeTestConfig.from_dict({"end_lr": 1.0, "num_iter": 12, "eval_every": 12, "eval_samples": 64})
    a = run_range_test(train_cfg, rt, weight_decay=0.0, seed=0, data=digits)
    b = run_range_test(train_cfg, rt, weight_decay=0.1, seed=0, data=digits)
    c = run_range_test(train_cfg, rt, weight_decay=0.0, seed=1, data=digits)
    assert a.frame["loss"].tolist() == run_range_test(train_cfg, rt, weight_decay=0.0, seed=0,
                                                      data=digits).frame["loss"].tolist()  # seeded
    assert a.frame["loss"].iloc[0] == b.frame["loss"].iloc[0]  # same init and batch
    assert a.frame["loss"].tolist() != b.frame["loss"].tolist()  # WD changes the trajectory
    assert a.frame["loss"].iloc[0] != c.frame["loss"].iloc[0]  # another seed: another init/batch


# -- torch users' habits: DataLoaders, dict batches, .plot() and .suggestion() ----------------------


def test_range_test_takes_dataloaders_with_tuple_or_dict_batches(tmp_path):
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from sctune.core.models import build_model

    data = load_dataset(TaskConfig(dataset="digits"))

    class Dicts(Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"image": self.x[i], "label": self.y[i]}

    cfg = RangeTestConfig(start_lr=0.0, end_lr=1.0, num_iter=60, eval_every=5, repeats=1)
    results = []
    for make in (TensorDataset, Dicts):
        torch.manual_seed(0)
        model = build_model("digits_cnn", num_classes=10, input_shape=data.input_shape)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train = DataLoader(make(data.x_train, data.y_train), batch_size=64, shuffle=True, drop_last=True)
        val = DataLoader(make(data.x_val, data.y_val), batch_size=256)
        results.append(range_test(model, opt, train, cfg=cfg, val=val))
    for res in results:
        ev = res.evaluated
        assert len(ev) >= 8 and ev["acc"].max() > 0.5, ev  # it learned (chance 0.1), read from the val loader
        s = res.suggestion()
        assert s is None or 0 < s <= 1.0
        fig = res.plot(path=str(tmp_path / "rt.png"))
        assert (tmp_path / "rt.png").stat().st_size > 0 and len(fig.axes) >= 2
    # a batch it cannot read names the hook
    model = build_model("digits_cnn", num_classes=10, input_shape=data.input_shape)
    bad = [{"pixels": data.x_train[:8], "cls": data.y_train[:8]}]
    with pytest.raises(ValueError, match="batch_fn="):
        range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), bad, cfg=cfg, val=(data.x_val, data.y_val))
    res = range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), bad * 60, cfg=cfg,
                     val=(data.x_val, data.y_val), batch_fn=lambda b: (b["pixels"], b["cls"]))
    assert len(res.frame) > 0
