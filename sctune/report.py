"""Readable outputs: ``best.json``, ``report.md`` and the search plot, from the stage results."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


def search_figure(summary: pd.DataFrame, metric: str, path: Path) -> bool:
    """Final metric vs max_lr and vs weight decay, coloured by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = f"final_{metric}"
    if summary.empty or col not in summary:
        return False
    xs = [c for c in ("max_lr", "weight_decay", "dropout") if c in summary and summary[c].nunique() > 1]
    if not xs:
        return False
    fig, axes = plt.subplots(1, len(xs), figsize=(4.2 * len(xs), 3.4), squeeze=False)
    colors = {"completed": "tab:blue", "pruned": "tab:gray", "diverged": "tab:red", "error": "black"}
    for ax, x in zip(axes[0], xs, strict=True):
        for status, g in summary.groupby("status"):
            ax.scatter(g[x], g[col], label=status, color=colors.get(status, "tab:purple"), alpha=0.8, s=28)
        if x in ("max_lr", "weight_decay") and (summary[x] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(col)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("search trials: final metric vs parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt_bounds_table(bounds: dict[str, Any]) -> str:
    rows = []
    for key, v in bounds.get("per_weight_decay", {}).items():
        spread = (v.get("spread") or {}).get("max_lr") or {}
        rows.append({"weight decay": key, "status": v.get("status"), "ok seeds": f"{v.get('n_ok')}/{v.get('n_total')}",
                     "max_lr (median)": v.get("max_lr"), "max_lr range": _range(spread),
                     "min_lr (median)": v.get("min_lr"), "peak acc": v.get("peak_acc"),
                     "plateau (decades)": v.get("width_decades")})
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g") if rows else "(no range tests)"


def _range(spread: dict[str, Any]) -> str:
    if spread.get("min") is None:
        return "-"
    return f"{spread['min']:.3g}..{spread['max']:.3g}"


def write_report(root: Path, *, spec_path: str, bounds: dict[str, Any] | None, summary: pd.DataFrame | None,
                 best: dict[str, Any] | None, metric: str, wall_s: float | None = None) -> Path:
    lines = [f"# sctune report: {root.name}", "", f"Search space: `{spec_path}`", ""]
    if wall_s is not None:
        lines += [f"Wall time of this invocation: {wall_s:.0f} s", ""]
    if bounds is not None:
        chosen = bounds.get("chosen") or {}
        verdict = bounds.get("verdict") or {}
        lines += ["## Stage 1: LR range tests", "", verdict.get("message", ""), "",
                  _fmt_bounds_table(bounds), ""]
        if chosen:
            lines += [f"Chosen ({bounds.get('source')}): max_lr bound **{chosen['max_lr_bound']:.4g}**, "
                      f"min_lr bound **{chosen['min_lr_bound']:.4g}**, weight-decay prior **{chosen['wd_prior']:g}**.",
                      ""]
        if (root / "range_test" / "range_test.png").exists():
            lines += ["![range test](range_test/range_test.png)", ""]
    if summary is not None and not summary.empty:
        counts = summary["status"].value_counts().to_dict()
        lines += ["## Stage 2: joint one-cycle + regularization search", "",
                  f"{len(summary)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", "",
                  summary.head(10).to_markdown(index=False, floatfmt=".4g"), ""]
        if (root / "search.png").exists():
            lines += ["![search](search.png)", ""]
    if best is not None:
        final = best.get("final") or {}
        lines += ["## Best configuration and final fit", "", "```json",
                  pd.Series(best.get("config", {})).to_json(indent=2), "```", ""]
        if final.get("test_acc_mean") is not None:
            lines += [f"Final fit over {final['n']} seeds: test accuracy **{final['test_acc_mean']:.4f}** "
                      f"± {final['test_acc_std']:.4f} (std).", ""]
    lines += ["## TensorBoard", "", "```", f"tensorboard --logdir {(root / 'tensorboard').resolve()} "
              "--host 127.0.0.1 --port 6006", "```", ""]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out
