"""Presentation: every figure sctune draws, and report.md.

* :func:`range_test_figure`: one range test per label, accuracy (top) and loss (bottom) vs LR with each
  label's bounds; tensorboard.log_range_test logs it as each range-test trial's image.
* :func:`range_summary_figure`: stage 1 as a whole (``range_test/range_test.png``): per weight decay the
  seeds thin and their median bold, the chosen bounds shaded, the high band marked.
* :func:`search_figure`: stage 2 (``search.png``): final metric vs each searched parameter, by status.
* :func:`bounds_markdown`: one range test's bounds as a markdown table with their messages (TensorBoard
  text).
* :func:`write_report`: ``report.md``, with the tables and the two plots. (The machine-readable outputs,
  bounds.json, summary.csv, best.json, are written by stages.py and pipeline.py.)
* the console text of a run: :func:`print_plan` (the ``[plan]`` lines), :func:`print_bounds` (stage 1's
  ``[range]`` lines) and :func:`print_summary` (what the CLI prints at the end). The live progress lines of
  a running stage are progress.py's.

Figures are bare matplotlib ``Figure`` objects (no pyplot, no global backend): savefig renders them through
Agg, so they are safe in Ray workers and never pile up in pyplot's registry. No torch, no ray here.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- helpers
def _column(df: pd.DataFrame, name: str) -> np.ndarray | None:
    return df[name].to_numpy(dtype=float) if name in df.columns else None


def _loss_ylim(losses: Sequence[np.ndarray]) -> tuple[float, float] | None:
    """Clip the loss axis when a curve diverges, or the blow-up flattens the informative part.

    Top = 1.5 x the highest starting loss (median of the first 5 finite points): the range test's
    interesting region is where the loss is at or below where it started.
    """
    starts, lows, highs = [], [], []
    for loss in losses:
        finite = loss[np.isfinite(loss)]
        if finite.size:
            starts.append(float(np.median(finite[:5])))
            lows.append(float(finite.min()))
            highs.append(float(finite.max()))
    if not starts:
        return None
    top = 1.5 * max(starts)
    if max(highs) <= top or top <= min(lows):
        return None
    low = min(lows)
    return low - 0.05 * (top - low), top


def bound_dict(bounds: object) -> dict[str, Any]:
    if bounds is None:
        return {}
    if hasattr(bounds, "to_dict"):
        return dict(bounds.to_dict())
    keys = ("min_lr", "max_lr", "status", "confidence", "verdict", "message")
    return {k: getattr(bounds, k) for k in keys if hasattr(bounds, k)}


def finite_positive(value: object) -> float | None:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def _range_axes(figsize: tuple[float, float]) -> tuple[Figure, Axes, Axes]:
    """The range-test layout both range figures share: accuracy above loss, one LR axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    ax_acc, ax_loss = fig.subplots(2, 1, sharex=True)
    return fig, ax_acc, ax_loss


def _bound_lines(axes: Sequence[Axes], bounds: Mapping[str, Any], color: str, label: str, *, lw: float) -> bool:
    """``min_lr`` dashed and ``max_lr`` dotted, vertical on every panel in the curve's color, with
    ``gid="min_lr:<label>"`` / ``"max_lr:<label>"``. False when neither is a positive number."""
    drawn = False
    for attr, style in (("min_lr", "--"), ("max_lr", ":")):
        x = finite_positive(bounds.get(attr))
        if x is None:
            continue
        drawn = True
        for ax in axes:
            ax.axvline(x, color=color, ls=style, lw=lw, gid=f"{attr}:{label}")
    return drawn


def _finish_range_axes(ax_acc: Axes, ax_loss: Axes, *, log_x: bool, loss_label: str, lr_label: str) -> None:
    if log_x:
        ax_loss.set_xscale("log")  # shared x: applies to both panels
    ax_acc.set_ylabel("held-out accuracy")
    ax_loss.set_ylabel(loss_label)
    ax_loss.set_xlabel(lr_label)
    for ax in (ax_acc, ax_loss):
        ax.grid(True, alpha=0.3)


