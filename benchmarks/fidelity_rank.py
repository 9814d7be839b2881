"""Does a short complete one-cycle rank configurations as the full-length one does? (Sets stage 2's rungs.)

For each task: sctune's stage 1 (as ``search_efficiency.job_range`` runs it), stage 2's plan, then
``--configs`` configurations of the resolved space (the recipe point first, the rest drawn at random, seed
fixed). Each configuration trains a COMPLETE one-cycle (warm-up, anneal, annihilation) over 1/8, 1/4, 1/2 and
all of the task's epochs (``sctune.service.fidelity.rung_epochs``). Reported per short length: Spearman's rank
correlation between the configurations' selection scores (validation, mean of the last evaluations, as
stage 2 ranks trials) at that length and at the full length, whether the full-length best survives a halving
at that length (it ranks in the top half), the best full-length score a halving step at that length keeps,
and the median test accuracy at each length. The noise ceiling: the same configurations at the full length
with another seed, ranked against the first.

Reproduce: ``python -m benchmarks.fidelity_rank --workers 2``.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from benchmarks.common import envelope, loadavg, log, out_dir, parser, stats, write_result
from benchmarks.search_efficiency import _data, _init_worker, _spec, job_range

NAME = "fidelity_rank"
FULL = {"tasks": {"mnist1d": {"space": "search_spaces/mnist1d.yaml", "budget_fte": 1},
                  "digits": {"space": "search_spaces/digits.yaml", "budget_fte": 1}},
        "configs": 14, "repeat": 0}
QUICK = {"tasks": {"digits": {"space": "search_spaces/digits.yaml", "budget_fte": 1, "smoke": True}},
         "configs": 4, "repeat": 0}


def job_train(task: dict[str, Any], rep: int, params: dict[str, Any], constants: dict[str, Any],
              epochs: int, seed_offset: int = 0) -> dict[str, Any]:
    """One complete one-cycle of ``epochs`` epochs (the schedule is built for that length)."""
    from sctune.core.config import TrainConfig
    from sctune.core.train import TEST_ACC, VAL_ACC, fit, tail_mean

    _init_worker()
    spec = _spec(task, rep)
    data = _data(spec.base.task)
    cfg = TrainConfig.from_flat(spec.base.to_flat() | constants | params
                                | {"epochs": epochs, "seed": spec.base.seed + seed_offset})
    t0 = time.perf_counter()
    res = fit(cfg, data=data, test_at_end=True)
    vals = [h[VAL_ACC] for h in res.history]
    return {"epochs": epochs, "diverged": res.diverged, "score": tail_mean(vals, spec.search.select_last),
            "val_last": vals[-1] if vals else None, "test_acc": None if res.diverged else res.final.get(TEST_ACC),
            "wall_s": time.perf_counter() - t0}


def _draws(plan, n: int, seed: int) -> list[dict[str, Any]]:
    import optuna

    from sctune.service.plan import optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    dists = optuna_space(plan.dists)
    out = [dict(plan.recipe)]
    while len(out) < n:
        t = study.ask(dists)
        out.append(dict(t.params))
        study.tell(t, 0.0)
    return out


def _spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    return float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)


def main(argv: list[str] | None = None) -> int:
    from sctune.service.fidelity import RUNG_FRACTIONS, rung_epochs
    from sctune.service.plan import Anchors, build_plan

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--configs", type=int)
    args = p.parse_args(argv)
    conf = QUICK if args.quick else FULL
    n = args.configs or conf["configs"]
    rep = conf["repeat"]
    payload = envelope(NAME, args, {"tasks": conf["tasks"], "configs": n, "repeat": rep,
                                    "fractions": list(RUNG_FRACTIONS)})
    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    ctx = __import__("multiprocessing").get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        for tname, task in conf["tasks"].items():
            s1 = job_range(task, rep)
            spec = _spec(task, rep)
            plan = build_plan(spec, Anchors.from_dict(s1["chosen"]))
            lengths = rung_epochs(spec.base.epochs, RUNG_FRACTIONS)
            configs = _draws(plan, n, seed=rep)
            futs = {(i, e): pool.submit(job_train, task, rep, c, plan.constants, e)
                    for i, c in enumerate(configs) for e in lengths}
            # the noise ceiling: the full length again with another seed
            again = {i: pool.submit(job_train, task, rep, c, plan.constants, lengths[-1], 1)
                     for i, c in enumerate(configs)}
            runs = {k: f.result() for k, f in futs.items()}
            full = lengths[-1]
            per_len: dict[str, Any] = {}
            full_scores = [runs[(i, full)]["score"] for i in range(n)]
            again_scores = [again[i].result()["score"] for i in range(n)]
            ceiling = _spearman(again_scores, full_scores)
            log(f"{tname}: full length, another seed: spearman {ceiling}")
            best_full = max(range(n), key=lambda i: full_scores[i])
            for e in lengths:
                scores = [runs[(i, e)]["score"] for i in range(n)]
                order = sorted(range(n), key=lambda i: -scores[i])
                per_len[str(e)] = {
                    "fraction": e / full,
                    "spearman_vs_full": _spearman(scores, full_scores),
                    "full_best_rank": order.index(best_full) + 1,
                    "full_best_in_top_half": order.index(best_full) < n // 2,
                    # what a halving step at this length keeps: the best full-length score in its top half,
                    # and the full-length score of its single best (both against the best there is)
                    "top_half_best_full_score": max(full_scores[i] for i in order[: n // 2]),
                    "top1_full_score": full_scores[order[0]],
                    "best_full_score": full_scores[best_full],
                    "worst_full_score_dropped_first": min(full_scores),
                    "worst_full_is_in_bottom_half": order.index(min(range(n), key=lambda i: full_scores[i])) >= n // 2,
                    "test_acc": stats([runs[(i, e)]["test_acc"] for i in range(n)]),
                    "score": stats(scores),
                    "diverged": sum(runs[(i, e)]["diverged"] for i in range(n)),
                }
                log(f"{tname}: {e} epochs: spearman {per_len[str(e)]['spearman_vs_full']}, full best ranks "
                    f"{per_len[str(e)]['full_best_rank']}/{n}, median test {per_len[str(e)]['test_acc']['median']}")
            results[tname] = {"epochs": lengths, "stage1": s1, "configs": configs, "lengths": per_len,
                              "full_vs_full_other_seed_spearman": ceiling, "full_other_seed_scores": again_scores,
                              "runs": [{"config": i, **runs[(i, e)]} for i in range(n) for e in lengths]}
    payload["results"] = results
    payload["wall_s"] = time.perf_counter() - t_start
    payload["loadavg_at_end"] = loadavg()
    path = write_result(out_dir(args), NAME, payload)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
