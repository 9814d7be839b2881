"""The one training loop: used by the range test, every search trial, the final fit and benchmarks.

``run_steps`` is the inner loop (forward, backward, optimizer step, scheduler step, callback);
``fit`` wraps it into a full run of a ``TrainConfig`` with per-epoch evaluation, checkpoint state
and resume. Per-step work stays on the device: losses are summed as tensors and synchronised once
per epoch, unless a callback asks for a float.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .config import TrainConfig
from .curvature import HessianFreeLR
from .data import DatasetSplits, DeviceLoader, load_dataset, resolve_device
from .models import build_model
from .schedules import build_schedule, current_momentum

log = logging.getLogger(__name__)

# Metric keys, shared with the trainables and TensorBoard.
TRAIN_LOSS, VAL_LOSS, VAL_ACC, TEST_LOSS, TEST_ACC = "train/loss", "val/loss", "val/acc", "test/loss", "test/acc"
LR, MOMENTUM, THROUGHPUT = "lr", "momentum", "perf/samples_per_s"
GPU_MEM = "perf/gpu_mem_peak_mib"  # CUDA only: torch.cuda.max_memory_allocated of the run so far
HF_LR, HF_LR_EMA = "curvature/lr_estimate", "curvature/lr_estimate_ema"
PHASE = "phase"  # where a run is in its schedule (schedules.schedule_phase): ASHA's time axis


def tail_key(metric: str) -> str:
    """The selection score of ``metric``: its mean over a run's last evaluations (``tail_mean``)."""
    return f"{metric}_tail"


def tail_mean(values: list[float], k: int) -> float:
    """Mean of the last ``k`` values. The final epoch alone is one draw of a noisy number (on digits'
    216 validation images one image is 0.46 points, and the annihilation phase's last epochs differ by
    about that much); the mean of the last few, where the LR is already tiny, ranks trials by where they
    ended rather than by their luckiest epoch."""
    tail = values[-k:]
    return float(sum(tail) / len(tail)) if tail else math.nan

