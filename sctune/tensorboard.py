"""TensorBoard output: one run per trial, HParams sessions that start when the trial starts.

Ray Tune's own TensorBoard logger writes hparams only when a trial ends, so running trials are
invisible in the HParams dashboard. Here each trial writes its own run directly from the worker
process (``TrialLogger``): the HParams ``session_start`` goes out, flushed, the moment the logger
opens, scalars stream in while the trial runs, and ``end()`` closes the session with a status.
When Ray stops, prunes or loses a trial whose process can no longer write, the driver closes the
session from outside with ``end_session``.

Layout under ``<exp_dir>/tensorboard`` (``experiment_logdir``)::

    ./events...sctune-hparams-config     experiment config: hparam domains + metric list
    range/wd=0.0001/seed=1/events...     one run per trial (run_name())
    search/a1b2_00003/events...
    final/seed=0/events...

HParams protocol (tensorboard.plugins.hparams, plugin data version 0), as implemented here:

* The v1 helpers in ``tensorboard.plugins.hparams.summary`` (``session_start_pb``/``session_end_pb``)
  and ``tensorboard.plugins.hparams.api`` import TensorFlow, which sctune does not depend on, so the
  session start comes from ``summary_v2.hparams_pb`` (TF-free) and the experiment config and the
  session end are the same ``HParamsPluginData`` protos, built here with ``metadata`` helpers.
* TensorBoard takes a hparams time series' content from the *first* event it reads for that tag
  in a run. So the first ``session_end`` of a run is final (a later one is ignored): ``end_session``
  checks for one and does not write a second, and status ``"running"`` writes no session end at all
  (it would freeze the status at "running").
* TensorBoard has no "aborted" status: ``"aborted"`` (stopped / pruned by the scheduler, results
  valid up to that point) is written as STATUS_UNKNOWN, not FAILURE, so "Failure" keeps meaning
  "something broke". Every ``end`` also writes the sctune status as text (tag ``session/status``).
* Only one experiment config per logdir is used (the first found), so ``write_hparams_config``
  merges with the config already there and replaces its file rather than adding a second one.
  All stages share it; the parallel-coordinates view draws only sessions with a value in every
  ticked column, so untick the other stages' columns there (docs/tb_screenshots.py does).

Non-finite scalars (NaN/inf, e.g. the last steps of a diverging range test) are not logged: a NaN
as the last value of a metric breaks the HParams table and parallel-coordinates view (a session
with a missing/NaN value in a shown column gets no line there). The first one per tag is logged at
DEBUG (NaN accuracy between eval points is normal).

This module must not import ray: it runs inside trial workers and in plain-PyTorch tests.
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import summary_v2 as hp_summary
from tensorboard.plugins.text.summary_v2 import text_pb
from torch.utils.tensorboard import SummaryWriter

# The figure and the bounds table are presentation (report.py); this module writes them as events.
from .experiment import ExperimentPaths
from .report import _bound_dict, _finite_positive, bounds_markdown, range_test_figure
from .train import (  # noqa: F401  (re-exported: one definition, in train.py)
    HF_LR,
    HF_LR_EMA,
    LR,
    MOMENTUM,
    TEST_ACC,
    TEST_LOSS,
    THROUGHPUT,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

TB_DIRNAME = ExperimentPaths(Path()).tensorboard.name  # the experiment's layout names it (experiment.py)

# Range-test tags (log_range_test).
RANGE_LOSS = "range_test/loss"
RANGE_SMOOTH_LOSS = "range_test/smooth_loss"
RANGE_ACC = "range_test/acc"
RANGE_VAL_LOSS = "range_test/val_loss"
RANGE_MIN_LR = "range_test/min_lr"  # scalars too, so the HParams table can show bounds per wd/seed
RANGE_MAX_LR = "range_test/max_lr"
RANGE_CURVE = "range_test/curve"
RANGE_BOUNDS_TEXT = "range_test/bounds"
STATUS_TEXT = "session/status"

# sctune status -> HParams status; None = write no session end (see module docstring).
_STATUS: dict[str, int | None] = {
    "success": api_pb2.STATUS_SUCCESS,
    "failure": api_pb2.STATUS_FAILURE,
    "aborted": api_pb2.STATUS_UNKNOWN,
    "running": None,
}
STATUSES = tuple(_STATUS)

# Scalars reach disk within this many seconds (SummaryWriter's default is 120 s, too slow to
# watch a 2-minute trial live); session start/end are flushed at once regardless.
_FLUSH_SECS = 10
_CONFIG_SUFFIX = ".sctune-hparams-config"
_DRIVER_SUFFIX = ".sctune-driver"
_SPEC_KEYS = frozenset({"type", "low", "high", "log", "step", "choices", "display_name", "description"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+\-]")


# ---------------------------------------------------------------------------------------------
# names and paths


def experiment_logdir(exp_dir: str | Path) -> Path:
    """The TensorBoard logdir of an experiment: ``ExperimentPaths(exp_dir).tensorboard``."""
    return ExperimentPaths(Path(exp_dir)).tensorboard


def _safe_component(text: str) -> str:
    # Keep names readable ("wd=0.0001") and safe as one path component on any filesystem.
    out = _UNSAFE.sub("_", text)
    return "_" if out in ("", ".", "..") else out


def _format_part(value: object) -> str:
    return str(value)  # str(1e-4) == "0.0001", str(1e-5) == "1e-05": short and round-trips


def run_name(stage: str, **parts: object) -> str:
    """Run path for a trial: the stage, then ``key=value`` per part, in the order given.

    >>> run_name("range", wd=1e-4, seed=1)
    'range/wd=0.0001/seed=1'
    >>> run_name("search", trial="a1b2_00003")
    'search/a1b2_00003'

    A part named ``trial`` is written bare (trial ids are already unique). Characters other than
    letters, digits and ``._=+-`` become ``_``, so a value can never add a path level.
    """
    if not stage:
        raise ValueError("run_name: stage must be a non-empty string")
    components = [_safe_component(stage)]
    for key, value in parts.items():
        text = _format_part(value) if key == "trial" else f"{key}={_format_part(value)}"
        components.append(_safe_component(text))
    return "/".join(components)


def _check_run_name(name: str) -> str:
    path = Path(name)
    if not name or path.is_absolute() or any(p in ("..", ".") for p in path.parts):
        raise ValueError(f"run name must be a relative path without '.'/'..' components, got {name!r}")
    return name


# ---------------------------------------------------------------------------------------------
# HParams protos (pure)


def _plugin_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    # The layout summary_v2._summary_pb uses: content in the metadata, a null tensor as value.
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=tag, metadata=hp_metadata.create_summary_metadata(data), tensor=hp_metadata.NULL_TENSOR
    )
    return summary


def _clean_hparams(hparams: Mapping[str, object]) -> dict[str, bool | float | int | str]:
    out: dict[str, bool | float | int | str] = {}
    for key, value in hparams.items():
        if value is None:
            continue  # "not set" has no HParams encoding; an empty cell says the same
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"hparams[{key!r}] must be bool, int, float or str, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"hparams[{key!r}] must be finite, got {value!r}")
        out[str(key)] = value
    return out


def session_start_summary(
    hparams: Mapping[str, object], *, group: str, start_time_secs: float | None = None
) -> summary_pb2.Summary:
    """HParams ``session_start_info`` summary; sessions sharing ``group`` are one table row."""
    return hp_summary.hparams_pb(_clean_hparams(hparams), trial_id=group, start_time_secs=start_time_secs)


def session_end_summary(status: str, *, end_time_secs: float | None = None) -> summary_pb2.Summary:
    """HParams ``session_end_info`` summary for a sctune status other than ``"running"``."""
    code = _status_code(status)
    if code is None:
        raise ValueError("status 'running' has no session end (it would freeze the session as running)")
    info = plugin_data_pb2.SessionEndInfo(
        status=code, end_time_secs=time.time() if end_time_secs is None else end_time_secs
    )
    return _plugin_summary(
        hp_metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info)
    )


def _status_code(status: str) -> int | None:
    if status not in _STATUS:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return _STATUS[status]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _hparam_info(name: str, spec: Mapping[str, Any]) -> api_pb2.HParamInfo:
    where = f"hparams[{name!r}]"
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{where} must be a dict like {{'type': 'float', 'low': ..., 'high': ...}}, got {spec!r}"
        )
    if "scale" in spec:
        # space.py's relative ranges: low/high are multipliers of an anchor, not LR values.
        raise ValueError(
            f"{where} has scale={spec['scale']!r}: resolve relative ranges (plan.resolve) first"
        )
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_SPEC_KEYS)}")
    info = api_pb2.HParamInfo(
        name=name,
        display_name=str(spec.get("display_name", name)),
        description=str(spec.get("description", "")),
    )
    if "choices" in spec:
        choices = list(spec["choices"])
        if not choices:
            raise ValueError(f"{where}: choices must not be empty")
        choices = [c.item() if isinstance(c, np.generic) else c for c in choices]
        if all(isinstance(c, bool) for c in choices):
            info.type = api_pb2.DATA_TYPE_BOOL
        elif all(_is_number(c) for c in choices):
            info.type = api_pb2.DATA_TYPE_FLOAT64
            choices = [float(c) for c in choices]
        else:
            # Mixed or string choices: the session values must then be strings too.
            info.type = api_pb2.DATA_TYPE_STRING
            choices = [str(c) for c in choices]
        info.domain_discrete.extend(choices)
        return info
    kind = spec.get("type", "float")
    if kind not in ("float", "int"):
        raise ValueError(
            f"{where}: type must be 'float' or 'int' for an interval (or give 'choices'), got {kind!r}"
        )
    if "low" not in spec or "high" not in spec:
        raise ValueError(f"{where}: an interval needs 'low' and 'high', got keys {sorted(spec)}")
    low, high = float(spec["low"]), float(spec["high"])
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"{where}: need finite low <= high, got low={low!r}, high={high!r}")
    info.type = api_pb2.DATA_TYPE_FLOAT64
    info.domain_interval.min_value = low
    info.domain_interval.max_value = high
    return info


def _dataset_type(tag: str) -> int:
    prefix = tag.split("/", 1)[0]
    return {
        "train": api_pb2.DATASET_TRAINING,
        "val": api_pb2.DATASET_VALIDATION,
        "test": api_pb2.DATASET_VALIDATION,  # the enum has no "test"; it is held-out data too
    }.get(prefix, api_pb2.DATASET_UNKNOWN)


def hparams_experiment(
    hparams: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[tuple[str, str]],
    *,
    time_created_secs: float | None = None,
) -> api_pb2.Experiment:
    """The HParams ``Experiment`` proto: hparam domains and the metric columns (pure).

    ``hparams`` maps a name to ``{"type": "float"|"int", "low", "high"[, "log"]}`` or
    ``{"choices": [...]}`` (the search-space format), optionally with ``display_name`` and
    ``description``. ``metrics`` is ``(tag, display_name)`` pairs; each is read from the last
    value of that scalar tag in the session's own run.
    """
    experiment = api_pb2.Experiment(
        time_created_secs=time.time() if time_created_secs is None else time_created_secs
    )
    for name, spec in hparams.items():
        experiment.hparam_infos.append(_hparam_info(str(name), spec))
    seen: set[str] = set()
    for item in metrics:
        if isinstance(item, str) or len(item) != 2:
            raise ValueError(f"metrics must be (tag, display_name) pairs, got {item!r}")
        tag, display = item
        if tag in seen:
            raise ValueError(f"metric tag {tag!r} listed twice")
        seen.add(tag)
        experiment.metric_infos.append(
            api_pb2.MetricInfo(
                name=api_pb2.MetricName(group="", tag=tag),
                display_name=display,
                dataset_type=_dataset_type(tag),
            )
        )
    return experiment


def _merge_hparam(old: api_pb2.HParamInfo, new: api_pb2.HParamInfo) -> api_pb2.HParamInfo:
    merged = api_pb2.HParamInfo()
    merged.CopyFrom(new)
    if old.type != new.type or old.WhichOneof("domain") != new.WhichOneof("domain"):
        log.info("hparam %r changed type/domain kind; the new definition replaces the old", new.name)
        return merged
    if new.HasField("domain_interval"):
        merged.domain_interval.min_value = min(old.domain_interval.min_value, new.domain_interval.min_value)
        merged.domain_interval.max_value = max(old.domain_interval.max_value, new.domain_interval.max_value)
    elif new.HasField("domain_discrete"):
        values = list(old.domain_discrete) + [
            v for v in new.domain_discrete if v not in list(old.domain_discrete)
        ]
        merged.ClearField("domain_discrete")
        merged.domain_discrete.extend(values)
    return merged


def merge_experiments(old: api_pb2.Experiment, new: api_pb2.Experiment) -> api_pb2.Experiment:
    """Union of two configs (pure): intervals widen, choices union, new display names win."""
    out = api_pb2.Experiment(time_created_secs=old.time_created_secs or new.time_created_secs)
    new_hp = {h.name: h for h in new.hparam_infos}
    for h in old.hparam_infos:
        out.hparam_infos.append(_merge_hparam(h, new_hp.pop(h.name)) if h.name in new_hp else h)
    out.hparam_infos.extend(h for h in new.hparam_infos if h.name in new_hp)
    new_m = {(m.name.group, m.name.tag): m for m in new.metric_infos}
    for m in old.metric_infos:
        out.metric_infos.append(new_m.pop((m.name.group, m.name.tag), m))
    out.metric_infos.extend(m for m in new.metric_infos if (m.name.group, m.name.tag) in new_m)
    return out


def _read_experiment(paths: Sequence[Path]) -> api_pb2.Experiment | None:
    found = None
    for path in paths:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == hp_metadata.EXPERIMENT_TAG:
                    found = hp_metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
    return found


def write_hparams_config(
    logdir: str | Path, *, hparams: Mapping[str, Mapping[str, Any]], metrics: Sequence[tuple[str, str]]
) -> None:
    """Write the experiment-level HParams config at the logdir root (run ``.``).

    Lists the hparam domains and every metric column (with display names), so the table and
    parallel coordinates show all metrics, and the full search domain rather than the values
    sampled so far. Every hparam a ``TrialLogger`` logs must be listed: with a config present
    TensorBoard shows only the columns it names. At load the dashboard ticks only the first 5
    metrics (in the order given here) and 5 hparams (alphabetical): put the key metrics first.

    Write it once, before the first trial, with the hparams and metrics of all stages: a
    TensorBoard already running keeps the config it read first (checked for both loaders).
    TensorBoard uses only one config per logdir, so calling this again (say once per stage)
    merges into the existing config (``merge_experiments``) and replaces its event file, which a
    freshly started TensorBoard then reads.
    """
    root = Path(logdir)
    root.mkdir(parents=True, exist_ok=True)
    experiment = hparams_experiment(hparams, metrics)
    old_files = sorted(root.glob(f"*tfevents*{_CONFIG_SUFFIX}"))
    previous = _read_experiment(old_files)
    if previous is not None:
        experiment = merge_experiments(previous, experiment)
        if experiment == previous:
            log.debug("hparams config in %s already up to date", root)
            return
    summary = _plugin_summary(
        hp_metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)
    )
    writer = SummaryWriter(log_dir=str(root), filename_suffix=_CONFIG_SUFFIX)
    try:
        writer._get_file_writer().add_summary(summary, global_step=0)  # torch's add_hparams does the same
    finally:
        writer.close()
    for path in old_files:  # a stale config, read first, would win over the merged one
        path.unlink(missing_ok=True)
    log.info(
        "wrote hparams config (%d hparams, %d metrics) to %s",
        len(experiment.hparam_infos),
        len(experiment.metric_infos),
        root,
    )


# ---------------------------------------------------------------------------------------------
# figures as image events (the figures themselves are drawn in report.py)


def _figure_png(fig: Figure, *, dpi: int = 100) -> bytes:
    # savefig renders through Agg whatever the figure's canvas, so no pyplot/backend is needed.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _close_figure(fig: Figure) -> None:
    # Only pyplot keeps figures alive (and warns past 20); a bare Figure is freed with its refs.
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)


def _image_summary(tag: str, png: bytes) -> summary_pb2.Summary:
    width, height = struct.unpack(">II", png[16:24])  # PNG IHDR: width, height as big-endian u32
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=image)])


# ---------------------------------------------------------------------------------------------
# writing runs


@dataclass(frozen=True)
class _RunScan:
    last_step: int | None
    has_start: bool
    has_end: bool


def _scan_run(run_dir: Path) -> _RunScan:
    # Only the run's own files: subdirectories are other runs.
    last_step, has_start, has_end = None, False, False
    for path in sorted(run_dir.glob("*tfevents*")) if run_dir.is_dir() else []:
        for event in EventFileLoader(str(path)).Load():
            if not event.HasField("summary"):
                continue
            last_step = event.step if last_step is None else max(last_step, event.step)
            tags = {v.tag for v in event.summary.value}
            has_start |= hp_metadata.SESSION_START_INFO_TAG in tags
            has_end |= hp_metadata.SESSION_END_INFO_TAG in tags
    return _RunScan(last_step, has_start, has_end)


class TrialLogger:
    """One TensorBoard run (``logdir/name``) written from the trial's own process.

    With ``hparams`` the HParams session starts, flushed, at construction, so a running trial is
    listed with its hparams at once. ``group`` names the session group (sessions in one group are
    one row with aggregated metrics, e.g. all seeds of one weight decay); default: the run name.
    Re-opening a run (trial restored from a checkpoint) is fine: the first session start wins.
    As a context manager it ends the session on exit: success, failure on an exception, aborted
    on KeyboardInterrupt/SystemExit; ``end()`` called inside takes precedence.
    """

    def __init__(
        self,
        logdir: str | Path,
        name: str,
        *,
        hparams: Mapping[str, float | int | str | bool] | None = None,
        group: str | None = None,
        _filename_suffix: str = "",
    ) -> None:
        self.logdir = Path(logdir)
        self.name = _check_run_name(name)
        self.run_dir = self.logdir / name
        start = session_start_summary(hparams, group=group or name) if hparams is not None else None
        self._writer: SummaryWriter | None = SummaryWriter(
            log_dir=str(self.run_dir), flush_secs=_FLUSH_SECS, filename_suffix=_filename_suffix
        )
        self._last_step: int | None = None
        self._ended = False
        self._nonfinite_seen: set[str] = set()
        if start is not None:
            self._write(start, 0)
            self.flush()

    # -- low level
    def _file_writer(self) -> Any:
        if self._writer is None:
            raise RuntimeError(f"TrialLogger({self.name!r}) is closed")
        return self._writer._get_file_writer()  # torch's own add_hparams writes raw summaries this way

    def _write(self, summary: summary_pb2.Summary, step: int) -> None:
        self._file_writer().add_summary(summary, global_step=step)

    def _seen_step(self, step: int) -> int:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._last_step = step if self._last_step is None else max(self._last_step, step)
        return step

    @property
    def last_step(self) -> int | None:
        """Highest step logged so far (final metrics go there)."""
        return self._last_step

    # -- public
    def scalars(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Log scalars under their tags as given; None and non-finite values are skipped."""
        step = self._seen_step(step)
        writer = self._writer
        if writer is None:
            raise RuntimeError(f"TrialLogger({self.name!r}) is closed")
        for tag, value in metrics.items():
            if value is None:
                continue
            try:
                x = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"scalar {tag!r} must be a number, got {value!r}") from None
            if not math.isfinite(x):
                if tag not in self._nonfinite_seen:
                    self._nonfinite_seen.add(tag)
                    log.debug(
                        "%s: %s=%r at step %d not logged (non-finite values are skipped)",
                        self.name,
                        tag,
                        x,
                        step,
                    )
                continue
            writer.add_scalar(tag, x, global_step=step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Markdown text (rendered in the Text dashboard) under exactly ``tag``."""
        self._write(text_pb(tag, str(text)), self._seen_step(step))

    def figure(self, tag: str, fig: Figure, step: int = 0) -> None:
        """A matplotlib figure as a PNG image; the figure is closed afterwards."""
        try:
            png = _figure_png(fig)
        finally:
            _close_figure(fig)
        self._write(_image_summary(tag, png), self._seen_step(step))

    def end(self, status: str = "success", metrics: Mapping[str, float | None] | None = None) -> None:
        """Final metrics (at the last step), the status text, then the session end; flushes.

        ``"running"`` logs the metrics and status text but writes no session end, so a later
        ``end`` (or ``end_session`` from the driver) can still close the session. After a
        session end further calls are no-ops.
        """
        code = _status_code(status)
        if self._ended:
            log.debug("%s: session already ended; end(%r) ignored", self.name, status)
            return
        step = self._last_step if self._last_step is not None else 0
        if metrics:
            self.scalars(metrics, step)
        self.text(STATUS_TEXT, status, step)
        if code is not None:
            self._write(session_end_summary(status), step)
            self._ended = True
        self.flush()

    @property
    def ended(self) -> bool:
        return self._ended

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close; does not end the session (the driver may still do that)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrialLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if not self._ended and self._writer is not None:
                if exc_type is None:
                    status = "success"
                elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
                    status = "aborted"
                else:
                    status = "failure"
                self.end(status)
        finally:
            self.close()


def end_session(
    logdir: str | Path,
    name: str,
    *,
    status: str,
    metrics: Mapping[str, float | None] | None = None,
    hparams: Mapping[str, float | int | str | bool] | None = None,
    group: str | None = None,
    step: int | None = None,
) -> bool:
    """Close a trial's HParams session from the driver, in a new event file of the same run.

    For trials Ray stopped, pruned or lost. The run's event files are scanned first: if the
    trial already wrote a session end, nothing is written (TensorBoard keeps the first one) and
    False is returned. ``metrics`` are logged at ``step`` (default: the run's last step, so they
    become the HParams values). ``hparams`` starts the session if the trial never did (it died
    before opening its logger), so it is still listed. Returns True if a session end was written.
    """
    code = _status_code(status)
    _check_run_name(name)
    scan = _scan_run(Path(logdir) / name)
    if scan.has_end:
        log.info("%s: session already ended by the trial; driver status %r not written", name, status)
        return False
    logger = TrialLogger(
        logdir,
        name,
        hparams=None if scan.has_start else hparams,
        group=group,
        _filename_suffix=_DRIVER_SUFFIX,
    )
    try:
        logger._seen_step(step if step is not None else (scan.last_step or 0))
        logger.end(status, metrics)
    finally:
        logger.close()
    return code is not None


def log_range_test(
    logger: TrialLogger, df: pd.DataFrame, bounds: object | None = None, *, log_x: bool = False
) -> None:
    """Log a range-test curve: per-step scalars, the curve image and the bounds table.

    Scalars: ``range_test/loss``, ``range_test/smooth_loss``, ``range_test/acc`` and
    ``range_test/val_loss`` (eval points only: NaN rows are skipped), ``lr``; with bounds also
    ``range_test/min_lr`` / ``range_test/max_lr`` at the last step (HParams metrics per wd/seed).
    Image ``range_test/curve``; text ``range_test/bounds`` (table + super-convergence verdict).
    """
    columns = {
        RANGE_LOSS: "loss",
        RANGE_SMOOTH_LOSS: "smooth_loss",
        RANGE_ACC: "acc",
        RANGE_VAL_LOSS: "val_loss",
        LR: "lr",
    }
    arrays = {tag: df[col].to_numpy(dtype=float) for tag, col in columns.items() if col in df.columns}
    steps = df["step"].to_numpy() if "step" in df.columns else np.arange(len(df))
    for i, step in enumerate(steps):
        logger.scalars({tag: a[i] for tag, a in arrays.items()}, int(step))
    last = int(steps[-1]) if len(steps) else 0
    b = _bound_dict(bounds)
    if bounds is not None:
        logger.scalars(
            {
                RANGE_MIN_LR: _finite_positive(b.get("min_lr")),
                RANGE_MAX_LR: _finite_positive(b.get("max_lr")),
            },
            last,
        )
    fig = range_test_figure(
        {logger.name: df},
        {logger.name: bounds} if bounds is not None else None,
        log_x=log_x,
        title=logger.name,
    )
    logger.figure(RANGE_CURVE, fig, last)
    if bounds is not None:
        logger.text(RANGE_BOUNDS_TEXT, bounds_markdown(bounds), last)
