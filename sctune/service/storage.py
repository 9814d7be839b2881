"""The storage path's free space: a full disk is a pause, never a loss.

* ``stage_need``: an estimate of what a stage writes (checkpoints, TensorBoard, Tune's state), checked
  against the free space before the stage starts (``check_free``): too little stops the run with
  ``DiskFull`` (exit 28, after errno ENOSPC) naming the path and the space needed, before any trial runs.
* ``StorageWatch``: a Tune callback that, during a stage, stops it as an interrupt does when the free
  space falls under a reserve (what one more round of results of the running trials writes, and Tune's
  own state), so Tune still has room to save its state with the unfinished trials unfinished, and a trial
  that failed because the disk was full is not retried and not counted as failed. It also stops the stage
  at the first trial that fails setting up (``trainables.TrialSetupError``: its data or its task's code
  in a worker; every trial would fail the same way), instead of after every retry of every trial.
* ``as_disk_full``: an ``OSError`` ENOSPC (or Ray's unreadable error files on a full disk) raised anywhere
  in the driver, turned into ``DiskFull``.

After space is freed, ``--resume`` continues: the stopped stage is restored by Tune, nothing is redone.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path
from typing import Any

from .experiment import StageError
from .lifecycle import GUARD, DiskFull

log = logging.getLogger("sctune")

# Tune's experiment state (trials, searcher, callbacks) and sctune's own files of a stage: 84 KB measured for
# 3 trials (digits), ~20 KB a trial; 512 KB leaves room for ~25 trials' worth of growth between two checks.
STATE_BYTES = 512 * 1024
TB_BYTES_PER_EPOCH = 4 * 1024  # one epoch's scalars in a trial's TensorBoard run: ~1 KB measured, x4
RANGE_BYTES_PER_STEP = 600  # curves.csv row + the range test's TensorBoard scalars


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing parent); None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def checkpoint_bytes(param_bytes: int | None) -> int:
    """One trial checkpoint: weights + the optimizer's momentum buffer (2x the parameters) + BN buffers,
    RNG state and history (64 KB)."""
    return int(2.2 * (param_bytes or 0)) + 64 * 1024


def stage_need(stage: str, spec, cplan: dict[str, Any] | None, param_bytes: int | None) -> int:
    """Bytes stage ``stage`` is expected to write to the storage path (an estimate, on the high side)."""
    ckpt = checkpoint_bytes(param_bytes)
    if stage == "range":
        rt = spec.range_test
        tests = len(rt.weight_decays) * rt.repeats
        return STATE_BYTES + tests * rt.num_iter * RANGE_BYTES_PER_STEP
    if stage == "search":
        trials = ((cplan or {}).get("search") or {}).get("max_trials") or spec.search.num_samples
        return STATE_BYTES + int(trials) * (2 * ckpt + spec.base.epochs * TB_BYTES_PER_EPOCH)
    runs = max(1, spec.final.seeds)
    epochs = ((cplan or {}).get("final") or {}).get("epochs") or spec.base.epochs
    return STATE_BYTES + runs * (2 * ckpt + int(epochs) * TB_BYTES_PER_EPOCH)


def reserve_bytes(spec, param_bytes: int | None) -> dict[str, int]:
    """Free space each running stage keeps: Tune's state, and for stages that checkpoint one more checkpoint
    of every running trial (Tune writes the new one before it deletes the oldest)."""
    ckpt = STATE_BYTES + spec.search.max_concurrent * checkpoint_bytes(param_bytes)
    return {"range": STATE_BYTES, "search": ckpt, "final": ckpt}


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def disk_full_message(path: Path, need: int | None, stage: str | None, exp: Path) -> str:
    free = free_bytes(path)
    number = {"range": 1, "search": 2, "final": 3}.get(stage or "", None)
    where = f"in stage {number} ({stage})" if number else "before the stages"
    needs = f"needs about {_mb(need)}" if need else "needs more space"
    return (f"no space left on device: {path} {needs}, {_mb(free) if free is not None else '?'} free; stopped "
            f"{where}, nothing is lost. Free space, then resume with: python -m sctune.search --resume --name "
            f"{exp.name} --storage-path {exp.parent}")


def check_free(exp: Path, stage: str, need: int) -> None:
    """Before a stage: ``DiskFull`` if the storage path has less than ``need`` bytes free."""
    free = free_bytes(exp)
    if free is not None and free < need:
        raise DiskFull(exp, need, disk_full_message(exp, need, stage, exp))


def is_enospc(exc: BaseException | None) -> bool:
    """An ENOSPC somewhere in ``exc``'s chain (Ray wraps a worker's exception; Tune keeps text traces)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "[Errno 28]" in str(exc):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1
    return False


def as_disk_full(exc: BaseException, exp: Path, reserve: int) -> DiskFull | None:
    """``exc`` as a ``DiskFull`` if the disk being full caused it: an ENOSPC, or an error reading back what
    Ray wrote (EOFError, a truncated file) while the storage path has less than ``reserve`` free."""
    free = free_bytes(exp)
    low = free is not None and free < reserve
    if is_enospc(exc) or (low and isinstance(exc, EOFError)):
        from ..present.progress import active_progress

        p = active_progress()
        path = Path(getattr(exc, "filename", None) or exp)
        return DiskFull(path, reserve, disk_full_message(path, reserve, p.stage if p else None, exp))
    return None