# An epoch whose mean training loss exceeds this many times chance level (ln C, the loss of a uniform
# guess) has diverged even if it stayed finite: BatchNorm nets at absurd LRs reach losses ~1e17
# without ever producing a NaN, and such a run never recovers.
DIVERGE_LOSS_FACTOR = 10.0


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """All RNG states, as tensors and plain Python types only, so a checkpoint holding them loads
    with ``torch.load(weights_only=True)`` (numpy arrays are not on that allowlist)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, *, wd_norm_bias: bool = False) -> list[dict]:
    """Weight decay on weights only: norm-layer parameters and biases are exempt unless asked."""
    if wd_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if isinstance(module, _NORM_TYPES) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, *, lr: float | None = None,
                   weight_decay: float | None = None, momentum: float | None = None) -> Optimizer:
    wd = cfg.reg.weight_decay if weight_decay is None else weight_decay
    groups = param_groups(model, wd, wd_norm_bias=cfg.reg.wd_norm_bias)
    if momentum is None:
        momentum = cfg.onecycle.max_momentum if cfg.schedule == "onecycle" else cfg.baseline.momentum
    lr = cfg.baseline.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=cfg.nesterov and momentum > 0)
    # Adam/AdamW: the cyclical momentum is beta1 (OneCycleLR cycles betas[0] when the optimizer has betas)
    adam = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return adam(groups, lr=lr, betas=(momentum, 0.999))


def amp_dtype_for(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA when asked and supported; full precision otherwise."""
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode; restores the mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True)
        yb = y[i:i + batch_size].to(device, non_blocking=True)
        if channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(xb)
        loss_sum += nn.functional.cross_entropy(out.float(), yb, reduction="sum")
        correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(1, len(y))
    return float(loss_sum) / n, float(correct) / n


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> bool:
    """Recompute BatchNorm running statistics from ``x`` for the current weights ("precise BN").

    During the range test the weights move fast; running averages (momentum 0.1) lag behind and
    make eval-mode accuracy swing by tens of points at high LR, drowning Smith's signal. Exact
    statistics for the current weights remove that artefact. Only BatchNorm layers run in train
    mode here (dropout stays off), so no RNG is consumed and training is unaffected (train-mode
    forward passes use batch statistics). Returns False when the model has no BatchNorm.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    was_training = model.training
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the recalibration batches
        bn.train()
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size].to(device, non_blocking=True))
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m
    model.train(was_training)
    return True


def recal_subset(x_train: torch.Tensor, n: int) -> torch.Tensor:
    """The fixed training subset precise BN recomputes statistics from: ``n`` evenly spaced samples (no
    RNG drawn, so a run's trajectory is the same with or without recalibration), as the range test's."""
    return x_train[torch.linspace(0, len(x_train) - 1, min(n, len(x_train))).long()]


@dataclass
class StepInfo:
    step: int  # global step index (0-based) of the step just taken
    lr: float  # LR used for this step
    momentum: float
    loss: torch.Tensor  # this step's training loss (0-dim, on the device; .item() syncs)
    batch_size: int


StepCallback = Callable[[StepInfo], bool | None]  # return True to stop


def run_steps(model: nn.Module, optimizer: Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
              criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              scheduler: LRScheduler | None = None, num_steps: int | None = None, start_step: int = 0,
              on_step: StepCallback | None = None, amp_dtype: torch.dtype | None = None,
              curvature: HessianFreeLR | None = None, loss_sum: torch.Tensor | None = None) -> int:
    """Train on ``batches`` (re-iterated as epochs until ``num_steps``, or one pass if None).

    Returns the number of steps taken. ``loss_sum`` (a 0-dim device tensor) accumulates the
    training loss without a host sync.
    """
    model.train()
    device = next(model.parameters()).device
    taken = 0
    while num_steps is None or taken < num_steps:
        for xb, yb in batches:
            lr = optimizer.param_groups[0]["lr"]
            mom = current_momentum(optimizer)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(xb)
            loss = criterion(out.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if curvature is not None:
                curvature.observe(lr)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if loss_sum is not None:
                loss_sum += loss.detach()
            taken += 1
            stop = on_step(StepInfo(start_step + taken - 1, lr, mom, loss.detach(), len(yb))) if on_step else False
            if stop or (num_steps is not None and taken >= num_steps):
                return taken
        if num_steps is None:
            break
    return taken


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    epochs_run: int = 0
    diverged: bool = False
    stopped_early: bool = False

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


# on_epoch(metrics, state_fn) -> True to stop; state_fn() returns the resumable checkpoint dict.
EpochCallback = Callable[[dict[str, float], Callable[[], dict[str, Any]]], bool | None]


def fit(cfg: TrainConfig, *, data: DatasetSplits | None = None, on_epoch: EpochCallback | None = None,
        state: dict[str, Any] | None = None, device: torch.device | str | None = None,
        test_at_end: bool = False) -> FitResult:
    """Train one run of ``cfg``; evaluate on the validation split after every epoch.

    With ``test_at_end`` the last epoch's metrics also hold one evaluation on the test split
    (``test/loss``, ``test/acc``): the final fit, never the search, looks at test data.

    ``state`` resumes from a dict produced by the ``state_fn`` passed to ``on_epoch`` (model,
    optimizer, scheduler, loader, RNG and history), continuing at the next epoch.
    """
    dev = resolve_device(cfg.device) if device is None else torch.device(device)
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    if dev.type == "cuda":  # GPU_MEM is this run's peak, also in a reused (reuse_actors) worker
        torch.cuda.reset_peak_memory_stats(dev)
    data = load_dataset(cfg.task) if data is None else data
    model = build_model(cfg.task.model, num_classes=data.num_classes, input_shape=data.input_shape,
                        dropout=cfg.reg.dropout).to(dev)
    channels_last = cfg.channels_last and dev.type == "cuda" and data.x_train.dim() == 4
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    loader = DeviceLoader(data.x_train, data.y_train, batch_size=cfg.batch_size, device=dev, augment=data.augment,
                          seed=cfg.seed, channels_last=channels_last)
    scheduler = build_schedule(optimizer, cfg, steps_per_epoch=len(loader))
    result = FitResult(model=model)
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        result.history = list(state["history"])
        start_epoch = int(state["epoch"])
        result.epochs_run = start_epoch
    step_model = torch.compile(model) if cfg.compile else model
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.reg.label_smoothing)
    amp = amp_dtype_for(cfg, dev)
    curv = HessianFreeLR(model.parameters()) if cfg.track_curvature else None
    x_val, y_val = data.x_val.to(dev), data.y_val.to(dev)
    recal_x = recal_subset(data.x_train, cfg.precise_bn_samples).to(dev) if cfg.precise_bn else None
    steps_per_epoch = len(loader)

    def state_fn() -> dict[str, Any]:
        # deepcopy: state_dict() tensors alias the live weights/buffers, so without it a kept
        # checkpoint would silently change as training continues.
        return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                              "rng": rng_state(), "history": list(result.history), "epoch": result.epochs_run})

    last: dict[str, float] = {}

    def remember(info: StepInfo) -> None:  # the LR/momentum *used* by the epoch's last step
        last["lr"], last["momentum"] = info.lr, info.momentum

    for epoch in range(start_epoch, cfg.epochs):
        loss_sum = torch.zeros((), device=dev)
        t0 = time.perf_counter()
        steps = run_steps(step_model, optimizer, loader, criterion=criterion, scheduler=scheduler,
                          num_steps=steps_per_epoch, start_step=epoch * steps_per_epoch, amp_dtype=amp,
                          curvature=curv, loss_sum=loss_sum, on_step=remember)
        train_loss = float(loss_sum) / max(1, steps)  # the one host sync of the epoch
        seconds = time.perf_counter() - t0
        if recal_x is not None:  # statistics for these weights: what the rungs and the selection compare
            recalibrate_bn(model, recal_x, batch_size=cfg.eval_batch_size)
        val_loss, val_acc = evaluate(model, x_val, y_val, batch_size=cfg.eval_batch_size, amp_dtype=amp,
                                     channels_last=channels_last)
        diverged = (not (math.isfinite(train_loss) and math.isfinite(val_loss))
                    or train_loss > DIVERGE_LOSS_FACTOR * math.log(max(2, data.num_classes)))
        metrics: dict[str, float] = {
            "epoch": epoch + 1,
            TRAIN_LOSS: train_loss,
            VAL_LOSS: val_loss,
            VAL_ACC: val_acc,
            LR: last["lr"],
            MOMENTUM: last["momentum"],
            THROUGHPUT: steps * loader.batch_size / max(seconds, 1e-9),
            "diverged": float(diverged),
        }
        if dev.type == "cuda":  # what one trial takes of a shared GPU (--gpus-per-trial packing)
            metrics[GPU_MEM] = torch.cuda.max_memory_allocated(dev) / 2**20
        if curv is not None and curv.count:
            metrics[HF_LR] = curv.last
            metrics[HF_LR_EMA] = curv.ema
        if test_at_end and epoch + 1 == cfg.epochs:
            metrics[TEST_LOSS], metrics[TEST_ACC] = evaluate(
                model, data.x_test.to(dev), data.y_test.to(dev), batch_size=cfg.eval_batch_size, amp_dtype=amp,
                channels_last=channels_last)
        result.history.append(metrics)
        result.epochs_run = epoch + 1
        stop = on_epoch(metrics, state_fn) if on_epoch is not None else False
        if diverged:
            log.warning("training diverged at epoch %d (train loss %s): stopping", epoch + 1, train_loss)
            result.diverged = True
            break
        if stop:
            result.stopped_early = True
            break
    return result
