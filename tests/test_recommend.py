"""The answer in one place (sctune.present.recommend): only the keys that decide a training, the expected accuracy, and a
PyTorch snippet that, executed on a tiny model, steps its LR and momentum exactly as sctune's own schedule does
for the same configuration; search.png's log-axis tick labels do not overlap."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch

from sctune.core.config import TrainConfig
from sctune.core.schedules import build_schedule
from sctune.core.train import make_optimizer
from sctune.present.recommend import answer_lines, recommended, torch_snippet


def _trajectory(optimizer, scheduler, steps: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(steps):
        g = optimizer.param_groups[0]
        out.append((g["lr"], g["betas"][0] if "betas" in g else g["momentum"]))
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_snippet_reproduces_sctunes_schedule(optimizer):
    cfg = TrainConfig(epochs=5, batch_size=16, optimizer=optimizer).with_flat(
        max_lr=0.37, div_factor=7.5, cycle_frac=0.8, annihilation_factor=300.0, max_momentum=0.93,
        min_momentum=0.82, weight_decay=3e-4)
    flat = cfg.to_flat()
    steps_per_epoch = 7

    def tiny():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))

    ours_opt = make_optimizer(tiny(), cfg)
    ours = _trajectory(ours_opt, build_schedule(ours_opt, cfg, steps_per_epoch=steps_per_epoch),
                       cfg.epochs * steps_per_epoch)
    scope = {"model": tiny(), "train_loader": [None] * steps_per_epoch}
    exec(torch_snippet(flat), scope)  # the user's copy, run as written
    theirs = _trajectory(scope["optimizer"], scope["scheduler"], cfg.epochs * steps_per_epoch)
    assert type(scope["optimizer"]) is type(ours_opt)
    assert [v for pair in theirs for v in pair] == pytest.approx([v for pair in ours for v in pair], rel=1e-9)
    # weight decay on the same tensors: matrices decayed, biases and the norm's scale not
    decayed = [[p.shape for p in g["params"]] for g in scope["optimizer"].param_groups if g["weight_decay"] > 0]
    assert decayed == [[p.shape for p in g["params"]] for g in ours_opt.param_groups if g["weight_decay"] > 0]


def test_answer_shows_only_what_matters_in_order():
    cfg = TrainConfig(epochs=12, batch_size=64).with_flat(max_lr=0.5, div_factor=10.0, dropout=0.1).to_flat()
    rec = recommended(cfg)
    assert "lr" not in rec and not any(k.startswith("clr_") or k == "milestones_frac" for k in rec)
    assert rec["min_lr"] == pytest.approx(0.05) and rec["final_lr"] == pytest.approx(0.05 / 1000)
    best = {"config": cfg, "final": {"test_acc_mean": 0.98, "test_acc_std": 0.004, "n": 3}}
    bounds = {"chosen": {"min_lr_bound": 0.2, "max_lr_bound": 0.8, "wd_prior": 1e-4},
              "verdict": {"message": "Super-convergence likely"}}
    text = "\n".join(answer_lines(best, bounds))
    order = [text.index(s) for s in ("max_lr", "Expected accuracy: 0.9800 ± 0.0040", "OneCycleLR(",
                                      "LR bounds (stage 1)", "Super-convergence likely")]
    assert order == sorted(order), text
    md = "\n".join(answer_lines(best, bounds, markdown=True))
    assert md.startswith("## Recommended configuration") and "```python" in md


def test_search_png_log_ticks_do_not_overlap(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sctune.present import report

    saved = {}
    real_savefig = Figure.savefig

    def keep(fig, *a, **k):
        saved["fig"] = fig
        return real_savefig(fig, *a, **k)

    summary = pd.DataFrame({"max_lr": [0.31, 0.42, 0.55, 0.68, 0.83, 0.97], "weight_decay": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
                            "val/acc_tail": [0.9, 0.92, 0.95, 0.93, 0.91, 0.9], "status": ["completed"] * 6})
    monkeypatch.setattr(Figure, "savefig", keep)  # the figure as written to search.png
    assert report.search_figure(summary, "val/acc_tail", tmp_path / "search.png")
    fig = saved["fig"]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
        labels = [t for t in labels if ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
        assert 2 <= len(labels) <= 6, [t.get_text() for t in labels]
        boxes = [t.get_window_extent(renderer) for t in labels]
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), [t.get_text() for t in labels]
