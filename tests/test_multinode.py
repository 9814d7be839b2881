"""A smoke search on a multi-node Ray cluster: trials of every stage spread over the worker nodes,
every result in the one storage path.

``ray.cluster_utils.Cluster`` runs a head that offers no CPU (like cluster.yaml's head: no trial
next to the control plane) and two 1-CPU worker nodes, each with a custom resource, all as separate
raylets on 127.0.0.1. Each trial reports the id of the node it ran on (``node_id``), which lands in
bounds.json and summary.csv.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from ray_util import ROOT, in_process_cluster

from sctune.search import run
from sctune.service.space import load_space

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SPACE = ROOT / "search_spaces" / "digits.yaml"


def test_smoke_search_spreads_over_worker_nodes(tmp_path):
    spec = load_space(SPACE, smoke=True)
    assert spec.search.max_concurrent >= 2 and spec.search.cpus_per_trial == 1
    storage = tmp_path / "storage"
    workers = [{"num_cpus": 1, "resources": {"sctune_worker": 1, "worker_a": 1}},
               {"num_cpus": 1, "resources": {"sctune_worker": 1, "worker_b": 1}}]
    with in_process_cluster(head_cpus=0, workers=workers) as cluster:
        import ray

        head_id = cluster.head_node.node_id
        worker_ids = {n.node_id for n in cluster.worker_nodes}
        assert len(worker_ids) == 2 and head_id not in worker_ids
        # the cluster as the preflight sees it: 2 CPUs, on two nodes; the custom resources are there
        ray.init(address=cluster.address)
        try:
            from sctune.service.cluster import cluster_snapshot

            total, nodes = cluster_snapshot()
        finally:
            ray.shutdown()
        assert total["CPU"] == 2 and total["sctune_worker"] == 2 and total["worker_a"] == total["worker_b"] == 1
        assert sorted(n.get("CPU", 0) for n in nodes) == [0, 1, 1]
        assert all(k == "node:127.0.0.1" for n in nodes for k in n if k.startswith("node:") and "internal" not in k)

        res = run(SPACE, name="multi", storage_path=storage, address=cluster.address, smoke=True, quiet=True)
        assert not ray.is_initialized()  # run() disconnected from the cluster it joined
    assert res.stages_run == ["range", "search", "final"]

    exp = storage / "multi"
    # stage 1: the range tests ran on both workers (never on the CPU-less head)
    bounds = json.loads((exp / "range_test" / "bounds.json").read_text())
    assert bounds["status"] == "ok"
    n_range = len(spec.range_test.weight_decays) * spec.range_test.repeats
    assert len(bounds["trials"]) == n_range
    range_nodes = [t["node_id"] for t in bounds["trials"]]
    assert set(range_nodes) == worker_ids, range_nodes
    # stage 2: likewise for the search trials
    summary = pd.read_csv(exp / "summary.csv")
    # stage 2 spends search.num_samples full trainings' worth as complete schedules (halving)
    assert summary["epochs_run"].sum() <= spec.search.num_samples * spec.base.epochs
    assert (summary["epochs"] == spec.base.epochs).any()
    # on worker nodes only; which of the two each short schedule lands on is Ray's choice (halving can run
    # them one after another, all on one node), so spreading is asserted over the stages together below
    assert set(summary["node_id"]) <= worker_ids, summary[["trial_id", "node_id"]]
    # stage 3
    best = json.loads((exp / "best.json").read_text())
    assert best["final"]["test_acc_mean"] is not None
    assert {r["node_id"] for r in best["final"]["runs"]} <= worker_ids
    assert set(range_nodes) | set(summary["node_id"]) | {r["node_id"] for r in best["final"]["runs"]} == worker_ids

    # all results in one place: the storage path holds every stage's outputs and the trials'
    # checkpoints and TensorBoard runs, whichever node wrote them
    for f in ("state.json", "space.yaml", "range_test/curves.csv", "summary.csv", "best.json", "report.md"):
        assert (exp / f).is_file(), f
    tb = exp / "tensorboard"
    runs = {p.parent.relative_to(tb).as_posix() for p in tb.rglob("events.out.tfevents.*")}
    assert sum(r.startswith("range/") for r in runs) == n_range
    assert sum(r.startswith("search/") for r in runs) == len(summary)
    assert sum(r.startswith("final/") for r in runs) == spec.final.seeds
    for stage in ("range", "search", "final"):
        assert (exp / "ray" / stage).is_dir()
    checkpoints = list((exp / "ray" / "search").glob("*/checkpoint_*"))
    assert checkpoints, "search-trial checkpoints should sit under the storage path"
    assert [p for p in storage.iterdir()] == [exp]
