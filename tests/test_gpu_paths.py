"""GPU execution paths, checked as far as a CPU-only machine allows.

* ``--gpus-per-trial`` fractions reach the Tune resource request of every stage's trainable;
* the preflight refuses impossible requests on a connected cluster, in seconds, with exit code 2,
  before any trial or experiment file exists (also with ``--cluster-yaml``'s node types);
* a driver started by ``ray job submit`` (RAY_ADDRESS set) is not held to the local machine's GPUs;
* device placement: ``resolve_device``, ``amp_dtype_for``, channels_last models and loaders;
* ``TrainConfig(compile=True)`` trains on CPU.

What needs a real GPU (CUDA placement, bf16 autocast, packing 4 trials per device) is measured by
``benchmarks/gpu_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from ray_util import ROOT, in_process_cluster, patched_environ

from sctune.core.config import ConfigError, TrainConfig
from sctune.core.data import DeviceLoader, resolve_device
from sctune.core.models import build_model
from sctune.core.train import amp_dtype_for, evaluate, fit
from sctune.service import experiment, ray_session
from sctune.service.plan import Anchors, build_plan
from sctune.service.space import load_space

# the module, not the package-level sctune.search() shortcut of the same name
search = importlib.import_module("sctune.search")

SPACE = ROOT / "search_spaces" / "digits.yaml"
CLUSTER_YAML = ROOT / "cluster.yaml"
CL = torch.channels_last

# A refusal that would otherwise pend forever (a trial waiting for a GPU no node has) must come back; this bound
# only tells "answered" from "hung", on a loaded machine too. How fast it answers is a benchmark's business.
HANG_S = 180


# -- --gpus-per-trial -> Tune resources ----------------------------------------------------------------

class _Captured(Exception):
    def __init__(self, trainable):
        self.trainable = trainable


def _capture_trainables(monkeypatch, spec, tmp_path) -> dict[str, object]:
    """Run each stage's setup up to ``Tuner(...)``; return the trainable handed to it, per stage."""
    from ray import tune

    from sctune.service import stages

    def fake_tuner(trainable, *args, **kwargs):
        raise _Captured(trainable)

    monkeypatch.setattr(tune, "Tuner", fake_tuner)
    paths = stages.ExperimentPaths(tmp_path / "exp")
    plan = build_plan(spec, Anchors(max_lr_bound=1.0, min_lr_bound=0.25, wd_prior=1e-4))
    calls = {
        "range": lambda: stages.run_range_stage(spec, paths),
        "search": lambda: stages.run_search_stage(spec, paths, plan),
        "final": lambda: stages.run_final_stage(spec, paths, {"max_lr": 0.5}),
    }
    out = {}
    for stage, call in calls.items():
        with pytest.raises(_Captured) as exc:
            call()
        out[stage] = exc.value.trainable
    return out


def _bundles(trainable) -> list[dict[str, float]]:
    # tune.with_resources on a function trainable stores its request (a PlacementGroupFactory) here
    return trainable._resources.bundles


@pytest.mark.parametrize("gpus", [0.25, 0.5, 1.0, 2.0])
def test_gpus_per_trial_reaches_every_stages_tune_resources(gpus, monkeypatch, tmp_path):
    spec = load_space(SPACE, smoke=True).with_search(gpus_per_trial=gpus, cpus_per_trial=2)
    from sctune.service.stages import trial_resources

    assert trial_resources(spec)[0] == {"cpu": 2.0, "gpu": gpus}
    for stage, trainable in _capture_trainables(monkeypatch, spec, tmp_path).items():
        assert _bundles(trainable) == [{"CPU": 2.0, "GPU": gpus}], stage


def test_cli_gpus_per_trial_flows_into_the_spec(monkeypatch, tmp_path):
    seen = {}

    def fake_run(space, options):
        seen.update(dataclasses.asdict(options))
        raise search.UsageError("--test", "stop here")

    monkeypatch.setattr(search, "run", fake_run)
    assert search.main([str(SPACE), "--smoke", "--gpus-per-trial", "0.25", "--address", "127.0.0.1:1"]) == 2
    assert seen["gpus_per_trial"] == 0.25 and seen["address"] == "127.0.0.1:1"
    # prepare() (what run() calls first) puts it in the spec; with --address there is no local GPU check
    spec, _, _ = search.prepare(SPACE, smoke=True, gpus_per_trial=0.25, address="127.0.0.1:1", storage_path=tmp_path)
    assert spec.search.gpus_per_trial == 0.25


