"""Benchmark 1's task that no shipped space tunes for: the README walk-through's breast-cancer data and MLP,
copied from README.md ("Your own data and models") so the benchmark runs it as a new user would."""

from __future__ import annotations

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn


def breast_cancer(task):
    """-> x_train, y_train, x_test, y_test, num_classes, augment (sctune carves validation from train)."""
    x, y = load_breast_cancer(return_X_y=True)  # 569 tumours, 30 features, bundled with scikit-learn
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)

    def scaled(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return scaled(x_tr), torch.tensor(y_tr), scaled(x_te), torch.tensor(y_te), 2, False


class TabularNet(nn.Module):
    """sctune builds it as TabularNet(num_classes, input_shape, dropout)."""

    def __init__(self, num_classes, input_shape, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_shape[0], 64), nn.BatchNorm1d(64), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.net(x)