class StorageWatchLogic:
    """``StorageWatch``'s logic (Tune's ``Callback`` base is added on first use, see ``storage_watch``)."""

    def __init__(self, stage: str, exp: Path, reserve: int):
        self.stage, self.exp, self.reserve = stage, Path(exp), int(reserve)
        self._backed_up: dict[str, tuple[int, int]] = {}
        self._last_backup = 0.0

    def setup(self, **info):
        # every fit, a restored one too: the clock and the files seen were another process's
        self._backed_up, self._last_backup = {}, 0.0

    def on_step_end(self, iteration, trials, **info):
        # Tune's state files, copied whole at most once a second (Tune writes them as often): what --resume
        # restores if a full disk cuts the ones on the storage path short (tune_state.check_restorable)
        import time

        if time.monotonic() - self._last_backup >= 1.0:
            from .tune_state import backup_state

            self._last_backup = time.monotonic()
            try:
                backup_state(self.exp / "ray" / self.stage, self._backed_up)
            except OSError as e:
                log.debug("could not back up Tune's state of %s: %s", self.stage, e)

    def _low(self) -> bool:
        free = free_bytes(self.exp)
        return free is not None and free < self.reserve

    def _stop_full(self) -> None:
        GUARD.stop_stage(DiskFull(self.exp, self.reserve,
                                  disk_full_message(self.exp, self.reserve, self.stage, self.exp)))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._low():
            self._stop_full()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failed(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._failed(trial)

    def _failed(self, trial) -> None:
        err = _trial_error(trial)
        if self._low() or is_enospc(err if isinstance(err, BaseException) else None) or \
                (isinstance(err, str) and is_enospc(RuntimeError(err))):
            self._stop_full()
            return
        if not _is_setup_failure(err):
            return  # failed mid-training (Tune retries it from its checkpoint), or its worker died
        from ..core.config import error_line

        GUARD.stop_stage(StageError(
            f"trial {trial.trial_id} of stage {self.stage!r} could not set up in its worker: "
            f"{(error_line(err) or 'unknown error').removeprefix('TrialSetupError: ')}. Every trial would fail the same way, so the stage stopped "
            f"(see {getattr(trial, 'path', None) or 'its folder'}/error.txt; rerun with --verbose for Ray's "
            "logs). Fix it, then continue with --resume"))


def _trial_error(trial) -> Any:
    """The trial's latest error: from the driver's copy Tune has just written (the storage path gets it on
    the next sync), else from the storage path."""
    import ray.cloudpickle as cloudpickle

    def local_pickle():
        path = getattr(trial, "pickled_error_file", None)
        return cloudpickle.loads(Path(path).read_bytes()) if path and Path(path).is_file() else None

    def local_text():
        path = getattr(trial, "error_file", None)
        return Path(path).read_text() if path and Path(path).is_file() else None

    for read in (local_pickle, local_text, trial.get_pickled_error, trial.get_error):
        try:
            err = read()
        except Exception:  # written on a full disk: unreadable
            continue
        if err is not None:
            return err
    return None


def _is_setup_failure(err: Any) -> bool:
    """The trial failed setting up (``trainables.TrialSetupError``: its task's data or code), not training."""
    for _ in range(5):
        if isinstance(err, BaseException) and type(err).__name__ == "TrialSetupError":
            return True
        if isinstance(err, str):
            return "TrialSetupError" in err
        err = getattr(err, "cause", None) or getattr(err, "__cause__", None)
        if err is None:
            return False
    return False


_RESERVE: dict[str, int] = {}  # the run's reserve (``configure``), for the stages' callbacks


def configure(reserve: dict[str, int] | None) -> None:
    """The free space each stage of this run keeps (``reserve_bytes``); None: no watch."""
    _RESERVE.clear()
    _RESERVE.update(reserve or {})


def stage_callbacks(exp: Path, stage: str) -> list:
    """The Tune callbacks that stop ``stage`` on a full disk or a failing setup ([] unless ``configure``d)."""
    return [storage_watch(stage, exp, _RESERVE[stage])] if stage in _RESERVE else []


def storage_watch(stage: str, exp: Path, reserve: int):
    """A ``StorageWatch`` callback for one stage (the class is made on first use: Ray loads then)."""
    cls = globals().get("StorageWatch")
    if cls is None:
        from ray.tune import Callback

        cls = type("StorageWatch", (StorageWatchLogic, Callback),
                   {"__module__": __name__, "__doc__": StorageWatchLogic.__doc__})
        globals()["StorageWatch"] = cls
    return cls(stage, exp, reserve)


def __getattr__(name: str) -> Any:
    if name == "StorageWatch":  # pickle's lookup by name, when Tune restores the tuner's callbacks
        from ray.tune import Callback

        cls = type("StorageWatch", (StorageWatchLogic, Callback),
                   {"__module__": __name__, "__doc__": StorageWatchLogic.__doc__})
        globals()["StorageWatch"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
