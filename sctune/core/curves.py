"""The range test's figures: one range test per label (``range_test_figure``: accuracy above, loss below, vs
LR, with each label's bounds) and stage 1 as a whole (``range_summary_figure``: per weight decay the seeds thin
and their median bold, the chosen bounds shaded, the high band marked).

Here, in the core, because ``RangeTestResult.plot`` draws them for plain-PyTorch users; the report
(``present/report.py``) and TensorBoard (``present/tensorboard.py``) use them too. Figures are bare matplotlib
``Figure`` objects (no pyplot, no global backend): savefig renders them through Agg, so they are safe in Ray
workers and never pile up in pyplot's registry. No torch, no ray here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
