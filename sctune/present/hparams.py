"""The HParams dashboard's protocol (tensorboard.plugins.hparams, plugin data version 0): session start and end
summaries, the experiment config (hparam domains and metric columns) and its merge on rewrite. Pure protos
apart from ``write_hparams_config``; ``tensorboard.py`` writes them into the trials' runs (its docstring says
how TensorBoard reads them, and why the v1 helpers that need TensorFlow are not used).

This module must not import ray: it runs inside trial workers and in plain-PyTorch tests.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import summary_v2 as hp_summary
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

# sctune status -> HParams status; None = write no session end (see tensorboard.py's docstring).
_STATUS: dict[str, int | None] = {
    "success": api_pb2.STATUS_SUCCESS,
    "failure": api_pb2.STATUS_FAILURE,
    "aborted": api_pb2.STATUS_UNKNOWN,
    "running": None,
}
STATUSES = tuple(_STATUS)
CONFIG_SUFFIX = ".sctune-hparams-config"  # the experiment config's event file
_SPEC_KEYS = frozenset({"type", "low", "high", "log", "step", "choices", "display_name", "description"})




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
    code = status_code(status)
    if code is None:
        raise ValueError("status 'running' has no session end (it would freeze the session as running)")
    info = plugin_data_pb2.SessionEndInfo(
        status=code, end_time_secs=time.time() if end_time_secs is None else end_time_secs
    )
    return _plugin_summary(
        hp_metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info)
    )


def status_code(status: str) -> int | None:
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
    old_files = sorted(root.glob(f"*tfevents*{CONFIG_SUFFIX}"))
    previous = _read_experiment(old_files)
    if previous is not None:
        experiment = merge_experiments(previous, experiment)
        if experiment == previous:
            log.debug("hparams config in %s already up to date", root)
            return
    summary = _plugin_summary(
        hp_metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)
    )
    writer = SummaryWriter(log_dir=str(root), filename_suffix=CONFIG_SUFFIX)
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
