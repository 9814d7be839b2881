"""sctune's TensorBoard output as a real TensorBoard server shows it (HTTP data API, headless Chromium).

Each server binds 127.0.0.1 only and is killed in a finally (tb_util.make_tb_server). Both loaders
are covered: the default Rust data server (``--load_fast=auto``) and the Python fallback.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tb_util import (
    DEMO_HPARAMS,
    DEMO_METRICS,
    TBServer,
    chromium_path,
    make_tb_server,
    run_chromium,
    write_demo_logdir,
)

from sctune.present import tensorboard as tb

pytestmark = pytest.mark.slow

EXACT_RUN = tb.run_name("final", seed=7)
EXACT = [(0, 0.25), (3, 0.5), (10, 0.875)]  # exactly representable in float32
STATUS = {
    "success": "STATUS_SUCCESS",
    "failure": "STATUS_FAILURE",
    "aborted": "STATUS_UNKNOWN",
    "running": "STATUS_UNKNOWN",
}
needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="chromium not installed")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    logdir = tb.experiment_logdir(tmp_path_factory.mktemp("tb"))
    expected = write_demo_logdir(logdir)
    with tb.TrialLogger(logdir, EXACT_RUN, hparams={"seed": 7}) as log:
        for step, value in EXACT:
            log.scalars({tb.VAL_ACC: value}, step)
    expected[EXACT_RUN] = "success"
    return logdir, expected


@pytest.fixture(scope="module", params=["--load_fast=auto", "--load_fast=false"])
def server(request: pytest.FixtureRequest, demo: tuple[Path, dict[str, str]]) -> Iterator[TBServer]:
    logdir, expected = demo
    with make_tb_server(logdir, extra_args=[request.param]) as srv:
        # TensorBoard loads the logdir in the background: wait until every run is there.
        srv.wait_for(lambda: set(srv.get_json("/data/runs")) >= set(expected))
        yield srv


def groups_by_session(server: TBServer) -> dict[str, tuple[dict, dict]]:
    """session name -> (its session group, the session)."""
    out = {}
    for group in server.hparams_session_groups()["sessionGroups"]:
        for session in group["sessions"]:
            out[session["name"]] = (group, session)
    return out


def test_runs_listed(server: TBServer, demo) -> None:
    _, expected = demo
    runs = server.get_json("/data/runs")
    assert set(expected) <= set(runs)
    assert "." in runs  # the experiment config lives at the logdir root


def test_scalar_tags_and_values(server: TBServer, demo) -> None:
    _, expected = demo
    tags = server.get_json("/data/plugin/scalars/tags")
    for run in expected:
        if run.startswith("search/"):
            assert {tb.TRAIN_LOSS, tb.VAL_ACC, tb.VAL_LOSS, tb.LR, tb.MOMENTUM, tb.THROUGHPUT} <= set(
                tags[run]
            )
        if run.startswith("range/"):
            assert {tb.RANGE_LOSS, tb.RANGE_SMOOTH_LOSS, tb.RANGE_ACC, tb.LR, tb.RANGE_MAX_LR} <= set(
                tags[run]
            )
    points = server.get_json("/data/plugin/scalars/scalars", run=EXACT_RUN, tag=tb.VAL_ACC)
    assert [(step, value) for _, step, value in points] == EXACT
    # A range test eval point: accuracy only every 10 steps, never NaN.
    acc = server.get_json("/data/plugin/scalars/scalars", run="range/wd=0.0001/seed=0", tag=tb.RANGE_ACC)
    assert [step for _, step, _ in acc] == list(range(0, 200, 10))


def test_images_and_text(server: TBServer, demo) -> None:
    _, expected = demo
    image_tags = server.get_json("/data/plugin/images/tags")
    range_runs = [r for r in expected if r.startswith("range/")]
    assert set(range_runs) <= set(image_tags)
    assert all(tb.RANGE_CURVE in image_tags[r] for r in range_runs)
    (meta,) = server.get_json("/data/plugin/images/images", run=range_runs[0], tag=tb.RANGE_CURVE, sample="0")
    assert server.get(f"/data/plugin/images/individualImage?{meta['query']}")[:8] == b"\x89PNG\r\n\x1a\n"
    (text,) = server.get_json("/data/plugin/text/text", run=range_runs[0], tag=tb.RANGE_BOUNDS_TEXT)
    assert "<table>" in text["text"] and "super-convergence likely" in text["text"]  # markdown rendered


def test_hparams_experiment(server: TBServer) -> None:
    experiment = server.hparams_experiment()
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert set(infos) == set(DEMO_HPARAMS)
    assert infos["max_lr"]["displayName"] == "max LR"
    assert infos["max_lr"]["domainInterval"] == {"minValue": 0.05, "maxValue": 3.0}
    assert infos["optimizer"]["domainDiscrete"] == ["sgd", "adam"]
    assert [(m["name"]["tag"], m["displayName"]) for m in experiment["metricInfos"]] == DEMO_METRICS


def test_hparams_session_groups(server: TBServer, demo) -> None:
    _, expected = demo
    sessions = groups_by_session(server)
    assert set(sessions) == set(expected)
    for name, status in expected.items():
        group, session = sessions[name]
        assert session["status"] == STATUS[status], name
        assert bool(session.get("endTimeSecs")) == (status != "running"), name
        assert session["startTimeSecs"] > 0
    group, session = sessions["search/demo_00002"]
    assert group["hparams"] == {"max_lr": 0.3, "optimizer": "adam", "dropout": 0.2, "wd": 0.0001}
    metrics = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
    assert metrics[tb.TEST_ACC] == pytest.approx(0.87, rel=1e-6)
    assert metrics[tb.VAL_ACC] == pytest.approx(0.88 * (1 - 2.718281828**-5), rel=1e-5)
    # Seeds of one weight decay are one session group (TrialLogger(group=...)).
    group, _ = sessions["range/wd=0.0001/seed=1"]
    assert group["name"] == "range/wd=0.0001"
    assert sorted(s["name"] for s in group["sessions"]) == [
        "range/wd=0.0001/seed=0",
        "range/wd=0.0001/seed=1",
    ]
    assert {m["name"]["tag"]: m["value"] for m in group["metricValues"]}[tb.RANGE_MAX_LR] == pytest.approx(
        1.2
    )
    # The final metric value is the one logged last.
    _, session = sessions[EXACT_RUN]
    assert {m["name"]["tag"]: (m["trainingStep"], m["value"]) for m in session["metricValues"]} == {
        tb.VAL_ACC: EXACT[-1]
    }


@pytest.mark.parametrize("load_fast", ["--load_fast=auto", "--load_fast=false"])
def test_session_is_listed_while_the_trial_runs(tmp_path: Path, load_fast: str) -> None:
    """The point of writing hparams from the worker: a running trial shows up at once."""
    logdir = tb.experiment_logdir(tmp_path)
    tb.write_hparams_config(
        logdir,
        hparams={"max_lr": {"type": "float", "low": 0.1, "high": 3.0}},
        metrics=[(tb.VAL_ACC, "val accuracy")],
    )
    with make_tb_server(logdir, extra_args=[load_fast]) as server:
        live = tb.TrialLogger(logdir, "search/live_00000", hparams={"max_lr": 1.5})
        live.scalars({tb.VAL_ACC: 0.5}, 1)
        live.flush()
        group, session = server.wait_for(lambda: groups_by_session(server).get("search/live_00000"))
        assert group["hparams"] == {"max_lr": 1.5}
        assert session["status"] == "STATUS_UNKNOWN" and not session.get("endTimeSecs")

        live.scalars({tb.VAL_ACC: 0.75}, 2)
        live.end("success")
        live.close()

        def ended():
            _, s = groups_by_session(server)["search/live_00000"]
            values = {m["name"]["tag"]: m["value"] for m in s["metricValues"]}
            return s if s["status"] == "STATUS_SUCCESS" and values.get(tb.VAL_ACC) == 0.75 else None

        server.wait_for(ended)

        # The driver closes a trial whose worker died, while TensorBoard watches.
        lost = tb.TrialLogger(logdir, "search/lost_00001", hparams={"max_lr": 2.5})
        lost.scalars({tb.VAL_ACC: 0.25}, 4)
        lost.close()
        assert tb.end_session(logdir, "search/lost_00001", status="failure")
        server.wait_for(
            lambda: (
                groups_by_session(server).get("search/lost_00001", (None, {}))[1].get("status")
                == "STATUS_FAILURE"
            )
        )


@needs_chromium
def test_chromium_renders_the_runs(demo) -> None:
    """The page loads in a real browser and lists the runs (time-series runs table, light DOM)."""
    logdir, expected = demo
    with make_tb_server(logdir) as server:
        server.wait_for(lambda: set(server.get_json("/data/runs")) >= set(expected))
        dom = run_chromium(f"{server.base_url}/#timeseries", dump_dom=True)
        missing = [run for run in expected if run not in dom]
        assert not missing, f"runs not in the rendered page: {missing}"
        dom = run_chromium(f"{server.base_url}/?runFilter=search#timeseries", dump_dom=True)
        assert "search/demo_00000" in dom and "range/wd=0.0001/seed=0" not in dom


@needs_chromium
def test_docs_screenshot_script(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "docs" / "tb_screenshots.py"
    out = tmp_path / "shots"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "logdir"), str(out), "--demo"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(script.parent))
    try:
        from tb_screenshots import ink_fraction
    finally:
        sys.path.remove(str(script.parent))
    for name in ("scalars", "hparams_table", "images", "hparams_parallel_coords"):
        png = out / f"{name}.png"
        assert png.exists(), f"{name}.png missing; log:\n{proc.stderr[-3000:]}"
        assert ink_fraction(png) > 0.05, f"{name}.png looks blank"
    text = (out / "hparams_text.txt").read_text()
    assert "search/demo_00000" in text and "range/wd=0.001" in text
    assert "final/seed=0" in (out / "timeseries_dom.html").read_text()
