"""sctune.core.curves and sctune.present.report: the stage figures (range_test_figure and bounds_markdown are
tested in test_tensorboard.py, beside their TensorBoard use)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd

from sctune.core.curves import range_summary_figure
from sctune.present.report import search_figure


def _curves() -> pd.DataFrame:
    rows = []
    for wd in (0.0, 1e-4):
        for seed in range(2):
            n = 40
            lr = np.linspace(0.0, 3.0, n)
            acc = np.where(np.arange(n) % 2 == 0, np.clip(0.1 + lr, 0, 0.9), np.nan)
            rows.append(pd.DataFrame({"step": np.arange(n), "lr": lr, "loss": 2.3 - 0.5 * lr, "acc": acc,
                                      "smooth_loss": 2.3 - 0.5 * lr, "weight_decay": wd, "seed": seed}))
    return pd.concat(rows, ignore_index=True)


BOUNDS = {"per_weight_decay": {"0": {"status": "ok", "n_ok": 2, "n_total": 2, "min_lr": 0.25, "max_lr": 1.0},
                               "0.0001": {"status": "flat", "n_ok": 0, "n_total": 2}},
          "chosen": {"min_lr_bound": 0.25, "max_lr_bound": 1.0},
          "verdict": {"learn_lr": 0.8, "top_lr": 2.9, "headroom": 3.6}}


def _vlines(ax) -> dict[str, float]:
    return {ln.get_gid(): float(ln.get_xdata()[0]) for ln in ax.get_lines() if ln.get_gid()}


def test_range_summary_figure_marks_each_weight_decays_bounds_and_the_chosen_band():
    fig = range_summary_figure(_curves(), BOUNDS, title="t")
    ax_acc, ax_loss = fig.axes
    for ax in (ax_acc, ax_loss):
        assert _vlines(ax) == {"min_lr:wd=0": 0.25, "max_lr:wd=0": 1.0}  # the flat WD has no bounds
    labels = ax_acc.get_legend_handles_labels()[1]
    assert labels[:2] == ["wd=0 [ok, 2/2 ok]", "wd=0.0001 [flat, 0/2 ok]"]
    assert "chosen bounds" in labels and any(lb.startswith("high band (3.6x") for lb in labels)
    assert fig._suptitle.get_text() == "t" and ax_loss.get_xscale() == "linear"
    assert range_summary_figure(_curves(), {}, log_x=True).axes[1].get_xscale() == "log"


def test_search_figure_writes_a_png_or_says_there_is_nothing(tmp_path):
    summary = pd.DataFrame({"max_lr": [0.1, 0.5, 1.0], "weight_decay": [1e-5, 1e-4, 1e-3],
                            "final_val/acc": [0.8, 0.9, 0.2], "status": ["completed", "pruned", "diverged"]})
    out = tmp_path / "search.png"
    assert search_figure(summary, "val/acc", out) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not search_figure(summary.iloc[:0], "val/acc", tmp_path / "none.png")
    assert not search_figure(summary.assign(max_lr=0.1, weight_decay=0.0), "val/acc", tmp_path / "flat.png")
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "flat.png").exists()


def test_figures_need_no_pyplot(tmp_path):
    """Bare Figures: safe in Ray workers, no global backend switch, nothing kept in pyplot's registry."""
    code = ("import sys, pandas as pd; from sctune.present.report import search_figure; "
            "s = pd.DataFrame({'max_lr': [0.1, 1.0], 'final_val/acc': [0.5, 0.9], 'status': ['completed'] * 2}); "
            "assert search_figure(s, 'val/acc', sys.argv[1]); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.png")], check=True, timeout=120)


def test_range_lines_show_the_top_and_the_recommended_max_lr_with_their_reasons(capsys, tmp_path):
    from sctune.present.report import print_bounds, write_report

    chosen = {"max_lr_bound": 3.0, "min_lr_bound": 0.75, "wd_prior": 1e-4, "recipe_max_lr": 1.2,
              "max_lr_reason": "the top of the band where held-out accuracy stays high",
              "recipe_reason": "max_lr / 4, in the band"}
    bounds = {"chosen": chosen, "source": "range test", "verdict": {"message": "Super-convergence likely"},
              "per_weight_decay": {"0.0001": {"status": "ok", "max_lr": 3.0, "recommended_max_lr": 1.2}}}
    print_bounds(bounds)
    lines = capsys.readouterr().err.splitlines()
    assert "[range] max_lr 3: the top of the band where held-out accuracy stays high" in lines
    assert "[range] recommended max_lr 1.2 (the first point's): max_lr / 4, in the band" in lines
    # report.md: the same two lines under stage 1, and the recommendation per weight decay in its table
    report = write_report(tmp_path, spec_path="space.yaml", bounds=bounds, summary=None, best=None,
                          metric="val/acc").read_text()
    assert "- max_lr 3: the top of the band where held-out accuracy stays high" in report
    assert "- recommended max_lr 1.2 (the first point's): max_lr / 4, in the band" in report
    assert re.search(r"recommended max_lr \|", report) and re.search(r"\|\s+1\.2 \|", report)