def test_local_run_without_gpu_is_refused_before_ray(monkeypatch, tmp_path):
    monkeypatch.setattr(experiment, "_local_gpu_count", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(search.UsageError, match="no CUDA GPU") as e:
        search.prepare(SPACE, smoke=True, gpus_per_trial=0.25, storage_path=tmp_path)
    assert e.value.path == "--gpus-per-trial"


def test_job_driver_uses_ray_address_not_the_local_gpus(monkeypatch, tmp_path):
    # `ray job submit` runs the driver on the head with RAY_ADDRESS set; a GPU cluster's head has
    # no GPU itself, so the local check must not refuse --gpus-per-trial there.
    monkeypatch.setattr(experiment, "_local_gpu_count", lambda: 0)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    spec, _, _ = search.prepare(SPACE, smoke=True, gpus_per_trial=0.25, storage_path=tmp_path)
    assert spec.search.gpus_per_trial == 0.25
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's own spelling for "start a local instance"
    with pytest.raises(search.UsageError, match="no CUDA GPU"):
        search.prepare(SPACE, smoke=True, gpus_per_trial=0.25, storage_path=tmp_path)
    # the Jobs API address some users export for `ray job` is not a cluster to connect a driver to
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(search.UsageError, match="Jobs/dashboard address") as e:
        search.prepare(SPACE, smoke=True, storage_path=tmp_path)
    assert e.value.path == "--address"


# -- the preflight on a connected cluster ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_cluster():
    """A running 2-CPU, 0-GPU cluster (in-process, loopback, own temp dir, token auth)."""
    with in_process_cluster(head_cpus=2) as cluster:
        yield cluster


def _refused(cpu_cluster, tmp_path, **kw) -> tuple[search.UsageError, float]:
    import ray

    t0 = time.monotonic()
    with pytest.raises(search.UsageError) as e:
        search.run(SPACE, smoke=True, address=cpu_cluster.address, storage_path=tmp_path, name="refused",
                   quiet=True, **kw)
    elapsed = time.monotonic() - t0
    assert not ray.is_initialized()  # disconnected again
    assert not (tmp_path / "refused").exists()  # nothing was started or written: the same command can rerun
    return e.value, elapsed


@pytest.mark.ray
def test_preflight_refuses_gpus_the_cluster_does_not_have(cpu_cluster, tmp_path):
    err, elapsed = _refused(cpu_cluster, tmp_path, gpus_per_trial=0.5)
    assert err.path == "--gpus-per-trial"
    assert "needs a GPU but the cluster has 0 GPUs" in str(err) and "--gpus-per-trial 0" in str(err)
    assert elapsed < HANG_S, f"the preflight took {elapsed:.0f}s"


@pytest.mark.ray
def test_preflight_refuses_more_cpus_than_any_node(cpu_cluster, tmp_path):
    err, _ = _refused(cpu_cluster, tmp_path, cpus_per_trial=4)
    assert err.path == "--cpus-per-trial" and "4 CPUs on one node" in str(err)


@pytest.mark.ray
def test_preflight_with_cluster_yaml_node_types(cpu_cluster, tmp_path, caplog):
    # 8 GPUs per trial: cluster.yaml's totals reach 12 GPUs, but its largest node type has 4, so no
    # node the autoscaler can add holds one trial (only the node types can tell).
    err, elapsed = _refused(cpu_cluster, tmp_path, gpus_per_trial=8, cluster_yaml=str(CLUSTER_YAML))
    assert err.path == "--gpus-per-trial"
    assert "largest node type it can add has 4 GPUs" in str(err)
    assert elapsed < HANG_S

    # 0.25 GPU fits the YAML's GPU nodes: accepted with a warning that trials wait for the autoscaler
    import ray

    spec = load_space(SPACE, smoke=True).with_search(gpus_per_trial=0.25)
    ray.init(address=cpu_cluster.address)
    try:
        with caplog.at_level(logging.WARNING, logger="sctune"):
            ray_session.preflight_check(spec, cluster_yaml=str(CLUSTER_YAML))
    finally:
        ray.shutdown()
    assert any("autoscaler" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.ray
def test_bad_cluster_yaml_fails_before_ray_starts(cpu_cluster, tmp_path):
    err, elapsed = _refused(cpu_cluster, tmp_path, cluster_yaml=str(tmp_path / "missing.yaml"))
    assert err.path == "--cluster-yaml" and elapsed < HANG_S


@pytest.mark.ray
def test_cli_exits_2_on_impossible_gpu_request(cpu_cluster, tmp_path, capsys):
    t0 = time.monotonic()
    code = search.main([str(SPACE), "--smoke", "--address", cpu_cluster.address, "--gpus-per-trial", "1",
                        "--storage-path", str(tmp_path), "--name", "cli", "--quiet"])
    assert code == search.EXIT_USAGE == 2
    assert time.monotonic() - t0 < HANG_S
    err = capsys.readouterr().err
    assert "sctune: error: --gpus-per-trial" in err and "cluster has 0 GPUs" in err
    assert not (tmp_path / "cli").exists()


@pytest.mark.ray
def test_job_driver_preflight_is_against_the_cluster(cpu_cluster, tmp_path, monkeypatch):
    # as inside `ray job submit`: no --address, RAY_ADDRESS set; refused by the *cluster's* preflight
    monkeypatch.setattr(experiment, "_local_gpu_count", lambda: 0)
    with patched_environ({"RAY_ADDRESS": cpu_cluster.address}, drop=()):
        err, _ = _refused(cpu_cluster, tmp_path, gpus_per_trial=0.25)
    assert "the cluster has 0 GPUs" in str(err) and "no CUDA GPU" not in str(err)


# -- device placement ------------------------------------------------------------------------------------

def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="CUDA is not available on this node") as e:
            resolve_device(name)
        assert e.value.path == "device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("bf16", [True, False])
def test_amp_dtype_for(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    amp, fp32 = TrainConfig(amp=True), TrainConfig(amp=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert amp_dtype_for(amp, cuda) == (torch.bfloat16 if bf16 else torch.float16)
    assert amp_dtype_for(amp, cpu) is None  # autocast only on CUDA
    assert amp_dtype_for(fp32, cuda) is None


@pytest.mark.parametrize("augment", [False, True])
def test_device_loader_channels_last_on_cpu(augment):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 16, 16, generator=g), torch.randint(0, 10, (96,), generator=g)
    plain = DeviceLoader(x, y, batch_size=32, device="cpu", augment=augment, seed=3)
    nhwc = DeviceLoader(x, y, batch_size=32, device="cpu", augment=augment, seed=3, channels_last=True)
    assert nhwc.x.is_contiguous(memory_format=CL) and not plain.x.is_contiguous(memory_format=CL)
    for _ in range(2):  # two epochs: same batches, only the memory layout differs
        for (xa, ya), (xb, yb) in zip(plain, nhwc, strict=True):
            assert xb.is_contiguous(memory_format=CL), "a channels_last loader must yield NHWC batches"
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # 1-D signals (N, C, L) have no channels_last layout: the flag is ignored
    seq = DeviceLoader(torch.randn(8, 1, 40), torch.zeros(8, dtype=torch.long), batch_size=4, channels_last=True)
    assert not seq.channels_last and next(iter(seq))[0].shape == (4, 1, 40)


def test_channels_last_model_matches_nchw_on_cpu():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32)).eval()
    nhwc = copy.deepcopy(model).to(memory_format=CL)
    assert all(p.is_contiguous(memory_format=CL) for p in nhwc.parameters() if p.dim() == 4)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x.contiguous(memory_format=CL)), model(x), rtol=1e-4, atol=1e-4)
    loss_a, acc_a = evaluate(model, x, y, batch_size=8)
    loss_b, acc_b = evaluate(nhwc, x, y, batch_size=8, channels_last=True)
    assert loss_a == pytest.approx(loss_b, rel=1e-4) and acc_a == acc_b


