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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

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

    def suggestion(self) -> float | None:
        """The suggested max LR for one cycle (torch-lr-finder's ``suggestion``): Smith's max bound, the top of
        the band where held-out accuracy stays high; None when the curve gives no bounds (see ``bounds()``)."""
        b = self.bounds()
        return b.max_lr if b.status == "ok" else None

    def plot(self, *, log_x: bool | None = None, path: str | None = None):
        """Accuracy and loss vs LR with the bounds marked (a matplotlib ``Figure``; saved to ``path`` if given).
        ``log_x`` defaults to the ramp's own axis (log for ``step_mode: exp``)."""
        from .curves import range_test_figure

        b = self.bounds()
        fig = range_test_figure({"range test": self.frame}, {"range test": b} if b.status == "ok" else None,
                                log_x=self.config.step_mode == "exp" if log_x is None else log_x)
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig

    def bounds(self, *, method: str | None = None, divisor: float | None = None):
        """LR bounds from this curve (see ``sctune.core.bounds``)."""
        from .bounds import bounds_from_frame, bounds_kwargs

        cfg = self.config
        method = method or cfg.method
        kw = bounds_kwargs(cfg, method=method, diverged=self.diverged)
        if divisor is not None:
            kw["divisor"] = divisor
        return bounds_from_frame(self.frame, method=method, **kw)


_X_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "features")
_Y_KEYS = ("y", "label", "labels", "target", "targets")


def default_batch_fn(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from a DataLoader's batch: a tuple/list (its first two items) or a dict with one of
    ``_X_KEYS`` and one of ``_Y_KEYS`` (torchvision and Hugging Face datasets' usual names)."""
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _X_KEYS if k in batch), None)
        y = next((batch[k] for k in _Y_KEYS if k in batch), None)
        if x is None or y is None:
            raise ValueError(f"a dict batch needs an input key ({', '.join(_X_KEYS)}) and a target key "
                             f"({', '.join(_Y_KEYS)}), got keys {sorted(batch)}; pass batch_fn=")
        return x, y
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"cannot read (inputs, targets) from a {type(batch).__name__} batch; pass batch_fn=")


class _Batches:
    """Re-iterable (as epochs) view of a loader through ``batch_fn``, moved to ``device``."""

    def __init__(self, source: Iterable, batch_fn: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device):
        self.source, self.batch_fn, self.device = source, batch_fn, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in self.source:
            x, y = self.batch_fn(b)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _loader_metric(val: Iterable, batch_fn, device: torch.device, amp_dtype) -> MetricFn:
    """Cross-entropy and top-1 accuracy over a whole held-out loader."""
    batches = _Batches(val, batch_fn, device)

    @torch.no_grad()
    def metric(m: nn.Module) -> tuple[float, float]:
        training = m.training
        m.eval()
        loss = correct = n = 0.0
        for x, y in batches:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = m(x)
            loss += nn.functional.cross_entropy(out.float(), y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
        m.train(training)
        if not n:
            raise ValueError("the held-out loader (val=) yielded no samples")
        return loss / n, correct / n

    return metric


def range_test(model: nn.Module, optimizer: Optimizer, batches: Iterable[Any], *,
               cfg: RangeTestConfig | None = None,
               criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               val: tuple[torch.Tensor, torch.Tensor] | Iterable[Any] | None = None, metric: MetricFn | None = None,
               amp_dtype: torch.dtype | None = None, restore: bool = True,
               recalibrate_x: torch.Tensor | None = None,
               batch_fn: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None) -> RangeTestResult:
    """Run the LR range test on any model; accuracy from ``val`` or a user ``metric``.

    ``batches`` and ``val`` are DataLoaders (or any re-iterable of batches) whose batches are (inputs, targets)
    tuples or dicts, read by ``batch_fn`` (default ``default_batch_fn``) and moved to the model's device;
    ``val`` may also be an (x, y) pair of tensors. ``cfg`` defaults to ``RangeTestConfig()``.

    ``recalibrate_x`` (training inputs): recompute BatchNorm statistics from them before every
    evaluation (``cfg.bn_recalibrate``), so eval-mode accuracy reflects the current weights.

    ``batches`` is re-iterated (as epochs) until ``cfg.num_iter`` steps. With ``restore`` the
    model weights and buffers, optimizer state and all RNG states are put back bit for bit.
    """
    if val is None and metric is None:
        raise ValueError("range_test needs held-out data (val=(x, y) or a DataLoader) or a metric function")
    cfg = RangeTestConfig() if cfg is None else cfg
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if batch_fn is not None or not isinstance(batches, DeviceLoader):
        batches = _Batches(batches, batch_fn or default_batch_fn, device)
    if metric is None:
        if isinstance(val, (tuple, list)) and len(val) == 2 and all(isinstance(v, torch.Tensor) for v in val):
            x_val, y_val = val
            metric = lambda m: evaluate(m, x_val, y_val, batch_size=1024, amp_dtype=amp_dtype)  # noqa: E731
        else:
            metric = _loader_metric(val, batch_fn or default_batch_fn, device, amp_dtype)
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
