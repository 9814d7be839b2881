"""Models by name.

Built-ins: ``digits_cnn`` (small CNN for 8x8 digits), ``mnist1d_cnn`` (1-D CNN for MNIST-1D),
``mlp``, the paper's CIFAR ResNets ``resnet20`` / ``resnet56`` / ``resnet110`` (He et al. 2016,
3 stages of 16/32/64 channels, ``(depth - 2) / 6`` basic blocks each), and any torchvision
classification model as ``torchvision:<name>`` (e.g. ``torchvision:resnet18``), built untrained.
Every builder takes ``dropout`` so regularization can be searched jointly with weight decay.

``register_model`` adds a user's own model under a new name; ``task.model: module:builder`` (a function or
an ``nn.Module`` class taking ``num_classes, input_shape, dropout``) names one without registering it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import ConfigError
from .tasks import MODELS

# builder(num_classes, input_shape (C, ...), dropout) -> nn.Module
ModelFn = Callable[[int, tuple[int, ...], float], nn.Module]


def register_model(name: str, fn: ModelFn | None = None, *, overwrite: bool = False):
    """Register ``fn(num_classes, input_shape, dropout) -> nn.Module``; usable as a decorator."""
    return MODELS.register(name, fn, overwrite=overwrite)


def model_fn(name: str) -> ModelFn:
    """The builder a model name stands for: registered, or ``module:builder`` (imported here)."""
    return MODELS.lookup(name)


def build_model(name: str, *, num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
    if name.startswith("torchvision:"):
        return _torchvision_model(name.split(":", 1)[1], num_classes, input_shape, dropout)
    return model_fn(name)(num_classes, tuple(input_shape), dropout)


def _torchvision_model(name: str, num_classes: int, input_shape: tuple[int, ...], dropout: float) -> nn.Module:
    from torchvision import models as tvm

    if name not in tvm.list_models(module=tvm):
        raise ConfigError("task.model", f"unknown torchvision classification model {name!r}")
    model = tvm.get_model(name, weights=None, num_classes=num_classes)
    if dropout > 0:
        # torchvision heads differ; put dropout in front of the final Linear wherever it is.
        for parent in model.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Linear) and child.out_features == num_classes:
                    setattr(parent, child_name, nn.Sequential(nn.Dropout(dropout), child))
                    return model
    return model


@register_model("digits_cnn")
def digits_cnn(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
    """~20k parameters: two conv blocks with BatchNorm for 8x8 single-channel digits."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(64, num_classes),
    )


@register_model("mnist1d_cnn")
def mnist1d_cnn(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
    """The MNIST-1D reference ConvNet shape (3 conv layers of 25 channels) with BatchNorm."""
    c, length = input_shape[0], input_shape[-1]
    w = 32
    return nn.Sequential(
        nn.Conv1d(c, w, 5, padding=2, bias=False), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Conv1d(w, w, 3, padding=1, stride=2, bias=False), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Conv1d(w, w, 3, padding=1, stride=2, bias=False), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(w * math.ceil(math.ceil(length / 2) / 2), num_classes),
    )


@register_model("mlp")
def mlp(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
    d = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(256, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:  # projection shortcut (option B)
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs, as in the super-convergence paper (ResNet-20/56/110)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 56, 110...), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, c = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(BasicBlock(c, width, stride=2 if (i > 0 and j == 0) else 1))
                c = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(64, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


for _depth in (20, 56, 110):
    register_model(f"resnet{_depth}",
                   lambda nc, shape, dropout, _d=_depth: CifarResNet(_d, nc, shape[0], dropout))
