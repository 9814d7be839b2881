"""Tests for cluster.yaml (Ray's own launcher validator + security properties) and
sctune.service.cluster (preflight capacity checks, launcher-YAML limits, live snapshot)."""

from __future__ import annotations

import copy
import json
import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sctune.service.cluster import (
    PreflightError,
    autoscale_limits,
    autoscale_node_types,
    cluster_snapshot,
    preflight,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


# ------------------------------------------------------------------ cluster.yaml


@pytest.fixture(scope="module")
def raw_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared_config(raw_config) -> dict:
    """The config as `ray up` sees it before talking to AWS: provider defaults merged in,
    setup commands merged, per-type min/max filled (ray.autoscaler's prepare_config)."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw_config))


def _ray_start_args(commands: list[str], marker: str) -> tuple[str, list[str]]:
    """Return (whole command, argv after `ray start`) of the one command containing marker."""
    hits = [c for c in commands if marker in c]
    assert len(hits) == 1, f"expected exactly one {marker!r} command, got {hits}"
    cmd = hits[0]
    start = cmd.split("ray start", 1)[1]
    return cmd, shlex.split(start)


def test_cluster_yaml_passes_rays_launcher_validator(prepared_config):
    # The same two steps `ray up` runs offline (commands._bootstrap_config): fill in the
    # AWS provider defaults, then validate against ray/autoscaler/ray-schema.json plus
    # the cross-field checks (head_node_type, min_workers vs max_workers, ...).
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared_config)


def test_validator_is_not_vacuous(prepared_config):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(prepared_config)
    bad["unknown_top_level_key"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(prepared_config)
    bad["available_node_types"]["gpu_1x_a10g"]["resources"]["GPU"] = 0.5  # launcher wants integers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_ray_start_flags_exist_in_this_ray(prepared_config):
    """Parse the start commands with Ray's own `ray start` CLI so a misspelled or removed
    flag fails here rather than on a freshly launched cluster."""
    from ray.scripts.scripts import start

    for key, marker in (
        ("head_start_ray_commands", "ray start --head"),
        ("worker_start_ray_commands", "ray start --address"),
    ):
        _, argv = _ray_start_args(prepared_config[key], marker)
        argv = [a.replace("$RAY_HEAD_IP", "10.0.0.1") for a in argv]
        start.make_context("start", argv)  # raises click.UsageError on unknown options


def test_gpu_cluster_shape_and_autoscaling(raw_config, prepared_config):
    assert raw_config["provider"]["type"] == "aws"
    types = raw_config["available_node_types"]
    head = raw_config["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0, "head is CPU-only"
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 2
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, f"{name}: GPU nodes should scale from zero"
        assert t["max_workers"] > 0
        assert t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p"))
    assert raw_config["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())
    assert raw_config["idle_timeout_minutes"] > 0
    # Every node type lists its resources (autoscale_limits relies on it).
    assert all(t.get("resources") for t in types.values())
    assert prepared_config["available_node_types"][head]["max_workers"] == 0


def test_working_tree_is_mounted_and_installed(raw_config, prepared_config):
    mounts = raw_config["file_mounts"]
    repo_remote = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert len(repo_remote) == 1
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = " && ".join(prepared_config[key])
        assert f"-e {repo_remote[0]}" in cmds and "pip install" in cmds
        assert "ray[default" in cmds  # dashboard / Jobs API / autoscaler on every node


def test_shared_storage_is_mounted_on_every_node(prepared_config):
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = " ".join(prepared_config[key])
        assert "mount -t nfs4" in cmds and "/mnt/sctune" in cmds, key


def test_dashboard_bound_to_loopback_only(raw_config, prepared_config):
    cmd, argv = _ray_start_args(prepared_config["head_start_ray_commands"], "ray start --head")
    assert "--dashboard-host=127.0.0.1" in argv
    assert sum(a.startswith("--dashboard-host") for a in argv) == 1
    # Nothing binds to all interfaces: not in our file (comments included), and not in
    # the launcher defaults that prepare_config merged in (the stock head command does).
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in json.dumps(prepared_config)
    assert "::" not in " ".join(argv)


def test_usage_stats_disabled_everywhere(prepared_config):
    for key, marker in (
        ("head_start_ray_commands", "ray start --head"),
        ("worker_start_ray_commands", "ray start --address"),
    ):
        cmd, argv = _ray_start_args(prepared_config[key], marker)
        assert "--disable-usage-stats" in argv, key
        assert "RAY_USAGE_STATS_ENABLED=0" in cmd, key


def test_token_auth_on_for_every_node(raw_config, prepared_config):
    # RAY_AUTH_MODE=token in the environment of each `ray start` ...
    for key, marker in (
        ("head_start_ray_commands", "ray start --head"),
        ("worker_start_ray_commands", "ray start --address"),
    ):
        cmd, _ = _ray_start_args(prepared_config[key], marker)
        assert "RAY_AUTH_MODE=token" in cmd.split("ray start", 1)[0], key
    # ... and in every shell on the nodes (docs: initialization_commands + ~/.bashrc) ...
    assert any("export RAY_AUTH_MODE=token" in c for c in raw_config["initialization_commands"])
    # ... with the locally generated token copied to every node (docs: file_mounts).
    token_mounts = {r: loc for r, loc in raw_config["file_mounts"].items() if r.endswith("/.ray/auth_token")}
    assert list(token_mounts.values()) == ["~/.ray/auth_token"]
    assert any("chmod 600 ~/.ray/auth_token" in c for c in prepared_config["worker_setup_commands"])
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()


def test_no_extra_open_ports(raw_config):
    # Only the launcher's default rules (SSH + intra-cluster); no IpPermissions added and
    # no hand-made security groups that could open more.
    assert not raw_config["provider"].get("security_group", {}).get("IpPermissions")
    for name, t in raw_config["available_node_types"].items():
        assert "SecurityGroupIds" not in t["node_config"], name
        assert "NetworkInterfaces" not in t["node_config"], name


# ------------------------------------------------------------- autoscale_limits


def test_autoscale_limits_of_cluster_yaml(raw_config):
    limits = autoscale_limits(CLUSTER_YAML)
    types = raw_config["available_node_types"]
    expect_gpu = sum(
        t["max_workers"] * t["resources"].get("GPU", 0) for t in types.values() if "max_workers" in t
    )
    assert limits["GPU"] == expect_gpu == 12  # 4 x g5.xlarge + 2 x g5.12xlarge
    assert limits["CPU"] == 4 * 4 + 2 * 48
    shapes = autoscale_node_types(CLUSTER_YAML)
    assert {"CPU": 48.0, "GPU": 4.0} in shapes and {"CPU": 4.0, "GPU": 1.0} in shapes


def _write(tmp_path: Path, config: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(config))
    return p


def test_autoscale_limits_respects_global_cap(tmp_path):
    config = {
        "cluster_name": "t",
        "max_workers": 3,
        "provider": {"type": "aws", "region": "us-west-2"},
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 2}, "node_config": {}},
            "big": {"resources": {"CPU": 48, "GPU": 4}, "max_workers": 2, "node_config": {}},
            "small": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4, "node_config": {}},
        },
    }
    limits = autoscale_limits(_write(tmp_path, config))
    # 3 workers at most: 2 big + 1 small for both resources.
    assert limits == {"CPU": 2 + 2 * 48 + 8, "GPU": 2 * 4 + 1}


def test_autoscale_limits_unknown_cases(tmp_path):
    base = {
        "max_workers": 2,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 2}, "node_config": {}},
            "w": {"resources": {}, "node_config": {}},  # autodetected at `ray up`
        },
    }
    assert autoscale_limits(_write(tmp_path, base)) is None
    assert autoscale_limits(_write(tmp_path, {"cluster_name": "legacy", "head_node": {}})) is None
    unbounded = copy.deepcopy(base)
    del unbounded["max_workers"]
    unbounded["available_node_types"]["w"]["resources"] = {"CPU": 4}
    assert autoscale_limits(_write(tmp_path, unbounded)) is None
    (tmp_path / "bad.yaml").write_text("- not\n- a mapping\n")
    with pytest.raises(ValueError):
        autoscale_limits(tmp_path / "bad.yaml")


# -------------------------------------------------------------------- preflight


def test_impossible_gpu_request_fails_with_option_name():
    with pytest.raises(PreflightError) as e:
        preflight(cpus_per_trial=1, gpus_per_trial=1, max_concurrent=4, available={"CPU": 8})
    msg = str(e.value)
    assert msg.startswith("--gpus-per-trial 1 needs a GPU but the cluster has 0 GPUs")
    assert "--gpus-per-trial 0" in msg  # the way out

    with pytest.raises(PreflightError, match=r"0 GPUs \(and cannot autoscale to any\)"):
        preflight(
            cpus_per_trial=1,
            gpus_per_trial=1,
            max_concurrent=4,
            available={"CPU": 8},
            autoscale_max={"CPU": 64},
        )
    assert issubclass(PreflightError, ValueError)


def test_fractional_gpus_pack_per_device():
    one_gpu = {"CPU": 8, "GPU": 1}
    assert preflight(cpus_per_trial=1, gpus_per_trial=0.25, max_concurrent=4, available=one_gpu) == []
    (w,) = preflight(cpus_per_trial=1, gpus_per_trial=0.25, max_concurrent=5, available=one_gpu)
    assert "only 4 trials fit at once" in w and "1 will queue" in w
    # Exact fixed-point arithmetic: 1 / 0.2 is 5 trials, not 4.999...
    assert (
        preflight(cpus_per_trial=1, gpus_per_trial=0.2, max_concurrent=5, available={"CPU": 10, "GPU": 1})
        == []
    )
    # Shares never span devices: 4 GPUs at 0.3 hold 4 * 3 = 12 trials, not floor(4 / 0.3) = 13.
    four = {"CPU": 64, "GPU": 4}
    assert preflight(cpus_per_trial=1, gpus_per_trial=0.3, max_concurrent=12, available=four) == []
    (w,) = preflight(cpus_per_trial=1, gpus_per_trial=0.3, max_concurrent=13, available=four)
    assert "only 12 trials" in w
    # CPUs can be the binding constraint too.
    (w,) = preflight(cpus_per_trial=4, gpus_per_trial=0.25, max_concurrent=4, available=one_gpu)
    assert "only 2 trials" in w


def test_whole_gpus_per_trial():
    assert (
        preflight(cpus_per_trial=2, gpus_per_trial=2, max_concurrent=2, available={"CPU": 8, "GPU": 4}) == []
    )
    with pytest.raises(PreflightError, match="whole number"):
        preflight(cpus_per_trial=1, gpus_per_trial=1.5, max_concurrent=1, available={"CPU": 8, "GPU": 4})


def test_trial_must_fit_on_one_node():
    nodes = [{"CPU": 8}, {"CPU": 8}]
    total = {"CPU": 16}
    # The total alone would accept it ...
    assert preflight(cpus_per_trial=12, gpus_per_trial=0, max_concurrent=1, available=total) == []
    # ... but no single node can run it.
    with pytest.raises(PreflightError) as e:
        preflight(cpus_per_trial=12, gpus_per_trial=0, max_concurrent=1, available=total, per_node=nodes)
    assert str(e.value) == "--cpus-per-trial 12 needs 12 CPUs on one node but the largest node has 8 CPUs"

    # GPUs on one node, CPUs on another: each resource exists, never together.
    split = [{"CPU": 2, "GPU": 2}, {"CPU": 6}]
    with pytest.raises(PreflightError, match="fits no single node"):
        preflight(
            cpus_per_trial=4,
            gpus_per_trial=2,
            max_concurrent=1,
            available={"CPU": 8, "GPU": 2},
            per_node=split,
        )


def test_per_node_concurrency_sums_nodes():
    nodes = [{"CPU": 4, "GPU": 1}, {"CPU": 48, "GPU": 4}]
    total = {"CPU": 52, "GPU": 5}
    # 0.25 GPU, 1 CPU: 4 on the small node + 16 on the big one.
    assert (
        preflight(cpus_per_trial=1, gpus_per_trial=0.25, max_concurrent=20, available=total, per_node=nodes)
        == []
    )
    (w,) = preflight(
        cpus_per_trial=1, gpus_per_trial=0.25, max_concurrent=21, available=total, per_node=nodes
    )
    assert "only 20 trials" in w
    # 3 CPUs each: the small node fits 1 (CPU-bound), the big one 16 (GPU-bound).
    (w,) = preflight(
        cpus_per_trial=3, gpus_per_trial=0.25, max_concurrent=20, available=total, per_node=nodes
    )
    assert "only 17 trials" in w and "3 will queue" in w


def test_autoscale_max_makes_it_feasible():
    # Fresh cluster from cluster.yaml: just the CPU-only head, GPU workers scale from zero.
    head_only = {"CPU": 0.0, "GPU": 0.0}
    limits = autoscale_limits(CLUSTER_YAML)
    shapes = autoscale_node_types(CLUSTER_YAML)
    warnings = preflight(
        cpus_per_trial=1,
        gpus_per_trial=0.25,
        max_concurrent=8,
        available=head_only,
        per_node=[head_only],
        autoscale_max=limits,
        autoscale_node_types=shapes,
    )
    assert any("autoscaler" in w for w in warnings)
    assert not any("will queue" in w for w in warnings)  # 8 <= what full scale holds

    # Without the node-type shapes the single-node fit cannot be proven: warn, don't fail.
    warnings = preflight(
        cpus_per_trial=1,
        gpus_per_trial=1,
        max_concurrent=1,
        available=head_only,
        per_node=[head_only],
        autoscale_max=limits,
    )
    assert any("could not be verified" in w for w in warnings)

    # Bigger than any node type it can add: still an error, explaining both.
    with pytest.raises(PreflightError) as e:
        preflight(
            cpus_per_trial=64,
            gpus_per_trial=1,
            max_concurrent=1,
            available=head_only,
            per_node=[head_only],
            autoscale_max=limits,
            autoscale_node_types=shapes,
        )
    msg = str(e.value)
    assert msg.startswith("--cpus-per-trial 64 needs 64 CPUs on one node")
    assert "largest node type it can add has 48 CPUs" in msg
    assert "--gpus-per-trial" not in msg  # GPUs are available after scale-up


def test_warnings_for_queueing():
    (w,) = preflight(cpus_per_trial=1, gpus_per_trial=0, max_concurrent=8, available={"CPU": 2})
    assert w.startswith("max_concurrent 8 but only 2 trials fit at once")
    assert w.endswith("6 will queue")

    # Autoscaling: more fit later than now, and some still queue at full scale.
    ws = preflight(
        cpus_per_trial=4,
        gpus_per_trial=1,
        max_concurrent=20,
        available={"CPU": 4, "GPU": 1},
        autoscale_max={"CPU": 112, "GPU": 12},
    )
    assert ws == [
        "max_concurrent 20 but only 12 trials fit at once even at full autoscale (4 CPUs, 1 GPU each): 8 will queue"
    ]
    ws = preflight(
        cpus_per_trial=4,
        gpus_per_trial=1,
        max_concurrent=6,
        available={"CPU": 4, "GPU": 1},
        autoscale_max={"CPU": 112, "GPU": 12},
    )
    assert len(ws) == 1 and "autoscaler must add nodes for the other 5" in ws[0]

    (w,) = preflight(cpus_per_trial=1, gpus_per_trial=0, max_concurrent=1, available={"CPU": 8, "GPU": 2})
    assert "train on CPU" in w


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cpus_per_trial": -1}, "--cpus-per-trial must be >= 0"),
        ({"cpus_per_trial": 0}, "--cpus-per-trial must be > 0"),
        ({"gpus_per_trial": -0.5}, "--gpus-per-trial must be >= 0"),
        ({"gpus_per_trial": 0.00001}, "precision"),
        ({"gpus_per_trial": float("nan")}, "finite"),
        ({"cpus_per_trial": "2"}, "must be a number"),
        ({"cpus_per_trial": True}, "must be a number"),
        ({"max_concurrent": 0}, "max_concurrent must be >= 1"),
        ({"max_concurrent": 2.5}, "max_concurrent must be an integer"),
        ({"available": {"CPU": -1}}, r"available\['CPU'\] must be >= 0"),
        ({"available": [("CPU", 1)]}, "mapping"),
    ],
)
def test_invalid_inputs(kwargs, match):
    args = {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 1, "available": {"CPU": 8}}
    args.update(kwargs)
    with pytest.raises(PreflightError, match=match):
        preflight(**args)


def test_fractional_gpu_between_zero_and_one_is_fine():
    for g in (0.0001, 0.1, 0.5, 0.999, 1):
        assert (
            preflight(cpus_per_trial=0.5, gpus_per_trial=g, max_concurrent=1, available={"CPU": 1, "GPU": 1})
            == []
        )


def test_import_does_not_import_ray():
    code = "import sys, sctune.service.cluster; sys.exit('ray' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_snapshot_needs_a_connection():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already connected in this process")
    with pytest.raises(RuntimeError, match="ray.init"):
        cluster_snapshot()


# ------------------------------------------------------------------- real Ray


@pytest.fixture
def local_ray():
    """In-process Ray on 127.0.0.1 only, no dashboard, no usage stats, with token auth on
    (token from the environment, so nothing is written to ~/.ray/auth_token)."""
    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind to loopback, not the host IP
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    saved = {k: os.environ.get(k) for k in (*env, "RAY_AUTH_TOKEN_PATH")}
    os.environ.update(env)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)

    import ray
    from ray._private import ray_constants

    # ray_constants reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import time; if Ray was
    # imported before this fixture ran, apply it to this process by hand too.
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        if ray.is_initialized():
            pytest.skip("a Ray runtime is already connected in this process")
        # Ray caches the auth mode and token per process when it is first imported;
        # re-read them from the environment just set (as Ray's own tests do).
        _reset_ray_auth_cache()
        try:
            ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1")
            yield ray
        finally:
            ray.shutdown()  # also cleans up after a failed ray.init
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # Forget this test's token/mode so a later ray.init in the session starts clean.
        _reset_ray_auth_cache()


def _reset_ray_auth_cache() -> None:
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # pragma: no cover - Ray without token auth
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.mark.ray
def test_snapshot_and_preflight_against_real_ray(local_ray):
    total, nodes = cluster_snapshot()
    assert total["CPU"] == 2
    assert total.get("GPU", 0) == 0
    assert len(nodes) == 1 and nodes[0]["CPU"] == 2
    node_ips = {k for k in nodes[0] if k.startswith("node:") and k != "node:__internal_head__"}
    assert node_ips == {"node:127.0.0.1"}, nodes[0]  # loopback only
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert is_token_auth_enabled()  # the snapshot went through an authenticated GCS

    assert (
        preflight(cpus_per_trial=1, gpus_per_trial=0, max_concurrent=2, available=total, per_node=nodes) == []
    )
    (w,) = preflight(cpus_per_trial=1, gpus_per_trial=0, max_concurrent=3, available=total, per_node=nodes)
    assert "only 2 trials fit at once" in w
    with pytest.raises(PreflightError, match="--gpus-per-trial 1 needs a GPU but the cluster has 0 GPUs"):
        preflight(cpus_per_trial=1, gpus_per_trial=1, max_concurrent=1, available=total, per_node=nodes)
    with pytest.raises(PreflightError, match="--cpus-per-trial 4 needs 4 CPUs on one node"):
        preflight(cpus_per_trial=4, gpus_per_trial=0, max_concurrent=1, available=total, per_node=nodes)
