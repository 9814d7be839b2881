"""GPU check: the paper-shaped workload through sctune's real pipeline, on one machine's GPUs.

Runs ResNet-56 on CIFAR-10-shaped data (CIFAR-10 when it is on disk, else the ``synthetic_cifar``
stand-in: no download, no internet needed) through ``sctune.search.run``, one stage at a time:

1. LR range tests, one Tune trial per weight decay, packed ``--gpus-per-trial`` (0.25: 4 per GPU);
2. a handful of one-cycle trials (Optuna sampler, no early stopping, so every trial runs every
   epoch and its throughput is comparable), packed the same way;
3. the final fit: one seed alone on a GPU, the unpacked reference.

with bf16 autocast (``amp``) and ``channels_last``. It reports, and writes as JSON plus a Markdown
table next to it:

* samples/s per trial (first epoch, and steady: the median of the later epochs) and per stage
  (all samples trained / wall time, Ray's start-up and the trials' data loading included);
* GPU memory per trial (``torch.cuda.max_memory_allocated``, reported by the trials as
  ``perf/gpu_mem_peak_mib``) and per GPU (``nvidia-smi``, sampled every second);
* trials packed per GPU: requested (1 / gpus-per-trial) and seen (CUDA processes per GPU);
* the packing gain: summed steady throughput of the packed trials / the lone final-fit trial's.

``--tiny`` runs the same pipeline on CPU in about a minute (small synthetic images, ResNet-20,
1 epoch), so CI can keep this script working on machines without a GPU.

Usage (see benchmarks/gpu_check.sh):
    benchmarks/gpu_check.sh --out results/gpu_check.json              # on a GPU machine, a few minutes
    benchmarks/gpu_check.sh --out /tmp/gpu_check.json --tiny          # anywhere, ~1 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing sctune

# Before Ray is imported: loopback only, no usage stats, and token auth with a per-run token held
# in the environment (a new local Ray otherwise turns token auth on and writes ~/.ray/auth_token).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if "RAY_AUTH_MODE" not in os.environ and not os.environ.get("RAY_ADDRESS"):
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

SCHEMA = "sctune.gpu_check/1"
FALLBACK_LR_BOUNDS = (0.1, 1.0)  # only if the range tests give no usable bounds (see the JSON)


# -- the workload -------------------------------------------------------------------------------------

def _cifar_on_disk(root: Path) -> bool:
    return (root / "cifar-10-batches-py" / "data_batch_1").exists()


def build_space(args: argparse.Namespace, *, gpus: float, concurrent: int) -> dict[str, Any]:
    """The search-space document: cifar10_resnet56.yaml's recipe with small budgets."""
    import yaml

    doc = yaml.safe_load((REPO / "search_spaces" / "cifar10_resnet56.yaml").read_text())
    doc.pop("smoke", None)
    if args.tiny:
        task = {"dataset": "synthetic", "model": "resnet20"}
        fixed = {"epochs": 1, "batch_size": 128, "eval_batch_size": 512}
        rt = {"num_iter": 20, "eval_every": 10, "weight_decays": [1e-4, 0.0], "repeats": 1}
    else:
        root = Path(args.data_root).expanduser()
        dataset = args.dataset if args.dataset != "auto" else ("cifar10" if _cifar_on_disk(root) else "synthetic_cifar")
        task = {"dataset": dataset, "model": args.model, "data_root": str(root), "download": False}
        fixed = {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": 2000}
        rt = {"num_iter": args.range_iters, "eval_every": max(10, args.range_iters // 6),
              "weight_decays": [1e-3, 1e-4, 1e-5, 0.0], "repeats": 1}
    doc["task"] = task
    doc["fixed"] = {**doc.get("fixed", {}), **fixed, "amp": args.amp, "channels_last": args.channels_last}
    doc["range_test"] = {**doc.get("range_test", {}), **rt}
    doc["search"] = {**doc.get("search", {}), "num_samples": args.trials, "max_concurrent": concurrent,
                     "scheduler": "none",  # no pruning: every trial runs every epoch
                     "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": gpus}
    doc["final"] = {"seeds": 1}
    return doc


# -- nvidia-smi sampling ------------------------------------------------------------------------------

def _smi(*query: str) -> list[list[str]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def gpu_inventory() -> list[dict[str, Any]]:
    rows = _smi("--query-gpu=index,uuid,name,memory.total,driver_version") or []
    return [{"index": int(r[0]), "uuid": r[1], "name": r[2], "memory_total_mib": _num(r[3]), "driver": r[4]}
            for r in rows if len(r) >= 5]


def _num(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


class SmiSampler(threading.Thread):
    """Samples per-GPU memory use, utilisation and CUDA processes once a second, tagged by stage."""

    def __init__(self, period: float = 1.0):
        super().__init__(daemon=True)
        self.period, self.stage = period, "idle"
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.available and not self._halt.is_set():
            gpus = _smi("--query-gpu=index,uuid,memory.used,utilization.gpu") or []
            apps = _smi("--query-compute-apps=gpu_uuid,pid,used_memory") or []
            t = time.time()
            for g in gpus:
                if len(g) < 4:
                    continue
                procs = [a for a in apps if a and a[0] == g[1]]
                self.samples.append({"t": t, "stage": self.stage, "gpu": int(g[0]), "memory_used_mib": _num(g[2]),
                                     "util_pct": _num(g[3]), "processes": len(procs),
                                     "process_mib": [_num(a[2]) for a in procs if len(a) > 2]})
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=15)

    def summary(self, stage: str) -> dict[str, Any] | None:
        rows = [s for s in self.samples if s["stage"] == stage]
        if not rows:
            return None
        out = {}
        for gpu in sorted({r["gpu"] for r in rows}):
            g = [r for r in rows if r["gpu"] == gpu]
            mem = [r["memory_used_mib"] for r in g if r["memory_used_mib"] is not None]
            util = [r["util_pct"] for r in g if r["util_pct"] is not None]
            out[str(gpu)] = {"samples": len(g), "memory_used_mib_max": max(mem, default=None),
                             "util_pct_mean": round(statistics.fmean(util), 1) if util else None,
                             "util_pct_max": max(util, default=None),
                             "cuda_processes_max": max(r["processes"] for r in g),
                             "process_mib_max": max((m for r in g for m in r["process_mib"] if m is not None),
                                                    default=None)}
        return out


# -- reading the trials' results --------------------------------------------------------------------

def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from a TensorBoard run's own event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run_dir.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            if not event.HasField("summary"):
                continue
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    value = float(v.simple_value)
                elif v.HasField("tensor") and v.metadata.plugin_data.plugin_name == "scalars":
                    value = float(tensor_util.make_ndarray(v.tensor))
                else:
                    continue
                out.setdefault(v.tag, []).append((event.step, value))
    return {k: sorted(v) for k, v in out.items()}


def trial_rows(exp: Path, stage: str, *, samples_per_epoch: int) -> list[dict[str, Any]]:
    from sctune.core.train import GPU_MEM, THROUGHPUT, VAL_ACC

    rows = []
    base = exp / "tensorboard" / stage
    for run_dir in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        s = _scalars(run_dir)
        rate = [v for _, v in s.get(THROUGHPUT, [])]
        if not rate:
            continue
        steady = rate[1:] or rate
        mem = [v for _, v in s.get(GPU_MEM, [])]
        acc = s.get(VAL_ACC, [])
        rows.append({"stage": stage, "run": run_dir.name, "epochs": len(rate),
                     "samples_per_s_first_epoch": round(rate[0], 1),
                     "samples_per_s_steady": round(statistics.median(steady), 1),
                     "gpu_mem_peak_mib": round(max(mem), 1) if mem else None,
                     "samples": len(rate) * samples_per_epoch,
                     "val_acc_last": round(acc[-1][1], 4) if acc else None})
    return rows


# -- main ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="result JSON path (a .md table is written next to it)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny data and model, ~1 min, no GPU needed")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPU share per trial (default 0.25 = 4 trials per GPU; 0 with --tiny and no GPU)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="default: 1 (tiny) or 2")
    p.add_argument("--trials", type=int, default=None, help="one-cycle trials in stage 2 (default 8; 2 tiny)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="default: all that fit (trials per GPU x GPUs, capped by CPUs)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per one-cycle trial (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=512, help="default %(default)s (paper: 1000 / 512)")
    p.add_argument("--range-iters", type=int, default=300, help="range-test steps (default %(default)s)")
    p.add_argument("--model", default="resnet56", help="default %(default)s")
    p.add_argument("--dataset", choices=("auto", "cifar10", "synthetic_cifar"), default="auto",
                   help="auto: cifar10 if it is under --data-root, else synthetic_cifar")
    p.add_argument("--data-root", default="~/.cache/sctune", help="torchvision's CIFAR folder (default %(default)s)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="full precision instead of bf16 autocast")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--storage-path", help="where the experiment is written (default: next to --out)")
    p.add_argument("--address", help="use this running Ray cluster instead of starting one here")
    return p


def _sigterm_to_exit(signum, frame):  # `timeout`, a batch scheduler: still write what was measured
    raise SystemExit(f"gpu_check: stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    out = Path(args.out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    import torch

    n_gpus = torch.cuda.device_count()  # does not create a CUDA context in this (driver) process
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (0.25 if n_gpus or not args.tiny else 0.0)
    args.cpus_per_trial = args.cpus_per_trial or (1.0 if args.tiny else 2.0)
    args.trials = args.trials or (2 if args.tiny else 8)
    result: dict[str, Any] = {
        "schema": SCHEMA, "status": "running", "mode": "tiny" if args.tiny else "full",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "cpus": os.cpu_count(), "cuda_devices": n_gpus, "gpus": gpu_inventory()},
        "gpus_per_trial": gpus, "cpus_per_trial": args.cpus_per_trial,
        "trials_per_gpu_requested": (math.floor(1 / gpus + 1e-9) if 0 < gpus < 1 else (1 if gpus else None)),
    }
    if gpus > 0 and n_gpus == 0 and not args.address:
        result.update(status="no_gpu", message="no CUDA GPU visible to torch on this machine; run with --tiny "
                      "(CPU smoke mode) or on a GPU machine, or pass --address of a GPU cluster")
        _write(out, result)
        print(f"gpu_check: {result['message']}", file=sys.stderr)
        return 3
    cpus = os.cpu_count() or 1
    if args.max_concurrent is None:
        by_gpu = (result["trials_per_gpu_requested"] or 1) * max(1, n_gpus) if gpus else args.trials
        args.max_concurrent = max(1, min(by_gpu, args.trials, int(cpus // args.cpus_per_trial) or 1))
    space = build_space(args, gpus=gpus, concurrent=args.max_concurrent)
    result["space"] = {k: space[k] for k in ("task", "fixed", "range_test", "search", "final")}
    storage = Path(args.storage_path).expanduser().resolve() if args.storage_path else out.parent / "gpu_check_runs"
    name = f"gpu_check-{'tiny-' if args.tiny else ''}{datetime.now():%Y%m%d-%H%M%S}"
    storage.mkdir(parents=True, exist_ok=True)
    space_file = storage / f"{name}.yaml"
    import yaml

    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    result["experiment"] = str(storage / name)
    print(f"gpu_check: {result['mode']} mode, {n_gpus} CUDA device(s), {gpus:g} GPU/trial, "
          f"{args.max_concurrent} concurrent, {space['task']['dataset']}/{space['task']['model']}; "
          f"experiment {storage / name}", file=sys.stderr, flush=True)

    import ray

    from sctune.core.config import ConfigError
    from sctune.core.data import load_dataset
    from sctune.search import run
    from sctune.service.experiment import StageError
    from sctune.service.space import load_space

    try:
        spec = load_space(space_file)
        n_train = len(load_dataset(spec.base.task).y_train)  # driver-side, CPU only
    except ConfigError as e:  # e.g. --dataset cifar10 with no copy under --data-root
        result.update(status="error", message=str(e))
        _write(out, result)
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    per_epoch = (n_train // spec.base.batch_size) * spec.base.batch_size  # the loader drops the last batch
    smi = SmiSampler()
    smi.start()
    started_ray = False
    stages: dict[str, Any] = {}
    exit_code = 0
    try:
        if not args.address and not ray.is_initialized():
            ray.init(num_cpus=cpus, num_gpus=n_gpus, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")
            started_ray = True
        common = {"name": name, "storage_path": storage, "address": args.address, "quiet": False}
        for stage in ("range", "search", "final"):
            smi.stage = stage
            t0 = time.monotonic()
            info: dict[str, Any] = {"status": "ok"}
            try:
                kw = {"lr_bounds": FALLBACK_LR_BOUNDS} if stage != "range" else {}
                run(space_file, stage=stage, **common, **kw)
            except StageError as e:
                info.update(status="stopped", message=str(e))
                if stage != "range":  # range: the search falls back to FALLBACK_LR_BOUNDS
                    exit_code = 1
            info["wall_s"] = round(time.monotonic() - t0, 1)
            smi.stage = "idle"
            stages[stage] = info
            if info["status"] != "ok" and stage != "range":
                break
    except BaseException as e:  # keep what was measured
        result.update(status="error", message=f"{type(e).__name__}: {e}")
        exit_code = 2
        if not isinstance(e, Exception):
            raise
    finally:
        smi.stop()
        if started_ray:
            ray.shutdown()
        exp = storage / name
        result["stages"] = stages
        _summarize(result, exp, spec, per_epoch=per_epoch, n_train=n_train, smi=smi)
        result["wall_s"] = round(time.time() - t_start, 1)
        if result["status"] == "running":
            result["status"] = "ok" if exit_code == 0 else "incomplete"
        _write(out, result)
        print(render_markdown(result))
        print(f"gpu_check: wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return exit_code


def _summarize(result: dict[str, Any], exp: Path, spec, *, per_epoch: int, n_train: int, smi: SmiSampler) -> None:
    stages = result["stages"]
    bounds_file = exp / "range_test" / "bounds.json"
    if bounds_file.exists():
        b = json.loads(bounds_file.read_text())
        rt = spec.range_test
        curves = exp / "range_test" / "curves.csv"
        steps = sum(1 for _ in curves.open()) - 1 if curves.exists() else 0
        rng = stages.setdefault("range", {})
        rng.update(trials=len(b.get("trials", [])), bounds_status=b.get("status"), chosen=b.get("chosen"),
                   steps_total=steps, samples_total=steps * spec.base.batch_size,
                   planned_steps=len(rt.weight_decays) * rt.repeats * rt.num_iter)
        if rng.get("wall_s"):
            rng["samples_per_s_wall"] = round(rng["samples_total"] / rng["wall_s"], 1)
    trials = []
    for stage in ("search", "final"):
        rows = trial_rows(exp, stage, samples_per_epoch=per_epoch)
        trials += rows
        st = stages.get(stage)
        if st is None or not rows:
            continue
        st["trials"] = len(rows)
        st["samples_total"] = sum(r["samples"] for r in rows)
        st["samples_per_s_wall"] = round(st["samples_total"] / st["wall_s"], 1) if st.get("wall_s") else None
        st["samples_per_s_per_trial_median"] = round(statistics.median(r["samples_per_s_steady"] for r in rows), 1)
        mem = [r["gpu_mem_peak_mib"] for r in rows if r["gpu_mem_peak_mib"] is not None]
        st["gpu_mem_peak_mib_per_trial_max"] = max(mem, default=None)
    result["trials"] = trials
    result["n_train"], result["samples_per_epoch"] = n_train, per_epoch
    for stage, st in stages.items():
        st["nvidia_smi"] = smi.summary(stage)
    search, final = stages.get("search", {}), stages.get("final", {})
    concurrent = min(spec.search.max_concurrent, spec.search.num_samples)
    packing: dict[str, Any] = {"trials_per_gpu_requested": result["trials_per_gpu_requested"],
                               "max_concurrent": concurrent}
    seen = [g["cuda_processes_max"] for g in (search.get("nvidia_smi") or {}).values()]
    packing["cuda_processes_per_gpu_seen_max"] = max(seen, default=None)
    alone = final.get("samples_per_s_per_trial_median")
    packed = search.get("samples_per_s_per_trial_median")
    if alone and packed:
        packing.update(samples_per_s_alone=alone, samples_per_s_per_trial_packed=packed,
                       samples_per_s_packed_sum=round(packed * concurrent, 1),
                       packing_gain=round(packed * concurrent / alone, 2))
    result["packing"] = packing


def _write(out: Path, result: dict[str, Any]) -> None:
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out)
    out.with_suffix(".md").write_text(render_markdown(result))


def render_markdown(r: dict[str, Any]) -> str:
    host = r.get("host", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_total_mib']:.0f} MiB)" for g in host.get("gpus", [])
                     if g.get("memory_total_mib")) or "none"
    task = (r.get("space") or {}).get("task", {})
    fixed = (r.get("space") or {}).get("fixed", {})
    lines = [f"# sctune GPU check ({r.get('mode')} mode): {r.get('status')}", "",
             f"- started {r.get('started')}, wall {r.get('wall_s', '?')} s",
             f"- host: {host.get('cpus')} CPUs, torch {host.get('torch')} (CUDA {host.get('cuda')}), GPUs: {gpus}",
             f"- workload: {task.get('model')} on {task.get('dataset')}, batch {fixed.get('batch_size')}, "
             f"{fixed.get('epochs')} epoch(s)/trial, amp {fixed.get('amp')}, channels_last {fixed.get('channels_last')}",
             f"- {r.get('gpus_per_trial'):g} GPU and {r.get('cpus_per_trial'):g} CPU per trial"
             + (f" ({r['trials_per_gpu_requested']} trials per GPU requested)" if r.get("trials_per_gpu_requested")
                else ""), ""]
    if r.get("message"):
        lines += [f"**{r['message']}**", ""]
    stages = r.get("stages") or {}
    if (stages.get("range") or {}).get("status") == "stopped":
        lines += [f"Range tests gave no usable LR bounds; the search used the fallback bounds {FALLBACK_LR_BOUNDS} "
                  "(the JSON has the range stage's message).", ""]
    if stages:
        lines += ["| stage | status | wall s | trials | samples | samples/s (wall) | samples/s per trial (median) "
                  "| GPU mem/trial peak MiB | GPU mem used max MiB (nvidia-smi) | CUDA procs/GPU max | GPU util mean % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, st in stages.items():
            smi = st.get("nvidia_smi") or {}
            mem = max((g["memory_used_mib_max"] or 0 for g in smi.values()), default=None)
            procs = max((g["cuda_processes_max"] for g in smi.values()), default=None)
            util = [g["util_pct_mean"] for g in smi.values() if g["util_pct_mean"] is not None]
            lines.append(f"| {name} | {st.get('status')} | {st.get('wall_s')} | {st.get('trials')} | "
                         f"{st.get('samples_total')} | {st.get('samples_per_s_wall')} | "
                         f"{st.get('samples_per_s_per_trial_median', '-')} | "
                         f"{st.get('gpu_mem_peak_mib_per_trial_max', '-')} | {mem if smi else '-'} | "
                         f"{procs if smi else '-'} | {round(statistics.fmean(util), 1) if util else '-'} |")
        lines.append("")
    trials = r.get("trials") or []
    if trials:
        lines += ["| trial | epochs | samples/s first epoch | samples/s steady | GPU mem peak MiB | val/acc |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {t['stage']}/{t['run']} | {t['epochs']} | {t['samples_per_s_first_epoch']} | "
                  f"{t['samples_per_s_steady']} | {t['gpu_mem_peak_mib']} | {t['val_acc_last']} |" for t in trials]
        lines.append("")
    p = r.get("packing") or {}
    if p.get("packing_gain") is not None:
        lines += [f"Packing: {p['max_concurrent']} trials at once, {p['samples_per_s_per_trial_packed']} samples/s "
                  f"each = {p['samples_per_s_packed_sum']} samples/s together, vs {p['samples_per_s_alone']} for one "
                  f"trial alone: **{p['packing_gain']}x**. CUDA processes per GPU seen: "
                  f"{p.get('cuda_processes_per_gpu_seen_max')} (reused Ray workers keep their CUDA context, so this "
                  "can exceed the trials running at once).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
