"""Presentation: report.md, the search's figure and the console text.

* the range test's figures, ``range_test_figure`` and ``range_summary_figure``, are in ``core/curves.py``
  (``RangeTestResult.plot`` draws them too; the report shows stage 1's);
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.curves import bound_dict

log = logging.getLogger(__name__)


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
    from ..service.experiment import ExperimentPaths

    paths = ExperimentPaths(root)
    from .recommend import answer_lines

    lines = [f"# sctune report: {root.name}", "", f"Search space: `{spec_path}`", ""]
    answer = answer_lines(best, bounds, markdown=True)
    if answer:  # the answer first: configuration, expected accuracy, PyTorch snippet, bounds and verdict
        lines += [*answer, ""]
    if wall_s is not None:
        lines += [f"Wall time of this invocation: {wall_s:.0f} s", ""]
    if plan is not None:
        from ..service.budget import format_plan

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
    from ..service.budget import format_plan

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
    from ..service.experiment import ExperimentPaths

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
