"""The LR range test (Smith 1506.01186 section 3.3; METHOD.md section 2).

One short pre-training run in which the LR rises linearly (Smith's default) or exponentially from
``start_lr`` to ``end_lr`` over ``num_iter`` steps. Per step it records the LR, the raw and
smoothed training loss; for the untrained model (row 0) and every ``eval_every`` steps the accuracy (and loss) on a fixed held-out set,
the quantity Smith reads the bounds from. It stops at divergence (non-finite loss, or smoothed loss
above ``diverge_th`` x the best and above the starting loss). Model, optimizer and RNG state are
restored exactly afterwards, so a range test can run on the model about to be trained.

``range_test`` works on any model/optimizer/loss/data; ``run_range_test`` builds all of them from a
``TrainConfig`` and is what the Ray trainables call.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.optim import Optimizer

from .config import RangeTestConfig, TrainConfig
from .data import DatasetSplits, DeviceLoader, load_dataset, resolve_device
from .models import build_model
from .schedules import range_ramp
from .train import (
    StepInfo,
    amp_dtype_for,
    evaluate,
    make_optimizer,
    recalibrate_bn,
    rng_state,
    run_steps,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger(__name__)

COLUMNS = ("step", "lr", "loss", "smooth_loss", "acc", "val_loss")

# metric(model) -> (loss, accuracy) on the held-out set; the default is cross-entropy + top-1.
MetricFn = Callable[[nn.Module], tuple[float, float]]


@dataclass(frozen=True)
class RangeTestResult:
    frame: pd.DataFrame  # one row per step: COLUMNS; acc/val_loss NaN where not evaluated
    config: RangeTestConfig
    stop_reason: str  # "completed" | "diverged: <why>"
    weight_decay: float | None = None
    seed: int | None = None
    train_seconds: float = math.nan  # wall time in training steps (forward, backward, update)
    eval_seconds: float = math.nan  # wall time in held-out evaluations (with BatchNorm recalibration)
    full_training_steps: int | None = None  # steps of one full training of the task (epochs x batches)

    @property
    def cost_fte(self) -> float:
        """What this range test cost in full-training equivalents, measured: its steps over a full
        training's, scaled up by the measured share of evaluation time (a full training's own per-epoch
        evaluations are not counted, so the figure errs high)."""
        if not self.full_training_steps or not (self.train_seconds > 0):
            return math.nan
        return len(self.frame) / self.full_training_steps * (1.0 + self.eval_seconds / self.train_seconds)

    @property
    def diverged(self) -> bool:
        return self.stop_reason.startswith("diverged")

    @property
    def diverged_at_lr(self) -> float | None:
        return float(self.frame["lr"].iloc[-1]) if self.diverged and len(self.frame) else None

    @property
    def evaluated(self) -> pd.DataFrame:
        """Only the rows where held-out accuracy was measured."""
        return self.frame.dropna(subset=["acc"])

    def bounds(self, *, method: str | None = None, divisor: float | None = None):
        """LR bounds from this curve (see ``sctune.bounds``)."""
        from .bounds import bounds_from_frame, bounds_kwargs

        cfg = self.config
        method = method or cfg.method
        kw = bounds_kwargs(cfg, method=method, diverged=self.diverged)
        if divisor is not None:
            kw["divisor"] = divisor
        return bounds_from_frame(self.frame, method=method, **kw)


def range_test(model: nn.Module, optimizer: Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
               cfg: RangeTestConfig, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               val: tuple[torch.Tensor, torch.Tensor] | None = None, metric: MetricFn | None = None,
               amp_dtype: torch.dtype | None = None, restore: bool = True,
               recalibrate_x: torch.Tensor | None = None) -> RangeTestResult:
    """Run the LR range test on any model; accuracy from ``val`` (x, y) or a user ``metric``.

    ``recalibrate_x`` (training inputs): recompute BatchNorm statistics from them before every
    evaluation (``cfg.bn_recalibrate``), so eval-mode accuracy reflects the current weights.

    ``batches`` is re-iterated (as epochs) until ``cfg.num_iter`` steps. With ``restore`` the
    model weights and buffers, optimizer state and all RNG states are put back bit for bit.
    """
    if val is None and metric is None:
        raise ValueError("range_test needs held-out data (val=(x, y)) or a metric function")
    if metric is None:
        x_val, y_val = val
        metric = lambda m: evaluate(m, x_val, y_val, batch_size=1024, amp_dtype=amp_dtype)  # noqa: E731
    if cfg.bn_recalibrate and recalibrate_x is not None:
        user_metric = metric

        def metric(m: nn.Module) -> tuple[float, float]:
            recalibrate_bn(m, recalibrate_x)
            return user_metric(m)
    timed_metric = metric
    eval_s = [0.0]

    def metric(m: nn.Module) -> tuple[float, float]:
        t0 = time.perf_counter()
        try:
            return timed_metric(m)
        finally:
            eval_s[0] += time.perf_counter() - t0
    criterion = criterion or nn.CrossEntropyLoss()
    saved = None
    if restore:
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), rng_state(),
                 model.training)
    scheduler = range_ramp(optimizer, start_lr=cfg.start_lr, end_lr=cfg.end_lr, num_iter=cfg.num_iter,
                           step_mode=cfg.step_mode)
    rows: list[tuple] = []
    state = {"avg": 0.0, "best": math.inf, "reason": "completed"}

    def on_step(info: StepInfo) -> bool:
        loss = info.loss.item()  # the range test needs every step's loss on the host
        i = info.step
        if not math.isfinite(loss):
            rows.append((i, info.lr, loss, math.nan, math.nan, math.nan))
            state["reason"] = f"diverged: non-finite loss at lr {info.lr:.4g}"
            return True
        # EMA with bias correction (pytorch-lr-finder's smooth_f): early points are not dragged to 0.
        state["avg"] = cfg.smooth_f * loss + (1 - cfg.smooth_f) * state["avg"]
        smooth = state["avg"] / (1 - (1 - cfg.smooth_f) ** (i + 1))
        acc = val_loss = math.nan
        if i == 0:
            # The untrained model's accuracy: where the learned range is measured from. Evaluated before the
            # first update (row 0 is the step at start_lr, Smith's LR 0), as the authors' curves start at chance.
            val_loss, acc = state.pop("untrained")
        elif (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.num_iter:
            val_loss, acc = metric(model)
        rows.append((i, info.lr, loss, smooth, acc, val_loss))
        state["best"] = min(state["best"], smooth)
        state.setdefault("first", smooth)
        # Diverged: diverge_th x the best *and* worse than the untrained start. The relative rule alone
        # fires on noise once the training loss nears zero (digits: 0.005 -> 0.03 at 100% accuracy).
        if i > 0 and smooth > cfg.diverge_th * state["best"] and smooth > state["first"]:
            state["reason"] = (f"diverged: smoothed loss {smooth:.4g} > {cfg.diverge_th} x best {state['best']:.4g} "
                               f"and above the starting {state['first']:.4g}")
            return True
        return False

    try:
        state["untrained"] = metric(model)
        eval_before = eval_s[0]  # evaluations after this one happen inside the timed loop
        t_start = time.perf_counter()
        run_steps(model, optimizer, batches, criterion=criterion, scheduler=scheduler, num_steps=cfg.num_iter,
                  on_step=on_step, amp_dtype=amp_dtype)
    finally:
        if saved is not None:
            model_state, opt_state, rng, training = saved
            model.load_state_dict(model_state)
            optimizer.load_state_dict(opt_state)
            set_rng_state(rng)
            model.train(training)
    loop_s = time.perf_counter() - t_start
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    if state["reason"] != "completed":
        log.info("range test stopped early after %d of %d steps (%s)", len(frame), cfg.num_iter, state["reason"])
    return RangeTestResult(frame=frame, config=cfg, stop_reason=state["reason"],
                           train_seconds=max(loop_s - (eval_s[0] - eval_before), 0.0), eval_seconds=eval_s[0])


def run_range_test(train_cfg: TrainConfig, rt_cfg: RangeTestConfig, *, weight_decay: float, seed: int,
                   data: DatasetSplits | None = None, momentum: float | None = None,
                   device: torch.device | str | None = None) -> RangeTestResult:
    """Build data, model and optimizer from ``train_cfg`` and run one range test.

    Uses the task's model with ``weight_decay`` and dropout from the config, SGD with fixed
    momentum (Smith ran his range tests at momentum 0.9, ``baseline.momentum``).
    """
    dev = resolve_device(train_cfg.device) if device is None else torch.device(device)
    seed_everything(seed, deterministic=train_cfg.deterministic)
    data = load_dataset(train_cfg.task) if data is None else data
    model = build_model(train_cfg.task.model, num_classes=data.num_classes, input_shape=data.input_shape,
                        dropout=train_cfg.reg.dropout).to(dev)
    mom = train_cfg.baseline.momentum if momentum is None else momentum
    optimizer = make_optimizer(model, train_cfg, lr=rt_cfg.end_lr, weight_decay=weight_decay, momentum=mom)
    loader = DeviceLoader(data.x_train, data.y_train, batch_size=train_cfg.batch_size, device=dev,
                          augment=data.augment, seed=seed)
    n_eval = min(rt_cfg.eval_samples, len(data.y_val))
    val = (data.x_val[:n_eval].to(dev), data.y_val[:n_eval].to(dev))
    criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.reg.label_smoothing)
    # a fixed subset (no RNG draw, so the training trajectory is the same with or without it)
    recal = data.x_train[torch.linspace(0, len(data.x_train) - 1, min(rt_cfg.recal_samples, len(data.x_train))).long()]
    result = range_test(model, optimizer, loader, cfg=rt_cfg, criterion=criterion, val=val,
                        amp_dtype=amp_dtype_for(train_cfg, dev), restore=False, recalibrate_x=recal.to(dev))
    return dataclasses.replace(result, weight_decay=weight_decay, seed=seed,
                               full_training_steps=train_cfg.epochs * len(loader))
