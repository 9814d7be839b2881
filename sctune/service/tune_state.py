"""Forensics on Ray Tune's saved state of a stage (``ray/<stage>/``), before a ``--resume`` restores it.

A Tune that cannot read its own state logs a traceback and silently runs the whole stage again; a trial
whose latest checkpoint folder vanished fails. So the state is read here first: corrupted state stops with
a ``StageError`` saying what to do, and a missing checkpoint folder is re-created empty so the trial resumes
from its previous good checkpoint (``trainables.load_trial_state``). This reads Tune's private formats (the
experiment-state JSON, the checkpoint manager's pickle): if they change, the checks step aside and leave it
to Tune. Also here: the two log filters that keep Tune's by-design warnings off the console.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .experiment import StageError

# its warnings read as they did when this lived in stages.py (the console text is unchanged)
log = logging.getLogger("sctune.service.stages")


def corrupted_tune_state(stage_dir: Path, why: str) -> str:
    return (f"Ray Tune's state of this stage in {stage_dir} cannot be restored ({why[:300]}). Move that folder "
            f"aside and rerun with --resume to run this stage again from scratch (finished stages are kept), "
            f"or start over with a new --name.")


BACKUP_DIR = ".sctune-good"  # the last readable copy of Tune's stage-level state files


def _readable(path: Path) -> bool:
    """Whole JSON or a whole pickle, whatever the suffix: Tune's ``search_gen_state-*.json`` and
    ``basic-variant-state-*.json`` are pickles despite their name."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data:
        return False
    try:
        json.loads(data)
        return True
    except ValueError:
        pass
    try:
        import ray.cloudpickle as cloudpickle

        cloudpickle.loads(data)
        return True
    except Exception:
        return False


def backup_state(stage_dir: Path, seen: dict[str, tuple[int, int]]) -> None:
    """Copy Tune's stage-level state files (experiment state, searcher) that changed since the last call
    (``seen``: name -> (mtime_ns, size)) and read back whole into ``stage_dir/.sctune-good``, each replaced
    atomically: Tune copies them onto the storage path in place, so a full disk leaves them truncated,
    and then this copy is what ``--resume`` restores (``check_restorable``)."""
    import shutil

    backup = stage_dir / BACKUP_DIR
    for f in stage_dir.iterdir() if stage_dir.is_dir() else ():
        if not f.is_file() or f.suffix not in (".json", ".pkl") or f.name.startswith("."):
            continue
        st = f.stat()
        key = (st.st_mtime_ns, st.st_size)
        if seen.get(f.name) == key or not _readable(f):
            continue
        backup.mkdir(exist_ok=True)
        tmp = backup / (f.name + ".tmp")
        try:
            shutil.copyfile(f, tmp)
            os.replace(tmp, backup / f.name)
            seen[f.name] = key
        except OSError:  # a full disk: the previous copy stays
            tmp.unlink(missing_ok=True)


def _restore_backup(stage_dir: Path) -> bool:
    """Put back the copies in ``.sctune-good`` of state files that no longer read back; True if any was."""
    import shutil

    backup, restored = stage_dir / BACKUP_DIR, False
    for b in sorted(backup.glob("*")) if backup.is_dir() else ():
        target = stage_dir / b.name
        if b.suffix in (".json", ".pkl") and not _readable(target) and _readable(b):
            log.warning("%s was cut short (a full disk?): restoring its last whole copy", target)
            shutil.copyfile(b, target)
            restored = True
    return restored


def check_restorable(stage_dir: Path) -> bool:
    """True if Tune's state in ``stage_dir`` (ray/<stage>) can be restored, False if there is none yet
    (the driver stopped before Tune recorded anything: the stage starts fresh); StageError if it is
    corrupted. Re-creates the newest checkpoint folder of an unfinished trial if it went missing, so the
    trial resumes from its previous good checkpoint instead of failing (``trainables.load_trial_state``)."""
    states = sorted(stage_dir.glob("experiment_state-*.json"))
    if not states:
        log.warning("%s holds no Tune experiment state yet: this stage starts fresh", stage_dir)
        return False
    newest = states[-1]
    session = newest.name[len("experiment_state-"):-len(".json")]
    try:
        import ray.cloudpickle as cloudpickle

        trial_data = json.loads(newest.read_text())["trial_data"]
        for f in stage_dir.glob(f"*-{session}.*"):  # the searcher's and variant generator's state: pickles
            if f != newest:
                cloudpickle.loads(f.read_bytes())
    except Exception as e:
        if _restore_backup(stage_dir):
            return check_restorable(stage_dir)
        raise StageError(corrupted_tune_state(stage_dir, f"{type(e).__name__}: {e}")) from None
    replace_missing_checkpoints(stage_dir, trial_data)
    return True