def test_gpu_flags_are_harmless_on_cpu():
    # cifar10_resnet56.yaml turns on amp and channels_last; on a CPU node both are no-ops
    cfg = TrainConfig.from_flat({"dataset": "digits", "model": "digits_cnn", "epochs": 1, "batch_size": 64,
                                 "amp": True, "channels_last": True, "device": "cpu", "max_lr": 0.1})
    result = fit(cfg)
    assert result.epochs_run == 1 and not result.diverged
    assert next(result.model.parameters()).dtype == torch.float32


def _have_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.skipif(not _have_cpp_compiler(), reason="torch.compile on CPU (inductor) needs a C++ compiler; "
                    "none found (apt-get install g++)")
def test_compile_trains_on_cpu():
    cfg = TrainConfig.from_flat({"dataset": "synthetic", "model": "mlp", "epochs": 1, "batch_size": 128,
                                 "compile": True, "device": "cpu", "max_lr": 0.1, "seed": 0})
    seen = {}

    def on_epoch(metrics, state_fn):
        seen["state"] = state_fn()

    result = fit(cfg, on_epoch=on_epoch)
    m = result.final
    assert result.epochs_run == 1 and not result.diverged
    assert m["val/acc"] > 0.3, m  # learnable data: well above the 10-class chance level after one epoch
    # checkpoints hold the plain module's weights (no "_orig_mod." prefix), so they load without compile
    keys = list(seen["state"]["model"])
    assert keys and not any(k.startswith("_orig_mod") for k in keys)
    fresh = build_model("mlp", num_classes=10, input_shape=(1, 8, 8))
    fresh.load_state_dict(seen["state"]["model"])


