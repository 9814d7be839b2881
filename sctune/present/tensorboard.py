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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.text.summary_v2 import text_pb
from torch.utils.tensorboard import SummaryWriter

from ..core.curves import bound_dict, finite_positive, range_test_figure
from ..core.train import (  # noqa: F401  (re-exported: one definition, in train.py)
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
    tail_key,
)

# The figure and the bounds table are presentation (report.py); this module writes them as events.
from ..service.experiment import ExperimentPaths
from .hparams import (  # noqa: F401  (re-exported: the protocol lives in hparams.py)
    STATUSES,
    hparams_experiment,
    merge_experiments,
    session_end_summary,
    session_start_summary,
    status_code,
    write_hparams_config,
)
from .report import bounds_markdown

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ..service.space import SpaceSpec

log = logging.getLogger(__name__)

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


# Scalars reach disk within this many seconds (SummaryWriter's default is 120 s, too slow to
# watch a 2-minute trial live); session start/end are flushed at once regardless.
_FLUSH_SECS = 10
_DRIVER_SUFFIX = ".sctune-driver"
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


def logged_scalars(run_dir: str | Path) -> dict[int, set[str]]:
    """The scalar tags a run's event files hold, per step (a trial that starts again skips what is there)."""
    out: dict[int, set[str]] = {}
    run_dir = Path(run_dir)
    for path in sorted(run_dir.glob("*tfevents*")) if run_dir.is_dir() else []:
        try:
            for event in EventFileLoader(str(path)).Load():
                if event.HasField("summary"):
                    tags = {v.tag for v in event.summary.value if v.HasField("simple_value")
                            or v.metadata.plugin_data.plugin_name == "scalars"}
                    if tags:
                        out.setdefault(int(event.step), set()).update(tags)
        except Exception as e:  # a file cut short by a kill: what was read counts
            log.debug("%s: %s", path, e)
    return out


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
        code = status_code(status)
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
    code = status_code(status)
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
    b = bound_dict(bounds)
    if bounds is not None:
        logger.scalars(
            {
                RANGE_MIN_LR: finite_positive(b.get("min_lr")),
                RANGE_MAX_LR: finite_positive(b.get("max_lr")),
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


# ---------------------------------------------------------------------------------------------
# the experiment's HParams config


def write_tb_config(spec: SpaceSpec, paths: ExperimentPaths, dists: dict | None = None) -> None:
    """One HParams config for every stage, written before the first trial.

    TensorBoard shows only the columns the config lists and a running TensorBoard keeps the first
    config it reads, so it names the range-test, search and final hparams and metrics at once. ``dists``:
    stage 2's searched ranges (its plan); until stage 1 is done, ranges relative to its results are shown
    over what they can span.
    """
    rt = spec.range_test
    if dists is None:
        span = {"max_lr_bound": (rt.start_lr, rt.end_lr), "min_lr_bound": (rt.start_lr, rt.end_lr),
                "wd_prior": (0.0, max(rt.weight_decays))}
        dists = {}
        for n, d in spec.space.items():
            if d.scale is None:
                dists[n] = d
            else:
                lo, hi = span[d.scale]
                dists[n] = type(d)(n, d.kind, low=d.low * lo, high=max(d.high * hi, d.low * lo), log=False)
    hparams = {n: {k: v for k, v in d.to_dict().items() if k != "log"} for n, d in dists.items()}
    hparams.setdefault("weight_decay", {"type": "float", "low": 0.0, "high": max(rt.weight_decays)})
    # the fidelity: a halving trial's schedule length (complete one-cycles of 1/8 .. 1 of the training)
    hparams.setdefault("epochs", {"type": "int", "low": 1, "high": spec.base.epochs})
    hparams |= {"seed": {"type": "int", "low": 0, "high": spec.search.seed + 10_000},
                "stage": {"choices": ["range", "search", "final"]}}
    metrics = [(VAL_ACC, "validation accuracy"), (TEST_ACC, "test accuracy (final fit)"),
               ("val/loss", "validation loss"), ("train/loss", "training loss"),
               (RANGE_MAX_LR, "range test: max LR"), (RANGE_MIN_LR, "range test: min LR"),
               ("range_test/peak_acc", "range test: peak accuracy"),
               (tail_key(spec.search.metric),
                f"selection score: mean of the last {spec.search.select_last} {spec.search.metric}")]
    try:
        write_hparams_config(paths.tensorboard, hparams=hparams, metrics=metrics)
    except (ValueError, OSError) as e:  # TensorBoard bookkeeping must never stop a search
        log.warning("could not write the TensorBoard HParams config: %s", e)
