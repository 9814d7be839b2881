"""sctune.present.tensorboard: write runs, read them back with TensorBoard's own event reader."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata

from sctune.core import curves as figures
from sctune.present import report
from sctune.present import tensorboard as tb

matplotlib.use("Agg")


def load(run_dir: Path) -> ea.EventAccumulator:
    """All events of one run (size_guidance 0 = keep everything)."""
    acc = ea.EventAccumulator(str(run_dir), size_guidance={k: 0 for k in (ea.SCALARS, ea.IMAGES, ea.TENSORS)})
    return acc.Reload()


def scalars(acc: ea.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def hparams_content(acc: ea.EventAccumulator) -> dict[str, bytes]:
    return acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)


def session_start(acc: ea.EventAccumulator):
    return hp_metadata.parse_session_start_info_plugin_data(
        hparams_content(acc)[hp_metadata.SESSION_START_INFO_TAG]
    )


def session_end(acc: ea.EventAccumulator):
    return hp_metadata.parse_session_end_info_plugin_data(
        hparams_content(acc)[hp_metadata.SESSION_END_INFO_TAG]
    )


def text_of(acc: ea.EventAccumulator, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]


@dataclass
class FakeBounds:
    """The duck type sctune.core.bounds' result offers: attributes + to_dict()."""

    min_lr: float | None
    max_lr: float | None
    status: str = "ok"
    confidence: float = 0.8
    verdict: dict | None = None

    def to_dict(self) -> dict:
        return {
            "min_lr": self.min_lr,
            "max_lr": self.max_lr,
            "status": self.status,
            "confidence": self.confidence,
            "verdict": self.verdict,
        }


