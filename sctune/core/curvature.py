"""Hessian-free estimate of the locally optimal learning rate (paper section 4, METHOD.md section 6).

Curvature along the step by finite differences, AdaSecant form ``eps* ~ dtheta / dg``, reduced to
one number per step with sums over all weights and smoothed with an EMA (``m <- 0.9 m + 0.1 est``).

Two forms:

* ``"sgd"`` (the paper's): from three consecutive weight snapshots, with plain SGD's
  ``g_i = (theta_i - theta_{i+1}) / eps``::

      est_i = eps * sum|theta_{i+1} - theta_i| / sum|2 theta_{i+1} - theta_i - theta_{i+2}|

  Exact for plain SGD; with momentum the weight update is no longer ``eps * g`` and the
  estimate is biased (momentum makes the steps longer than ``eps * g``).
* ``"secant"`` (default): the same secant ratio with the gradients the optimizer actually
  saw, ``est_i = sum|theta_{i+1} - theta_i| / sum|g_{i+1} - g_i|``. It needs no assumption about
  the update rule, so it stays valid with momentum, Nesterov and AdamW - the optimizers sctune
  trains with. On a quadratic both forms return exactly ``1 / curvature``.

Call ``observe()`` once per step after ``backward()`` and before ``optimizer.step()``.
Values stay on the device (no host sync per step); ``value``/``ema`` give floats on demand.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


class HessianFreeLR:
    def __init__(self, params: Iterable[torch.nn.Parameter], *, mode: str = "secant", beta: float = 0.9):
        if mode not in ("secant", "sgd"):
            raise ValueError(f"mode must be 'secant' or 'sgd', got {mode!r}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.params = [p for p in params if p.requires_grad]
        self.mode, self.beta = mode, beta
        self._thetas: list[torch.Tensor] = []  # last snapshots, newest last
        self._grads: list[torch.Tensor] = []
        self._lrs: list[float] = []
        self.value: torch.Tensor | None = None  # latest raw estimate
        self._ema: torch.Tensor | None = None
        self.count = 0

    def observe(self, lr: float) -> torch.Tensor | None:
        """Record theta_i (and g_i) at the current step; return the newest estimate or None."""
        theta = _flat(self.params)
        self._thetas = (self._thetas + [theta])[-3:]
        self._lrs = (self._lrs + [lr])[-3:]
        est = None
        if self.mode == "secant":
            grad = _flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params)
            self._grads = (self._grads + [grad])[-2:]
            if len(self._thetas) >= 2:
                dtheta = (self._thetas[-1] - self._thetas[-2]).abs().sum()
                dgrad = (self._grads[-1] - self._grads[-2]).abs().sum()
                est = dtheta / dgrad
        elif len(self._thetas) == 3:
            t0, t1, t2 = self._thetas
            top = (t1 - t0).abs().sum()
            bot = (2 * t1 - t0 - t2).abs().sum()
            est = self._lrs[0] * top / bot
        if est is not None and torch.isfinite(est):
            self.value = est
            self._ema = est.clone() if self._ema is None else self.beta * self._ema + (1 - self.beta) * est
            self.count += 1
        return est

    @property
    def ema(self) -> float | None:
        return None if self._ema is None else float(self._ema)

    @property
    def last(self) -> float | None:
        return None if self.value is None else float(self.value)
