"""A task no shipped space tunes for, as a newcomer writes it: scikit-learn's wine (178 samples, 13 features,
3 cultivars) and sctune's built-in ``mlp``, named in a space file with only ``task:``
(``benchmarks/spaces/wine.yaml``). Benchmark 7 reads where its full trainings are best in the range test's
band; ``tests/test_task_only.py`` runs the same data end to end against Adam."""

from __future__ import annotations

import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler


def wine(task):
    """-> x_train, y_train, x_test, y_test, num_classes, augment (sctune carves validation from train)."""
    x, y = load_wine(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_tr)

    def scaled(a):
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    return scaled(x_tr), torch.tensor(y_tr), scaled(x_te), torch.tensor(y_te), 3, False