def replace_missing_checkpoints(stage_dir: Path, trial_data: list) -> None:
    import ray.cloudpickle as cloudpickle

    for state, meta in trial_data:
        try:
            state = json.loads(state) if isinstance(state, str) else state
            if state.get("status") == "TERMINATED":
                continue  # finished trials are not restored
            meta = json.loads(meta) if isinstance(meta, str) else meta
            manager = cloudpickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"]))
            latest = manager.latest_checkpoint_result
            if latest is None:
                continue
            path = stage_dir / state["relative_logdir"] / Path(latest.checkpoint.path).name
        except Exception as e:  # Tune's format changed: leave it to Tune
            log.debug("cannot check the checkpoints of a trial in %s: %s", stage_dir, e)
            continue
        if not path.exists():
            log.warning("trial %s: its latest checkpoint %s is missing; it resumes from its previous good "
                        "checkpoint, or from the start if there is none", state.get("trial_id"), path)
            path.mkdir(parents=True)
            continue
        try:
            from .trainables import load_checkpoint_state

            load_checkpoint_state(path)
        except Exception as e:
            from .trainables import CHECKPOINT_FILE

            log.warning("trial %s: its latest checkpoint %s cannot be read (%s: %s); it resumes from its previous "
                        "good checkpoint, or from the start if there is none", state.get("trial_id"),
                        path / CHECKPOINT_FILE, type(e).__name__, str(e)[:200])


ORPHAN_NOTE = "NOT_IN_RESULTS.txt"


def note_orphans(stage_dir: Path, tb_dir: Path, stage: str, trial_ids: set[str]) -> list[str]:
    """After a stage: the Tune trial folders and TensorBoard runs of trials its results do not hold (a trial
    the driver started just before it was killed, which Tune's saved state never recorded and so started
    again under another id) get a note saying so, and their TensorBoard sessions end as aborted (else they
    read as running forever). Returns the orphans' ids."""
    from ..present import tensorboard as tb

    text = (f"This trial is not in the results of stage {stage!r}: the driver was stopped (e.g. killed) before "
            "Tune recorded it, and --resume ran its configuration again under another trial id. Its records "
            "here are incomplete; summary.csv lists the trials that count.\n")
    orphans = []
    runs = sorted(p for p in (tb_dir / stage).iterdir() if p.is_dir()) if (tb_dir / stage).is_dir() else []
    for run in runs:
        if run.name in trial_ids or (run / ORPHAN_NOTE).exists():
            continue
        orphans.append(run.name)
        try:
            (run / ORPHAN_NOTE).write_text(text)
            tb.end_session(tb_dir, tb.run_name(stage, trial=run.name), status="aborted")
        except (OSError, ValueError) as e:
            log.warning("could not note the orphaned TensorBoard run %s: %s", run, e)
    for folder in sorted(p for p in stage_dir.iterdir() if p.is_dir()) if stage_dir.is_dir() else []:
        # Tune names a trial's folder <trainable>_<8-hex trial id>_<n>_<params>_<date>
        ids = [p for p in folder.name.split("_") if len(p) == 8 and all(c in "0123456789abcdef" for c in p)]
        if ids and ids[0] not in trial_ids and not (folder / ORPHAN_NOTE).exists():
            orphans.append(ids[0])
            try:
                (folder / ORPHAN_NOTE).write_text(text)
            except OSError as e:
                log.warning("could not note the orphaned trial folder %s: %s", folder, e)
    if orphans:
        log.warning("stage %s: %d trial record(s) of a stopped run are not in the results (%s); noted in %s",
                    stage, len(set(orphans)), ", ".join(sorted(set(orphans))), ORPHAN_NOTE)
    return sorted(set(orphans))


class _NoResultFilesFilter(logging.Filter):
    """Drops Tune's "Failed to fetch metrics ... both result.json and progress.csv were not found" warning
    (one line per trial). sctune turns Tune's own result files off (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``:
    it writes TensorBoard itself and reads results from the ResultGrid), so the files are missing by design.
    Any other failure to fetch metrics is still shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith("Failed to fetch metrics"):
            return True
        items = [ln for ln in msg.splitlines()[1:] if ln.startswith("- ")]
        return not items or not all("FileNotFoundError" in ln and "were not found" in ln for ln in items)


class _NoIncompleteTrialsFilter(logging.Filter):
    """Drops Tune's "Trials did not complete: [...]" error when trial errors are not printed
    (``TUNE_PRINT_ALL_TRIAL_ERRORS=0``): StageProgress has printed each failed trial's reason already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Trials did not complete")
                    and os.environ.get("TUNE_PRINT_ALL_TRIAL_ERRORS") == "0")


class _NoDiskFullTracebackFilter(logging.Filter):
    """Drops Tune's traceback when saving its state hits a full disk (ENOSPC): sctune stops the stage and
    says so in one line (``storage``), and ``--resume`` restores the last whole copy of that state."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, OSError) and (exc.errno == 28 or "No space left on device" in str(exc)))


_RESULT_FILES_FILTER = _NoResultFilesFilter()
_DISK_FULL_FILTER = _NoDiskFullTracebackFilter()
_INCOMPLETE_FILTER = _NoIncompleteTrialsFilter()


def install_log_filters() -> None:
    """Once per process (a filter added twice would still filter once, but the check keeps the list short)."""
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    if os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS") == "1" and _RESULT_FILES_FILTER not in logger.filters:
        logger.addFilter(_RESULT_FILES_FILTER)
    state_logger = logging.getLogger("ray.tune.execution.experiment_state")
    if _DISK_FULL_FILTER not in state_logger.filters:
        state_logger.addFilter(_DISK_FULL_FILTER)
    tune_logger = logging.getLogger("ray.tune.tune")
    if _INCOMPLETE_FILTER not in tune_logger.filters:
        tune_logger.addFilter(_INCOMPLETE_FILTER)
