"""Markdown tables from the result files: ``python -m benchmarks.summarize [--out DIR]``.

BENCHMARKS.md quotes these tables; regenerate them after rerunning a benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_OUT


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def num(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def spread(s: dict[str, Any], f=pct) -> str:
    if not s or s.get("median") is None:
        return "n/a"
    if s["n"] == 1:
        return f(s["median"])
    return f"{f(s['median'])} [{f(s['min'])}–{f(s['max'])}]"


def to_target(s: dict[str, Any] | None) -> str:
    """A time to target: the median over all repeats (a repeat that never reached it counts as never), then
    the range over the repeats that reached it."""
    if not s or not s["n"]:
        return "never"
    med = "never" if s.get("median_all") is None else f"{s['median_all']:.1f}"
    return med if s["n"] == 1 and not s["missing"] else f"{med} [{s['min']:.1f}–{s['max']:.1f}]"


def stamp(d: dict[str, Any]) -> str:
    m = d["machine"]
    v = m["versions"]
    return (f"`{d['command']}` — {m['cpu']} ({m['cpu_count']} cores, CPU only), torch {v['torch']}, ray {v['ray']}, "
            f"optuna {v['optuna']}, git {m['git_commit']}{' +local changes' if m.get('sctune_source_modified') else ''}, "
            f"{m['date_utc'][:16].replace('T', ' ')} UTC; load average {m['loadavg_at_start'][0]:.1f} at start, "
            f"{d['loadavg_at_end'][0]:.1f} at end; {d['wall_s'] / 60:.0f} min")


def search_efficiency(d: dict[str, Any]) -> str:
    out = [f"Reproduce: {stamp(d)}", ""]
    for task, r in d["results"].items():
        grid = [g for g in r["methods"]["sctune"]["test_acc_at_fte"]]
        grid = [g for g in grid if float(g) in (2, 4, 8, 16) or float(g) == r["budget_fte"]]
        out.append(f"**{task}** (1 FTE = {r['epochs_per_fte']} epochs; budget {r['budget_fte']:g} FTE; target = "
                   f"{pct(r['target'])}% = best median {pct(r['best_any_median'])}% − 0.3)")
        out.append("")
        out.append("| method | stage-1 cost (FTE) | " + " | ".join(f"test acc @ {g} FTE" for g in grid)
                   + " | FTE to target (reached) | of which after stage 1 | trials (pruned / diverged) |")
        out.append("|---|---|" + "---|" * len(grid) + "---|---|---|")
        for arm, m in r["methods"].items():
            cells = [spread(m["test_acc_at_fte"][g]) for g in grid]
            n = m["test_acc_at_budget"]["n"] + m["test_acc_at_budget"]["missing"]
            out.append(f"| {arm} | {spread(m['stage1_fte'], lambda x: f'{x:.1f}')} | " + " | ".join(cells)
                       + f" | {to_target(m['fte_to_target'])} ({m['reached_target']}/{n}) | "
                       f"{to_target(m.get('search_fte_to_target'))} | "
                       f"{num(m['trials']['median'], '.0f')} ({num(m['pruned']['median'], '.0f')} / "
                       f"{num(m['diverged']['median'], '.0f')}) |")
        out.append("")
        out.append(goals(r))
        out.append("")
    return "\n".join(out)


GOAL_FTE = ("2", "4", "8")
GOAL_GAP = 0.002  # issue 18: sctune's median at or above every other arm's median minus 0.2 points


def goals(r: dict[str, Any]) -> str:
    """The anytime goal at 2, 4 and 8 FTE, and FTE to target against the conventional search, per task."""
    m = r["methods"]
    parts = []
    for g in GOAL_FTE:
        ours = m["sctune"]["test_acc_at_fte"].get(g, {}).get("median")
        best_arm, best = best_other(m, g)
        ok = ours is not None and (best is None or ours >= best - GOAL_GAP - 1e-12)
        parts.append(f"@{g} FTE {'met' if ok else 'NOT met'} (sctune {pct(ours)}, best other {best_arm} {pct(best)})")
    conv = m["conventional"]["fte_to_target"].get("median_all")
    ours = m["sctune"]["fte_to_target"].get("median_all")
    if conv is None or conv > 2:
        ok = ours is not None and (conv is None or ours < conv)
        parts.append(f"FTE to target {'met' if ok else 'NOT met'} (median over all repeats: sctune "
                     f"{_fte(ours)}, conventional {_fte(conv)})")
    else:
        parts.append(f"FTE to target: conventional needs {_fte(conv)} <= 2 FTE (no goal; sctune {_fte(ours)})")
    out = "Goals: " + "; ".join(parts) + "."
    if r.get("paired"):
        out += "\n\n" + paired_line(r)
    return out


def best_other(m: dict[str, Any], g: str) -> tuple[str | None, float | None]:
    """The arm other than sctune with the best median test accuracy at ``g`` FTE, and that median."""
    others = {a: v["test_acc_at_fte"].get(g, {}).get("median") for a, v in m.items() if a != "sctune"}
    return max(((a, v) for a, v in others.items() if v is not None), key=lambda av: av[1], default=(None, None))


def _fte(x: float | None) -> str:
    return "never" if x is None else f"{x:.1f}"


def paired_line(r: dict[str, Any]) -> str:
    """At each goal budget, sctune against the arm with the best median, repeat by repeat."""
    parts = []
    for g in GOAL_FTE:
        best_arm, _ = best_other(r["methods"], g)
        p = r["paired"].get(g, {}).get(best_arm)
        if not p or p["mean"] is None:
            continue
        ci = "" if p["ci95"] is None else f", 95% CI {100 * p['ci95'][0]:+.1f} to {100 * p['ci95'][1]:+.1f}"
        parts.append(f"@{g} FTE vs {best_arm} {100 * p['mean']:+.2f} points{ci} "
                     f"({p['wins']} won / {p['ties']} tied / {p['losses']} lost of {p['n']})")
    return "Paired by repeat (sctune minus the best other arm, mean): " + "; ".join(parts) + "."


def fidelity_rank(d: dict[str, Any]) -> str:
    out = [f"Reproduce: {stamp(d)}", "",
           "| task | schedule (epochs, fraction) | Spearman vs full | full-length best's rank | best full-length "
           "score kept by a halving step | median test acc |", "|---|---|---|---|---|---|"]
    for task, r in d["results"].items():
        n = len(r["configs"])
        for e, v in r["lengths"].items():
            out.append(f"| {task} | {e} ({v['fraction']:.2f}) | {num(v['spearman_vs_full'])} | "
                       f"{v['full_best_rank']}/{n} | {pct(v['top_half_best_full_score'])} of {pct(v['best_full_score'])} | "
                       f"{pct(v['test_acc']['median'])} |")
        out.append(f"| {task} | full length, another seed | {num(r['full_vs_full_other_seed_spearman'])} | | | |")
    return "\n".join(out)


def super_convergence(d: dict[str, Any]) -> str:
    out = [f"Reproduce: {stamp(d)}", ""]
    for v, r in d["results"].items():
        out.append(f"**{v}** ({r['train_size']} training samples; B = {r['b_iterations']} iterations)")
        out.append("")
        out.append("| arm | iterations | picked LR / WD (tune val acc) | test acc mean ± std (n seeds) | min–max |")
        out.append("|---|---|---|---|---|")
        for k, a in r["arms"].items():
            t = a["test_acc"]
            out.append(f"| {k} | {a['iterations']} | {a['picked']['lr']:g} / {a['picked']['wd']:g} "
                       f"({pct(a['picked']['tune_val_acc'])}) | {pct(t['mean'], 2)} ± {pct(t['std'], 2)} ({t['n']}) | "
                       f"{pct(t['min'])}–{pct(t['max'])} |")
        h, m = r["headline"], r["match"]
        out.append("")
        out.append(f"one-cycle@B/8 − piecewise@B: {pct(h['onecycle_B8_minus_piecewise_B'], 2)} points; "
                   f"one-cycle@B/8 − piecewise@B/8: {pct(h['onecycle_B8_minus_piecewise_B8'], 2)} points; "
                   + (f"one-cycle first matches piecewise@B's mean at B/{1 / m['smallest_fraction']:.0f} "
                      f"(iteration ratio {m['ratio']:.0f}x; log-interpolated {num(m['ratio_interpolated'], '.1f')}x)."
                      if m["matched"] else f"one-cycle does not match piecewise@B ({m['note']})."))
        out.append("")
    return "\n".join(out)


def overhead(d: dict[str, Any]) -> str:
    r = d["results"]
    f0 = lambda x: f"{x:.0f}"  # noqa: E731
    f2 = lambda x: f"{x:.2f}"  # noqa: E731
    one = {"median": 1.0, "n": 1, "min": 1.0, "max": 1.0}
    out = [f"Reproduce: {stamp(d)}", "",
           f"Whole trial (model build, {r['samples_per_trial']} training samples, a validation pass per epoch), "
           "interleaved per repeat; ratios paired per repeat:", "",
           "| variant | samples / CPU-s | ratio to bare (CPU) | samples / wall-s | ratio to bare (wall) | "
           "steady-state ratio (wall, epochs 2..E) |", "|---|---|---|---|---|---|"]
    for k in ("bare", "fit", "fit+checkpoint", "ray_trial"):
        out.append(f"| {k} | {spread(r['samples_per_cpu_s'][k], f0)} | "
                   f"{spread(r['cpu_ratio_vs_bare'].get(k, one), f2)} | {spread(r['samples_per_s'][k], f0)} | "
                   f"{spread(r['ratio_vs_bare'].get(k, one), f2)} | {spread(r['steady_ratio_vs_bare'].get(k, one), f2)} |")
    k = "ray_trial (inside trial)"
    out.append(f"| ray_trial, wall inside the trial (`time_total_s`) | — | — | {spread(r['samples_per_s'][k], f0)} | "
               f"{spread(r['ratio_vs_bare'][k], f2)} | — |")
    su, suc = r["ray"]["startup"], r["ray"]["startup_cpu_s_per_trial"]
    out += ["", f"Ray start-up per trial (one at a time, 1-epoch digits trials; `ray.init` itself "
                f"{r['ray_init_s']:.1f} s wall): wall overhead per trial reuse_actors=True "
                f"{spread(su['reuse_actors=True'], f2)} s, reuse_actors=False {spread(su['reuse_actors=False'], f2)} s "
                f"(ratio {spread(r['ray']['startup_ratio_no_reuse_over_reuse'], f2)}x); CPU seconds per 1-epoch "
                f"trial, whole process tree: {spread(suc['reuse_actors=True'], f2)} vs "
                f"{spread(suc['reuse_actors=False'], f2)} "
                f"(ratio {spread(r['ray']['startup_cpu_ratio_no_reuse_over_reuse'], f2)}x)."]
    rc = r.get("range_test_iteration_cost_in_training_iterations")
    if rc:
        out.append(f"\nOne range-test iteration costs {spread(rc, f2)} training iterations of CPU "
                   "(held-out evaluation + BatchNorm recalibration every `eval_every` steps).")
    return "\n".join(out)


def data_path(d: dict[str, Any]) -> str:
    r = d["results"]
    f0 = lambda x: f"{x:.0f}"  # noqa: E731
    f2 = lambda x: f"{x:.2f}"  # noqa: E731
    out = [f"Reproduce: {stamp(d)}", "",
           "| loader | samples / CPU-s | DeviceLoader advantage (CPU) | samples / wall-s | DeviceLoader speed-up "
           "(wall) | ResNet-20 step (s) | share of step waiting for data |",
           "|---|---|---|---|---|---|---|"]
    for k, s in r["samples_per_s"].items():
        ratio = r["ratio_deviceloader_over"].get(k)
        cratio = r.get("cpu_ratio_deviceloader_over", {}).get(k)
        out.append(f"| {k} | {spread(r.get('samples_per_cpu_s', {}).get(k), f0)} | "
                   f"{spread(cratio, f2) + 'x' if cratio else '—'} | {spread(s, f0)} | "
                   f"{spread(ratio, f2) + 'x' if ratio else '—'} | "
                   f"{spread(r['resnet20_step_s'][k], f2)} | {spread(r['resnet20_wait_share'][k])}% |")
    return "\n".join(out)


def end_to_end(d: dict[str, Any]) -> str:
    r = d["results"]
    f0 = lambda x: f"{x:.0f}"  # noqa: E731
    out = [f"Reproduce: {stamp(d)}", "",
           "| quantity | median [min–max] |", "|---|---|",
           f"| wall time, shell to exit (s) | {spread(r['wall_s'], f0)} |",
           f"| CPU time, user + system, whole process tree (s) | {spread(r.get('tree_cpu_s'), f0)} |",
           f"| peak RSS, driver + all children, summed (MiB) | {spread(r['tree_peak_rss_mib'], f0)} |",
           f"| peak PSS, driver + all children, summed (MiB) | {spread(r['tree_peak_pss_mib'], f0)} |",
           f"| driver max RSS (`/usr/bin/time -v`, MiB) | {spread(r['driver_max_rss_mib'], f0)} |"]
    for s, v in r["stage_wall_s"].items():
        out.append(f"| stage {s} wall (s) | {spread(v, f0)} |")
    out.append(f"| range-test stage: share of training iterations | {spread(r['range_share_of_iterations'])}% |")
    out.append(f"| range-test stage: cost in FTE | {spread(r['range_fte'], lambda x: f'{x:.1f}')} |")
    out.append(f"| range-test stage: share of stage wall time | {spread(r['range_share_of_stage_wall'])}% |")
    return "\n".join(out)


SECTIONS = {"search_efficiency": search_efficiency, "fidelity_rank": fidelity_rank, "super_convergence": super_convergence, "overhead": overhead,
            "data_path": data_path, "end_to_end": end_to_end}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    for name, fn in SECTIONS.items():
        path = args.out / f"{name}.json"
        if not path.exists():
            continue
        print(f"### {name}\n")
        print(fn(json.loads(path.read_text())))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
