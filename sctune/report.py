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

    col = metric if metric in summary else f"final_{metric}"  # the selection score (<metric>_tail)
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


def range_summary_figure(curves: pd.DataFrame, bounds: dict[str, Any], *, log_x: bool = False, title: str = ""):
    """Experiment view of stage 1: one colour per weight decay (seeds as thin lines, their median bold),
    median bounds per WD as vertical lines, the chosen bounds shaded, the verdict's plateau marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    per_wd = bounds.get("per_weight_decay", {})
    for i, (wd, g) in enumerate(curves.groupby("weight_decay", sort=True)):
        color = colors[i % len(colors)]
        entry = per_wd.get(f"{wd:g}", {})
        label = f"wd={wd:g} [{entry.get('status', '?')}, {entry.get('n_ok', 0)}/{entry.get('n_total', 0)} ok]"
        for _, run in g.groupby("seed"):
            ev = run.dropna(subset=["acc"])
            ax_acc.plot(ev["lr"], ev["acc"], color=color, lw=0.7, alpha=0.35)
            ax_loss.plot(run["lr"], run["smooth_loss"], color=color, lw=0.7, alpha=0.35)
        ev = g.dropna(subset=["acc"]).groupby("step").agg(lr=("lr", "median"), acc=("acc", "median"))
        ax_acc.plot(ev["lr"], ev["acc"], color=color, lw=2.0, marker="o", ms=3, label=label)
        sm = g.groupby("step").agg(lr=("lr", "median"), loss=("smooth_loss", "median"))
        ax_loss.plot(sm["lr"], sm["loss"], color=color, lw=2.0)
        for key, style in (("min_lr", "--"), ("max_lr", ":")):
            if entry.get(key):
                for ax in (ax_acc, ax_loss):
                    ax.axvline(entry[key], color=color, ls=style, lw=1.2)
    chosen = bounds.get("chosen")
    if chosen:
        for ax in (ax_acc, ax_loss):
            ax.axvspan(chosen["min_lr_bound"], chosen["max_lr_bound"], color="gold", alpha=0.15,
                       label="chosen bounds" if ax is ax_acc else None)
    verdict = bounds.get("verdict") or {}
    if verdict.get("learn_lr") and verdict.get("top_lr"):
        y = ax_acc.get_ylim()[0]
        ax_acc.hlines(y, verdict["learn_lr"], verdict["top_lr"], color="black", lw=5,
                      label=f"high band ({verdict.get('headroom') or 0:.1f}x the learning LR)")
    upper = curves["smooth_loss"].iloc[: max(1, len(curves) // 20)].max()
    if pd.notna(upper):
        ax_loss.set_ylim(0, 1.5 * upper)
    if log_x:
        ax_loss.set_xscale("log")
    ax_acc.set_ylabel("held-out accuracy")
    ax_loss.set_ylabel("smoothed training loss")
    ax_loss.set_xlabel("learning rate (dashed: min_lr, dotted: max_lr per WD)")
    ax_acc.legend(fontsize="small", loc="lower right")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    fig.suptitle(title or "LR range test")
    return fig


def _fmt_bounds_table(bounds: dict[str, Any]) -> str:
    rows = []
    for key, v in bounds.get("per_weight_decay", {}).items():
        spread = (v.get("spread") or {}).get("max_lr") or {}
        rows.append({"weight decay": key, "status": v.get("status"), "ok seeds": f"{v.get('n_ok')}/{v.get('n_total')}",
                     "max_lr (median)": v.get("max_lr"), "max_lr range": _range(spread),
                     "min_lr (median)": v.get("min_lr"), "lower bound": v.get("lower_bound"),
                     "peak acc": v.get("peak_acc"), "confidence": v.get("confidence"),
                     "super-convergence": _verdict_word((v.get("verdict") or {}).get("possible"),
                                                        v.get("verdict") is not None)})
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g") if rows else "(no range tests)"


def _verdict_word(possible: bool | None, measured: bool) -> str:
    if not measured:
        return "-"
    return {True: "likely", False: "unlikely", None: "undetermined"}[possible]


def _range(spread: dict[str, Any]) -> str:
    if spread.get("min") is None:
        return "-"
    return f"{spread['min']:.3g}..{spread['max']:.3g}"


def write_report(root: Path, *, spec_path: str, bounds: dict[str, Any] | None, summary: pd.DataFrame | None,
                 best: dict[str, Any] | None, metric: str, wall_s: float | None = None,
                 plan: dict[str, Any] | None = None, compute: dict[str, Any] | None = None) -> Path:
    lines = [f"# sctune report: {root.name}", "", f"Search space: `{spec_path}`", ""]
    if wall_s is not None:
        lines += [f"Wall time of this invocation: {wall_s:.0f} s", ""]
    if plan is not None:
        from .budget import format_plan

        lines += ["## Plan and compute", "", "Planned before the start (FTE = one full training of the space's "
                  "`fixed` budget):", "", *[f"- {line}" for line in format_plan(plan)], ""]
    if compute and compute.get("spent_fte"):
        sp = compute["spent_fte"]
        lines += ["Spent: " + ", ".join(f"{k} **{v:.2f}** FTE" for k, v in sp.items() if v is not None)
                  + (f" (budget {compute['budget_fte']:g} FTE)" if compute.get("budget_fte") is not None else "")
                  + ".", ""]
    if bounds is not None:
        chosen = bounds.get("chosen") or {}
        verdict = bounds.get("verdict") or {}
        lines += ["## Stage 1: LR range tests", "", verdict.get("message", ""), ""]
        if bounds.get("cost_fte") is not None:
            lines += [f"Cost: **{bounds['cost_fte']:.2f} FTE** (full-training equivalents, measured: range-test "
                      "steps and evaluation time against one full training).", ""]
        lines += [_fmt_bounds_table(bounds), ""]
        if chosen:
            lines += [f"Chosen ({bounds.get('source')}): max_lr bound **{chosen['max_lr_bound']:.4g}**, "
                      f"min_lr bound **{chosen['min_lr_bound']:.4g}**, weight-decay prior **{chosen['wd_prior']:g}**."
                      + (" The max_lr bound is a lower bound: accuracy was still high where the ramp ended."
                         if verdict.get("lower_bound") else ""), ""]
        if (root / "range_test" / "range_test.png").exists():
            lines += ["![range test](range_test/range_test.png)", ""]
    if summary is not None and not summary.empty:
        counts = summary["status"].value_counts().to_dict()
        shown = summary.drop(columns=[c for c in ("checkpoint", "node_id") if c in summary])
        lines += ["## Stage 2: joint one-cycle + regularization search", "",
                  f"{len(summary)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ". "
                  f"Ranked by `{metric}` (the mean of a trial's last evaluations: what selects the best).", "",
                  shown.head(10).to_markdown(index=False, floatfmt=".4g"), ""]
        if (root / "search.png").exists():
            lines += ["![search](search.png)", ""]
    if best is not None:
        final = best.get("final") or {}
        lines += ["## Best configuration and final fit", "",
                  f"Trial {best.get('trial_id')}: `{best.get('metric')}` **{best.get('value'):.4f}**"
                  + (f" (binomial standard error on the validation split {best['value_se']:.4f}: trials within about "
                     "twice that are tied)" if best.get("value_se") else "") + ".", "", "```json",
                  pd.Series(best.get("config", {})).to_json(indent=2), "```", ""]
        if final.get("test_acc_mean") is not None and final.get("test_acc_std") is None:
            lines += [f"No final fit (the budget left none): the best trial tested as it is, test accuracy "
                      f"**{final['test_acc_mean']:.4f}**.", ""]
        elif final.get("test_acc_mean") is not None:
            where = " on train + validation" if final.get("refit") else ""
            lines += [f"Final fit over {final['n']} seeds{where}: test accuracy **{final['test_acc_mean']:.4f}** "
                      f"± {final['test_acc_std']:.4f} (std).", ""]
    lines += ["## TensorBoard", "", "```", f"tensorboard --logdir {(root / 'tensorboard').resolve()} "
              "--host 127.0.0.1 --port 6006", "```", ""]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out