# -- benchmarks/gpu_check.sh -----------------------------------------------------------------------------

def _gpu_check(tmp_path, *args: str, timeout: float = 300):
    """Run benchmarks/gpu_check.sh like a user would, with a Ray isolated like every test cluster."""
    import os
    import secrets
    import subprocess
    import sys

    from ray_util import kill_marked, ray_env, short_tmpdir

    ray_tmp, marker = short_tmpdir("sct-gc-"), secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= ray_env(ray_tmp, marker, secrets.token_hex(32)) | {"PYTHON": sys.executable}
    try:
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "r.json"),
                               "--storage-path", str(tmp_path / "runs"), *args],
                              env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    finally:
        left = kill_marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"gpu_check left Ray processes behind: {left}"
    return proc


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_without_gpu_says_use_tiny(tmp_path):
    import json

    proc = _gpu_check(tmp_path, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "--tiny" in proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["status"] == "no_gpu" and result["host"]["cuda_devices"] == 0


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_check_tiny_runs_the_pipeline_on_cpu(tmp_path):
    import json

    proc = _gpu_check(tmp_path, "--tiny")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["schema"] == "sctune.gpu_check/1" and r["status"] == "ok" and r["mode"] == "tiny"
    assert set(r["stages"]) == {"range", "search", "final"}
    assert all(st["wall_s"] > 0 for st in r["stages"].values())
    assert r["stages"]["range"]["trials"] == len(r["space"]["range_test"]["weight_decays"])
    search_trials = [t for t in r["trials"] if t["stage"] == "search"]
    assert len(search_trials) == r["space"]["search"]["num_samples"] == r["stages"]["search"]["trials"]
    assert all(t["samples_per_s_steady"] > 0 and t["samples"] == r["samples_per_epoch"] for t in r["trials"])
    assert r["stages"]["search"]["samples_per_s_wall"] > 0
    assert r["packing"]["packing_gain"] > 0
    md = (tmp_path / "r.md").read_text()
    assert "| search | ok |" in md and "samples/s" in md
    assert "# sctune GPU check (tiny mode): ok" in proc.stdout  # the table is printed too
    exp = Path(r["experiment"])
    assert (exp / "summary.csv").exists() and (exp / "best.json").exists()
