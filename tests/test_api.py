"""The Python entry points without YAML: ``sctune.tune(model_fn, data_fn, budget=...)`` returns the recommended
configuration, and a driver script calling ``run(..., exist_ok=True)`` can be run again."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sctune.service.experiment import UsageError, prepare


def wine():
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_wine(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    sc = StandardScaler().fit(xtr)
    f = lambda a: torch.tensor(sc.transform(a), dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte), 3, False


def small_mlp(num_classes, input_shape, dropout=0.0):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 32), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(32, num_classes))


def test_an_existing_experiment_is_resumed_with_exist_ok_and_the_error_speaks_python(tmp_path):
    from sctune.search import run

    storage = tmp_path / "res"
    run(None, name="x", storage_path=storage, stage="plan")  # nothing written by a dry run
    (storage / "x").mkdir(parents=True)
    (storage / "x" / "state.json").write_text(json.dumps({"done": ["range"], "name": "x"}))
    with pytest.raises(UsageError, match="resume=True, or exist_ok=True"):
        prepare(None, name="x", storage_path=storage)
    _, exp, state = prepare(None, name="x", storage_path=storage, exist_ok=True)
    assert exp == storage / "x" and state["done"] == ["range"]


@pytest.mark.ray
@pytest.mark.slow
def test_tune_returns_the_recommendation(tmp_path, monkeypatch):
    import sctune

    monkeypatch.chdir(tmp_path)
    rec = sctune.tune(small_mlp, wine, budget=8, smoke=True, name="t")
    for key in ("max_lr", "div_factor", "weight_decay", "dropout", "batch_size", "epochs", "optimizer"):
        assert key in rec, rec
    assert "lr" not in rec and rec["test_acc_mean"] > 0.6, rec
    assert "OneCycleLR(" in rec["snippet"]
    assert (tmp_path / "sctune_results" / "t" / "best.json").exists()
    again = sctune.tune(small_mlp, wine, budget=8, smoke=True, name="t")  # rerunnable: read back, not rerun
    assert again["max_lr"] == rec["max_lr"] and again["test_acc_mean"] == rec["test_acc_mean"]