# --------------------------------------------------------------------------------------------- range tests
def range_test_figure(
    curves: Mapping[str, pd.DataFrame],
    bounds: Mapping[str, object] | None = None,
    *,
    log_x: bool = False,
    title: str = "",
) -> Figure:
    """Range-test curves: accuracy vs LR (top), loss and smoothed loss vs LR (bottom).

    One color per label; each label's ``min_lr`` (dashed) and ``max_lr`` (dotted) are vertical
    lines in its color on both panels (lines carry ``gid="min_lr:<label>"`` / ``"max_lr:<label>"``).
    Frames need ``lr``; ``loss``, ``smooth_loss``, ``acc`` (NaN where not evaluated) are drawn if
    present. ``bounds`` values are ``LRBounds`` or anything with the same attributes or ``to_dict()``.
    """
    import matplotlib
    from matplotlib.lines import Line2D

    fig, ax_acc, ax_loss = _range_axes((9, 7.5))
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    bounds = bounds or {}
    plotted_losses: list[np.ndarray] = []
    any_acc = any_bound = False
    for i, (label, df) in enumerate(curves.items()):
        lr = _column(df, "lr")
        if lr is None:
            raise ValueError(
                f"range_test_figure: curve {label!r} has no 'lr' column (columns: {list(df.columns)})"
            )
        color = colors[i % len(colors)]
        b = bound_dict(bounds.get(label))
        legend = f"{label} [{b['status']}]" if b.get("status") else label
        acc = _column(df, "acc")
        if acc is not None and np.isfinite(acc).any():
            keep = np.isfinite(acc)
            ax_acc.plot(lr[keep], acc[keep], color=color, marker="o", ms=3, lw=1.4, label=legend)
            any_acc = True
        loss, smooth = _column(df, "loss"), _column(df, "smooth_loss")
        if loss is not None:
            ax_loss.plot(lr, loss, color=color, lw=0.8, alpha=0.3)
            plotted_losses.append(loss)
        if smooth is not None:
            ax_loss.plot(lr, smooth, color=color, lw=1.6, label=legend)
            plotted_losses.append(smooth)
        any_bound |= _bound_lines((ax_acc, ax_loss), b, color, label, lw=1.3)
    if not any_acc:
        ax_acc.text(0.5, 0.5, "no accuracy evaluated", transform=ax_acc.transAxes, ha="center", color="gray")
    ylim = _loss_ylim(plotted_losses)
    if ylim is not None:
        ax_loss.set_ylim(*ylim)
    _finish_range_axes(ax_acc, ax_loss, log_x=log_x, loss_label="training loss (faint: raw)",
                       lr_label="learning rate")
    if any_acc:
        ax_acc.legend(fontsize="small", loc="best")
    handles, _ = ax_loss.get_legend_handles_labels()
    if any_bound:
        handles += [
            Line2D([], [], color="gray", ls="--", label="min_lr"),
            Line2D([], [], color="gray", ls=":", label="max_lr"),
        ]
    if handles:
        ax_loss.legend(handles=handles, fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    return fig


def range_summary_figure(curves: pd.DataFrame, bounds: dict[str, Any], *, log_x: bool = False,
                         title: str = "") -> Figure:
    """Experiment view of stage 1: one colour per weight decay (seeds as thin lines, their median bold),
    median bounds per WD as vertical lines, the chosen bounds shaded, the verdict's plateau marked.

    `curves`: every range test's frame with ``weight_decay`` and ``seed`` columns; `bounds`: bounds.json.
    """
    import matplotlib

    fig, ax_acc, ax_loss = _range_axes((9, 7))
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
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
        _bound_lines((ax_acc, ax_loss), entry, color, f"wd={wd:g}", lw=1.2)
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
    _finish_range_axes(ax_acc, ax_loss, log_x=log_x, loss_label="smoothed training loss",
                       lr_label="learning rate (dashed: min_lr, dotted: max_lr per WD)")
    ax_acc.legend(fontsize="small", loc="lower right")
    fig.suptitle(title or "LR range test")
    return fig


# --------------------------------------------------------------------------------------------- tables
def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def bounds_markdown(bounds: object) -> str:
    """Markdown table of min_lr / max_lr / status / confidence, then the bounds' own message (why
    there are none, what was cut) and the super-convergence verdict message (pure)."""
    d = bound_dict(bounds)
    rows = [
        "| min_lr | max_lr | status | confidence |",
        "|---|---|---|---|",
        "| " + " | ".join(_fmt(d.get(k)) for k in ("min_lr", "max_lr", "status", "confidence")) + " |",
    ]
    verdict = d.get("verdict")
    message = verdict.get("message") if isinstance(verdict, Mapping) else getattr(verdict, "message", verdict)
    if d.get("message"):
        rows += ["", f"**Bounds:** {d['message']}"]
    if message:
        rows += ["", f"**Super-convergence verdict:** {message}"]
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------- search
def search_figure(summary: pd.DataFrame, metric: str, path: Path) -> bool:
    """Final metric vs max_lr and vs weight decay, coloured by status; saved to `path` (False: nothing to plot)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    col = metric if metric in summary else f"final_{metric}"  # the selection score (<metric>_tail)
    if summary.empty or col not in summary:
        return False
    xs = [c for c in ("max_lr", "weight_decay", "dropout") if c in summary and summary[c].nunique() > 1]
    if not xs:
        return False
    fig = Figure(figsize=(4.2 * len(xs), 3.4))
    axes = fig.subplots(1, len(xs), squeeze=False)
    colors = {"completed": "tab:blue", "pruned": "tab:gray", "diverged": "tab:red", "error": "black"}
    for ax, x in zip(axes[0], xs, strict=True):
        for status, g in summary.groupby("status"):
            ax.scatter(g[x], g[col], label=status, color=colors.get(status, "tab:purple"), alpha=0.8, s=28)
        if x in ("max_lr", "weight_decay") and (summary[x] > 0).all():
            ax.set_xscale("log")
            # a max_lr range under a decade got minor-tick labels at every 1..9 x 10^k, overlapping: a few
            # major ticks at 1, 2, 5 x 10^k, plain numbers, no minor labels
            narrow = math.log10(summary[x].max() / summary[x].min()) < 1.5  # decades spanned
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if narrow else (1.0,), numticks=5))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(x)
        ax.set_ylabel(col)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("search trials: final metric vs parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# --------------------------------------------------------------------------------------------- report.md


def _fmt_bounds_table(bounds: dict[str, Any]) -> str:
    rows = []
    for key, v in bounds.get("per_weight_decay", {}).items():
        spread = (v.get("spread") or {}).get("max_lr") or {}
        rows.append({"weight decay": key, "status": v.get("status"), "ok seeds": f"{v.get('n_ok')}/{v.get('n_total')}",
                     "max_lr (median)": v.get("max_lr"), "max_lr range": _range(spread),
                     "recommended max_lr": v.get("recommended_max_lr"),
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
    from .experiment import ExperimentPaths

    paths = ExperimentPaths(root)
    from .recommend import answer_lines

    lines = [f"# sctune report: {root.name}", "", f"Search space: `{spec_path}`", ""]
    answer = answer_lines(best, bounds, markdown=True)
    if answer:  # the answer first: configuration, expected accuracy, PyTorch snippet, bounds and verdict
        lines += [*answer, ""]
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
                      + (" The max_lr bound is a lower bound: accuracy was still high where the ramp ended, so "
                         "the search also tries LRs above it." if verdict.get("lower_bound") else ""), ""]
            lines += [f"- {line}" for line in _max_lr_lines(chosen)] + [""] if _max_lr_lines(chosen) else []
        if paths.range_png.exists():
            lines += [f"![range test]({paths.range_png.relative_to(root)})", ""]
    if summary is not None and not summary.empty:
        counts = summary["status"].value_counts().to_dict()
        shown = summary.drop(columns=[c for c in ("checkpoint", "node_id") if c in summary])
        lines += ["## Stage 2: joint one-cycle + regularization search", "",
                  f"{len(summary)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ". "
                  f"Ranked by `{metric}` (the mean of a trial's last evaluations: what selects the best).", "",
                  shown.head(10).to_markdown(index=False, floatfmt=".4g"), ""]
        if paths.search_png.exists():
            lines += [f"![search]({paths.search_png.relative_to(root)})", ""]
    if best is not None:
        final = best.get("final") or {}
        lines += ["## Best trial and final fit (the full record)", "",
                  f"Trial {best.get('trial_id')}: `{best.get('metric')}` **{best.get('value'):.4f}**"
                  + (f" (binomial standard error on the validation split {best['value_se']:.4f}: trials within about "
                     "twice that are tied)" if best.get("value_se") else "") + ".", "", "```json",
                  pd.Series(best.get("config", {})).to_json(indent=2), "```", ""]
        if final.get("test_acc_mean") is not None and final.get("test_acc_std") is None:
            lines += [f"No final fit (the budget left none): the best trial tested as it is, test accuracy "
                      f"**{final['test_acc_mean']:.4f}**.", ""]
        elif final.get("test_acc_mean") is not None:
            where = " on train + validation" if final.get("refit") else ""
            spread = f" ± {final['test_acc_std']:.4f} (std)" if final["n"] > 1 else " (1 seed: no spread measured)"
            lines += [f"Final fit over {final['n']} seed(s){where}: test accuracy **{final['test_acc_mean']:.4f}**"
                      f"{spread}.", ""]
    lines += ["## TensorBoard", "", "```", paths.tensorboard_command(), "```", ""]
    paths.report.write_text("\n".join(lines))
    return paths.report


# --------------------------------------------------------------------------------------------- console


def print_plan(plan: dict[str, Any], *, file=None, extra: list[str] | None = None) -> None:
    """The plan (``budget.plan_compute``) as ``[plan]`` lines: to stderr during a run, to stdout for --stage plan;
    ``extra`` lines (what was filled into the space file) first."""
    from .budget import format_plan

    for line in [*(extra or []), *format_plan(plan)]:
        print(f"[plan] {line}", file=file or sys.stderr, flush=True)


def print_bounds(bounds: dict[str, Any]) -> None:
    """Stage 1's outcome (bounds.json) as ``[range]`` lines on stderr."""
    chosen = bounds.get("chosen")
    verdict = (bounds.get("verdict") or {}).get("message")
    if chosen:
        print(f"[range] LR bounds: min {chosen['min_lr_bound']:.4g}, max {chosen['max_lr_bound']:.4g}; "
              f"weight-decay prior {chosen['wd_prior']:g} ({bounds.get('source')})", file=sys.stderr)
        for line in _max_lr_lines(chosen):
            print(f"[range] {line}", file=sys.stderr)
    if (bounds.get("verdict") or {}).get("lower_bound"):
        print("[range] max_lr is a lower bound: accuracy was still high at the end of the ramp, so the search "
              "also tries LRs above it", file=sys.stderr)
    if verdict:
        print(f"[range] {verdict}", file=sys.stderr)
    if bounds.get("cost_fte") is not None:
        print(f"[range] cost: {bounds['cost_fte']:.2f} FTE (full-training equivalents, measured)", file=sys.stderr)


def _max_lr_lines(chosen: dict[str, Any]) -> list[str]:
    """max_lr (the search's upper end) and the recommended max_lr (the first point's), each with its reason."""
    lines = []
    if chosen.get("max_lr_reason"):
        lines.append(f"max_lr {chosen['max_lr_bound']:.4g}: {chosen['max_lr_reason']}")
    if chosen.get("recipe_max_lr") is not None:
        lines.append(f"recommended max_lr {chosen['recipe_max_lr']:.4g} (the first point's): "
                     f"{chosen.get('recipe_reason') or 'stage 1'}")
    return lines


def print_summary(root: Path, *, bounds: dict[str, Any] | None, best: dict[str, Any] | None,
                  compute: dict[str, Any] | None) -> None:
    """What the CLI prints on stdout when a run ends: the best configuration, the final fit, compute, files."""
    from .experiment import ExperimentPaths

    paths = ExperimentPaths(root)
    from .recommend import answer_lines

    print()
    if best:
        b = best
        last = f", the mean of its last {b['select_last']} evaluations" if b.get("select_last") else ""
        print(f"Recommended configuration (best trial {b['trial_id']}, {b['metric']} {b['value']:.4f}{last}):")
    for line in answer_lines(best, bounds)[1 if best and best.get("config") else 0:]:
        print(line)
    c = compute
    if c and c.get("spent_fte"):
        sp = c["spent_fte"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sp.items() if k != "total" and v is not None)
        print(f"Compute:     {sp['total']:.2f} FTE ({parts})" + (f" of a budget of {c['budget_fte']:g}"
                                                                 if c.get("budget_fte") is not None else ""))
    print(f"Results:     {root}")
    print(f"Report:      {paths.report}")
    print(f"TensorBoard: {paths.tensorboard_command()}")