def range_frame(n: int = 60, *, diverge: bool = False, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lr = np.linspace(1e-3, 3.0, n)
    loss = 2.3 - 1.5 * np.tanh(lr) + 0.05 * rng.standard_normal(n)
    if diverge:
        loss[-5:] = [10.0, 100.0, 1e4, np.inf, np.nan]
    smooth = pd.Series(loss).ewm(alpha=0.2).mean().to_numpy()
    acc = np.full(n, np.nan)
    acc[::10] = np.linspace(0.1, 0.9, len(acc[::10]))
    val_loss = np.where(np.isfinite(acc), 1.0 - acc, np.nan)
    return pd.DataFrame(
        {
            "step": np.arange(n),
            "lr": lr,
            "loss": loss,
            "smooth_loss": smooth,
            "acc": acc,
            "val_loss": val_loss,
        }
    )


# ---------------------------------------------------------------------------------------------
# names


def test_run_name_examples_and_sanitizing() -> None:
    assert tb.run_name("range", wd=1e-4, seed=1) == "range/wd=0.0001/seed=1"
    assert tb.run_name("search", trial="a1b2_00003") == "search/a1b2_00003"
    assert tb.run_name("final", seed=0) == "final/seed=0"
    assert tb.run_name("range", wd=0.0, seed=2) == "range/wd=0.0/seed=2"
    # A value can never add a path level or escape the logdir.
    name = tb.run_name("search", trial="../../etc/x y")
    assert name == "search/.._.._etc_x_y" and len(Path(name).parts) == 2
    assert tb.run_name("final", note="..") == "final/note=.."
    assert tb.run_name("..") == "_"
    with pytest.raises(ValueError, match="stage"):
        tb.run_name("")


def test_experiment_logdir(tmp_path: Path) -> None:
    assert tb.experiment_logdir(tmp_path) == tmp_path / "tensorboard"
    assert tb.experiment_logdir(str(tmp_path)) == tmp_path / "tensorboard"


def test_module_does_not_import_ray() -> None:
    code = "import sys, sctune.present.tensorboard; sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------
# TrialLogger


def test_trial_logger_round_trip(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    hp = {"max_lr": 0.8, "batch_size": 128, "optimizer": "sgd", "nesterov": True, "wd": np.float32(1e-4)}
    log = tb.TrialLogger(tmp_path, "search/t1", hparams=hp, group="g1")
    # The session start is on disk before any training step (running trials are listed).
    start = session_start(load(tmp_path / "search/t1"))
    assert start.group_name == "g1"
    assert start.hparams["max_lr"].number_value == 0.8
    assert start.hparams["batch_size"].number_value == 128
    assert start.hparams["optimizer"].string_value == "sgd"
    assert start.hparams["nesterov"].bool_value is True
    assert start.hparams["wd"].number_value == pytest.approx(1e-4)
    assert start.start_time_secs > 0
    assert hp_metadata.SESSION_END_INFO_TAG not in hparams_content(load(tmp_path / "search/t1"))

    written = {}
    for step in range(5):
        values = {
            tb.TRAIN_LOSS: 2.0 / (step + 1),
            tb.LR: 0.1 * step,
            tb.VAL_ACC: None if step % 2 else 0.5 + step / 10,
        }
        log.scalars(values, step)
        written[step] = values
    log.scalars({tb.TRAIN_LOSS: float("nan"), tb.MOMENTUM: float("inf"), tb.THROUGHPUT: 1234.5}, 5)
    log.text("notes", "| a | b |\n|---|---|\n| 1 | 2 |", step=1)
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([0, 1], [1, 0])
    log.figure("plots/curve", fig, step=2)
    log.end("success", metrics={tb.VAL_ACC: 0.91, tb.TEST_ACC: 0.9})
    log.close()

    acc = load(tmp_path / "search/t1")
    assert scalars(acc, tb.TRAIN_LOSS) == [
        (s, pytest.approx(2.0 / (s + 1))) for s in range(5)
    ]  # NaN at 5 skipped
    assert scalars(acc, tb.LR) == [(s, pytest.approx(0.1 * s)) for s in range(5)]
    # None skipped; the final metric lands at the last step (5) so it is the HParams value.
    assert scalars(acc, tb.VAL_ACC) == [
        (0, 0.5),
        (2, pytest.approx(0.7)),
        (4, pytest.approx(0.9)),
        (5, pytest.approx(0.91)),
    ]
    assert scalars(acc, tb.TEST_ACC) == [(5, pytest.approx(0.9))]
    assert scalars(acc, tb.THROUGHPUT) == [(5, 1234.5)]
    assert tb.MOMENTUM not in acc.Tags()["scalars"]  # only value was inf
    assert text_of(acc, "notes") == ["| a | b |\n|---|---|\n| 1 | 2 |"]
    assert text_of(acc, tb.STATUS_TEXT) == ["success"]
    (image,) = acc.Images("plots/curve")
    assert image.step == 2 and image.width == 300 and image.height == 200
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    end = session_end(acc)
    assert end.status == api_pb2.STATUS_SUCCESS and end.end_time_secs >= start.start_time_secs


@pytest.mark.parametrize(
    ("status", "code"), [("failure", api_pb2.STATUS_FAILURE), ("aborted", api_pb2.STATUS_UNKNOWN)]
)
def test_end_status_codes(tmp_path: Path, status: str, code: int) -> None:
    with tb.TrialLogger(tmp_path, "r", hparams={"a": 1}) as log:
        log.scalars({"x": 1.0}, 3)
        log.end(status)
        log.end("success")  # ignored: the first session end is final
    acc = load(tmp_path / "r")
    assert session_end(acc).status == code
    assert text_of(acc, tb.STATUS_TEXT) == [status]


def test_running_writes_no_session_end(tmp_path: Path) -> None:
    log = tb.TrialLogger(tmp_path, "r", hparams={"a": 1})
    log.scalars({"x": 1.0}, 7)
    log.end("running", metrics={"x": 2.0})
    assert not log.ended
    assert hp_metadata.SESSION_END_INFO_TAG not in hparams_content(load(tmp_path / "r"))
    log.end("success")
    log.close()
    acc = load(tmp_path / "r")
    assert session_end(acc).status == api_pb2.STATUS_SUCCESS
    assert scalars(acc, "x") == [(7, 1.0), (7, 2.0)]


def test_context_manager_statuses(tmp_path: Path) -> None:
    with tb.TrialLogger(tmp_path, "ok", hparams={"a": 1}):
        pass
    with pytest.raises(RuntimeError), tb.TrialLogger(tmp_path, "boom", hparams={"a": 2}):
        raise RuntimeError("trial crashed")
    with pytest.raises(KeyboardInterrupt), tb.TrialLogger(tmp_path, "stop", hparams={"a": 3}):
        raise KeyboardInterrupt
    assert session_end(load(tmp_path / "ok")).status == api_pb2.STATUS_SUCCESS
    assert session_end(load(tmp_path / "boom")).status == api_pb2.STATUS_FAILURE
    assert session_end(load(tmp_path / "stop")).status == api_pb2.STATUS_UNKNOWN


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="relative"):
        tb.TrialLogger(tmp_path, "../escape")
    with pytest.raises(ValueError, match=r"hparams\['x'\]"):
        tb.TrialLogger(tmp_path, "r", hparams={"x": [1, 2]})
    with pytest.raises(ValueError, match="finite"):
        tb.TrialLogger(tmp_path, "r", hparams={"x": float("nan")})
    log = tb.TrialLogger(tmp_path, "r")
    with pytest.raises(ValueError, match="status"):
        log.end("done")
    with pytest.raises(ValueError, match="step"):
        log.scalars({"x": 1.0}, -1)
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.scalars({"x": 1.0}, 0)


# ---------------------------------------------------------------------------------------------
# end_session (driver side)


def test_end_session_from_driver_after_worker_is_gone(tmp_path: Path) -> None:
    name = tb.run_name("search", trial="abc_00001")
    log = tb.TrialLogger(tmp_path, name, hparams={"max_lr": 0.3})
    for step in range(4):
        log.scalars({tb.VAL_ACC: 0.1 * step}, step * 10)
    log.close()  # the worker dies without ending its session
    del log

    assert tb.end_session(tmp_path, name, status="aborted", metrics={tb.VAL_ACC: 0.35}) is True
    assert len(list((tmp_path / name).glob("*tfevents*"))) == 2  # a second file in the same run
    acc = load(tmp_path / name)
    assert session_start(acc).hparams["max_lr"].number_value == 0.3
    assert session_end(acc).status == api_pb2.STATUS_UNKNOWN
    assert scalars(acc, tb.VAL_ACC)[-1] == (30, pytest.approx(0.35))  # at the run's last step
    assert text_of(acc, tb.STATUS_TEXT) == ["aborted"]

    # A second end is refused: TensorBoard would keep the first anyway.
    assert tb.end_session(tmp_path, name, status="failure") is False
    assert session_end(load(tmp_path / name)).status == api_pb2.STATUS_UNKNOWN


def test_end_session_keeps_the_trials_own_end(tmp_path: Path) -> None:
    with tb.TrialLogger(tmp_path, "r", hparams={"a": 1}) as log:
        log.end("success", metrics={"m": 1.0})
    assert tb.end_session(tmp_path, "r", status="failure", metrics={"m": -1.0}) is False
    acc = load(tmp_path / "r")
    assert session_end(acc).status == api_pb2.STATUS_SUCCESS
    assert scalars(acc, "m") == [(0, 1.0)]


def test_end_session_for_a_trial_that_never_started(tmp_path: Path) -> None:
    # The trial died before opening its logger: the driver still lists it, as a failure.
    assert tb.end_session(tmp_path, "search/t9", status="failure", hparams={"max_lr": 9.0}, group="t9")
    acc = load(tmp_path / "search/t9")
    assert session_start(acc).hparams["max_lr"].number_value == 9.0
    assert session_start(acc).group_name == "t9"
    assert session_end(acc).status == api_pb2.STATUS_FAILURE


# ---------------------------------------------------------------------------------------------
# experiment config


def read_experiment(logdir: Path) -> api_pb2.Experiment:
    return hp_metadata.parse_experiment_plugin_data(hparams_content(load(logdir))[hp_metadata.EXPERIMENT_TAG])


def test_write_hparams_config_and_merge(tmp_path: Path) -> None:
    tb.write_hparams_config(
        tmp_path,
        hparams={
            "max_lr": {"type": "float", "low": 0.05, "high": 3.0, "log": True, "display_name": "max LR"},
            "optimizer": {"choices": ["sgd", "adam"]},
            "nesterov": {"choices": [True, False]},
            "batch_size": {"choices": [64, 128]},
        },
        metrics=[(tb.VAL_ACC, "val accuracy"), (tb.TRAIN_LOSS, "train loss")],
    )
    exp = read_experiment(tmp_path)
    infos = {h.name: h for h in exp.hparam_infos}
    assert infos["max_lr"].display_name == "max LR"
    assert infos["max_lr"].type == api_pb2.DATA_TYPE_FLOAT64
    assert (infos["max_lr"].domain_interval.min_value, infos["max_lr"].domain_interval.max_value) == (
        0.05,
        3.0,
    )
    assert list(infos["optimizer"].domain_discrete) == ["sgd", "adam"]
    assert infos["optimizer"].type == api_pb2.DATA_TYPE_STRING
    assert list(infos["nesterov"].domain_discrete) == [True, False]
    assert infos["batch_size"].type == api_pb2.DATA_TYPE_FLOAT64
    assert [(m.name.tag, m.display_name) for m in exp.metric_infos] == [
        (tb.VAL_ACC, "val accuracy"),
        (tb.TRAIN_LOSS, "train loss"),
    ]
    assert exp.metric_infos[0].dataset_type == api_pb2.DATASET_VALIDATION

    # A second stage adds its own hparams/metrics: merged into one config file.
    tb.write_hparams_config(
        tmp_path,
        hparams={
            "max_lr": {"type": "float", "low": 0.01, "high": 1.0},
            "optimizer": {"choices": ["adamw"]},
            "wd": {"choices": [0.0, 1e-4]},
        },
        metrics=[(tb.VAL_ACC, "val acc"), (tb.RANGE_MAX_LR, "range max_lr")],
    )
    assert len(list(tmp_path.glob("*tfevents*"))) == 1
    exp = read_experiment(tmp_path)
    infos = {h.name: h for h in exp.hparam_infos}
    assert list(infos) == ["max_lr", "optimizer", "nesterov", "batch_size", "wd"]
    assert (infos["max_lr"].domain_interval.min_value, infos["max_lr"].domain_interval.max_value) == (
        0.01,
        3.0,
    )
    assert list(infos["optimizer"].domain_discrete) == ["sgd", "adam", "adamw"]
    assert [(m.name.tag, m.display_name) for m in exp.metric_infos] == [
        (tb.VAL_ACC, "val acc"),
        (tb.TRAIN_LOSS, "train loss"),
        (tb.RANGE_MAX_LR, "range max_lr"),
    ]

    # Same config again: nothing rewritten.
    (before,) = tmp_path.glob("*tfevents*")
    tb.write_hparams_config(tmp_path, hparams={"wd": {"choices": [0.0]}}, metrics=[(tb.VAL_ACC, "val acc")])
    assert list(tmp_path.glob("*tfevents*")) == [before]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"type": "float", "low": 1.0}, "low' and 'high"),
        ({"type": "float", "low": 2.0, "high": 1.0}, "low <= high"),
        ({"type": "loguniform", "low": 1e-3, "high": 1.0}, "type must be"),
        ({"choices": []}, "empty"),
        ({"choices": [1], "lower": 0}, "unknown key"),
    ],
)
def test_write_hparams_config_rejects_bad_specs(tmp_path: Path, spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tb.write_hparams_config(tmp_path, hparams={"x": spec}, metrics=[])


def test_write_hparams_config_rejects_bad_metrics(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pairs"):
        tb.write_hparams_config(tmp_path, hparams={}, metrics=["val/acc"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="twice"):
        tb.write_hparams_config(tmp_path, hparams={}, metrics=[("a", "A"), ("a", "B")])


# ---------------------------------------------------------------------------------------------
# range-test figure and logging


def vlines(ax) -> dict[str, tuple[float, str]]:
    """gid -> (x, color) for the vertical bound markers on an axes."""
    out = {}
    for line in ax.get_lines():
        gid = line.get_gid()
        if gid:
            xs = line.get_xdata()
            assert xs[0] == xs[1]  # vertical
            out[gid] = (float(xs[0]), matplotlib.colors.to_hex(line.get_color()))
    return out


def test_range_test_figure_marks_bounds_in_curve_color() -> None:
    curves = {"wd=1e-4 seed=0": range_frame(seed=0), "wd=1e-3 seed=0": range_frame(diverge=True, seed=1)}
    bounds = {
        "wd=1e-4 seed=0": FakeBounds(0.2, 0.8),
        "wd=1e-3 seed=0": FakeBounds(0.1, None, status="no_peak"),
    }
    fig = figures.range_test_figure(curves, bounds, title="range tests")
    ax_acc, ax_loss = fig.axes
    for ax in (ax_acc, ax_loss):
        marks = vlines(ax)
        assert set(marks) == {"min_lr:wd=1e-4 seed=0", "max_lr:wd=1e-4 seed=0", "min_lr:wd=1e-3 seed=0"}
        assert marks["min_lr:wd=1e-4 seed=0"][0] == 0.2 and marks["max_lr:wd=1e-4 seed=0"][0] == 0.8
        assert marks["min_lr:wd=1e-3 seed=0"][0] == 0.1
    # Each label's markers share the color of its curve.
    colors = {
        line.get_label(): matplotlib.colors.to_hex(line.get_color())
        for line in ax_loss.get_lines()
        if not line.get_label().startswith("_")
    }
    assert colors["wd=1e-4 seed=0 [ok]"] == vlines(ax_loss)["max_lr:wd=1e-4 seed=0"][1]
    assert colors["wd=1e-3 seed=0 [no_peak]"] == vlines(ax_loss)["min_lr:wd=1e-3 seed=0"][1]
    assert colors["wd=1e-4 seed=0 [ok]"] != colors["wd=1e-3 seed=0 [no_peak]"]
    # Accuracy is drawn at the eval points only; the diverging loss does not set the y range.
    acc_line = next(line for line in ax_acc.get_lines() if line.get_label() == "wd=1e-4 seed=0 [ok]")
    assert len(acc_line.get_xdata()) == 6
    assert ax_loss.get_ylim()[1] < 10.0
    assert ax_loss.get_xscale() == "linear"
    assert fig._suptitle.get_text() == "range tests"


def test_range_test_figure_log_x_and_no_bounds() -> None:
    fig = figures.range_test_figure({"a": range_frame()}, log_x=True)
    assert all(ax.get_xscale() == "log" for ax in fig.axes)
    assert not vlines(fig.axes[0])
    with pytest.raises(ValueError, match="'lr'"):
        figures.range_test_figure({"a": pd.DataFrame({"loss": [1.0]})})


def test_bounds_markdown() -> None:
    md = report.bounds_markdown(FakeBounds(0.0123456, 0.5, verdict={"message": "accuracy stays high to 3.0"}))
    assert "| 0.01235 | 0.5 | ok | 0.8 |" in md
    assert "accuracy stays high to 3.0" in md
    assert "| - |" in report.bounds_markdown(FakeBounds(0.1, None))


def test_log_range_test(tmp_path: Path) -> None:
    df = range_frame(diverge=True)
    bounds = FakeBounds(0.25, 1.0, verdict={"message": "super-convergence likely"})
    name = tb.run_name("range", wd=1e-4, seed=0)
    with tb.TrialLogger(tmp_path, name, hparams={"wd": 1e-4, "seed": 0}) as log:
        tb.log_range_test(log, df, bounds, log_x=True)
    acc = load(tmp_path / name)
    n_finite = int(np.isfinite(df["loss"]).sum())
    assert len(scalars(acc, tb.RANGE_LOSS)) == n_finite == len(df) - 2  # inf, nan skipped
    assert [s for s, _ in scalars(acc, tb.RANGE_ACC)] == list(range(0, len(df), 10))
    assert scalars(acc, tb.RANGE_ACC)[1][1] == pytest.approx(df["acc"].iloc[10])
    assert len(scalars(acc, tb.RANGE_VAL_LOSS)) == 6
    assert len(scalars(acc, tb.RANGE_SMOOTH_LOSS)) == int(np.isfinite(df["smooth_loss"]).sum())
    assert scalars(acc, tb.LR) == [(s, pytest.approx(v)) for s, v in zip(df["step"], df["lr"], strict=True)]
    assert scalars(acc, tb.RANGE_MIN_LR) == [(len(df) - 1, 0.25)]
    assert scalars(acc, tb.RANGE_MAX_LR) == [(len(df) - 1, 1.0)]
    (image,) = acc.Images(tb.RANGE_CURVE)
    assert image.width > 0 and image.height > 0
    (table,) = text_of(acc, tb.RANGE_BOUNDS_TEXT)
    assert "| 0.25 | 1 | ok | 0.8 |" in table and "super-convergence likely" in table
    assert session_end(acc).status == api_pb2.STATUS_SUCCESS
    assert not math.isnan(scalars(acc, tb.RANGE_LOSS)[-1][1])


def test_log_range_test_with_real_bounds(tmp_path: Path) -> None:
    """The duck type above matches sctune.core.bounds.LRBounds (attributes, to_dict, verdict dict)."""
    from sctune.core.bounds import bounds_from_frame

    df = range_frame(n=200)
    bounds = bounds_from_frame(df, method="smith")
    with tb.TrialLogger(tmp_path, "range/wd=0.0/seed=0", hparams={"wd": 0.0}) as log:
        tb.log_range_test(log, df, bounds)
    (table,) = text_of(load(tmp_path / "range/wd=0.0/seed=0"), tb.RANGE_BOUNDS_TEXT)
    assert f"| {bounds.status} |" in table
    if bounds.message:
        assert bounds.message in table
    if bounds.verdict is not None:
        assert bounds.verdict.message in table
    fig = figures.range_test_figure({"a": df}, {"a": bounds})
    assert ("max_lr:a" in vlines(fig.axes[0])) == (bounds.max_lr is not None)


def test_scalars_rejects_non_numbers_and_scale_specs(tmp_path: Path) -> None:
    with tb.TrialLogger(tmp_path, "r") as log, pytest.raises(TypeError, match="'note'"):
        log.scalars({"note": "abc"}, 0)
    with pytest.raises(ValueError, match="resolve relative ranges"):
        tb.write_hparams_config(
            tmp_path,
            hparams={"max_lr": {"type": "float", "low": 0.5, "high": 2, "scale": "max_lr_bound"}},
            metrics=[],
        )
