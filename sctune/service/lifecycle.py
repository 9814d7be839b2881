"""What a run owns and how it ends: the experiment lock, interrupts, and the Ray processes it started.

* ``ExperimentLock``: one run per experiment folder. An ``flock`` on ``<exp>/.sctune.lock`` plus an owner
  record (pid, host, process start time, command) in it. A second run or ``--resume`` of the same
  experiment is refused (exit 2) naming the holder. A record left by a process that is gone (same host:
  its pid is not running, or runs another program since) is stale and taken over; a record from another
  host is judged by the ``flock`` alone (held: refused; free: taken over), so on shared storage the two
  hosts must see each other's ``flock`` (NFS with lockd, Lustre/EFS with locking on).
* ``InterruptGuard``: SIGINT and SIGTERM are a pause, never a verdict. The first signal asks Ray Tune to
  stop the stage the way its own Ctrl-C does (no new trials, running ones stopped, its experiment state
  saved with them unfinished), then the stage raises ``Interrupted`` instead of reporting results; the
  stage is not recorded as done and ``--resume`` continues it. A second signal stops at once
  (``KeyboardInterrupt``); Tune's state is at most a second old (``TUNE_GLOBAL_CHECKPOINT_S=1``).
* ``start_watchdog``: when sctune starts Ray itself, every process Ray starts carries a per-run marker in
  its environment, and a small watchdog process (in a session of its own) waits for the driver to end, by
  any means, SIGKILL included, and then ends every process that carries the marker (SIGTERM, then
  SIGKILL after 2 s: Ray's agents ignore SIGTERM). A driver that exits normally has shut Ray down; the
  watchdog then finds nothing, or only stragglers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sctune")

LOCK_NAME = ".sctune.lock"
MARKER_VAR = "SCTUNE_RUN_MARKER"


# -- the experiment lock ---------------------------------------------------------------------------

class LockedError(RuntimeError):
    """The experiment is in use by another run; ``str()`` says which."""


def start_ticks(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, /proc/PID/stat field 22): with the pid it names a
    process uniquely, so a recycled pid is not mistaken for the run that wrote a lock."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = start_ticks(pid)
    return now is None or ticks is None or now == ticks


def read_owner(exp: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((exp / LOCK_NAME).read_text() or "null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and "pid" in owner else None


def _describe(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"process {owner.get('pid')} on host {owner.get('host')} (started {when}: "
            f"{owner.get('command', '?')})")


def holder(exp: Path) -> str | None:
    """Who holds ``exp``'s lock right now (a description), or None if nobody does. Reads only."""
    path = exp / LOCK_NAME
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = read_owner(exp)
            if owner is not None and owner.get("pid") == os.getpid():
                return None  # this process holds it (run() re-validates under its own lock)
            return _describe(owner) if owner else "another process"
        except OSError:  # no flock on this filesystem: the owner record decides
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    owner = read_owner(exp)
    if owner is None:
        return None
    if owner.get("host") == socket.gethostname():
        return _describe(owner) if _running(int(owner["pid"]), owner.get("ticks")) else None
    return None  # another host's record without its flock: that run is gone


class ExperimentLock:
    """Held from before Ray starts until the run ends; ``acquire`` raises ``LockedError`` naming the holder."""

    def __init__(self, exp: Path):
        self.exp = Path(exp)
        self.path = self.exp / LOCK_NAME
        self._fd: int | None = None
        self._created_dir = False
        self._created_top = self.exp

    def acquire(self) -> ExperimentLock:
        import fcntl

        top = self.exp  # the highest folder this run creates (the storage path too, when it is new)
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        try:
            self.exp.mkdir(parents=True)
            self._created_dir, self._created_top = True, top
        except FileExistsError:
            pass
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = read_owner(self.exp)
                raise LockedError(f"experiment {self.exp} is in use by "
                                  f"{_describe(owner) if owner else 'another process'}; wait for it to end, or stop "
                                  "it (Ctrl-C) and rerun with --resume") from None
            except OSError as e:  # a filesystem without flock: the owner record alone decides
                log.debug("flock unavailable on %s (%s); relying on the owner record", self.path, e)
            owner = read_owner(self.exp)
            if owner is not None and owner.get("pid") != os.getpid():
                same_host = owner.get("host") == socket.gethostname()
                if same_host and _running(int(owner["pid"]), owner.get("ticks")):
                    raise LockedError(f"experiment {self.exp} is in use by {_describe(owner)}; wait for it to end, "
                                      "or stop it (Ctrl-C) and rerun with --resume")
                log.warning("taking over the lock of %s left by %s, which %s", self.exp, _describe(owner),
                            "is no longer running" if same_host else "no longer holds it")
            record = {"pid": os.getpid(), "host": socket.gethostname(), "ticks": start_ticks(os.getpid()),
                      "started": time.time(), "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the owner record and drop the flock. The file stays (unlinking a locked file lets two runs
        lock different inodes), except in a folder this run created and left empty (a run refused by the
        preflight leaves nothing behind)."""
        if self._fd is None:
            return
        owner = read_owner(self.exp)
        with contextlib.suppress(OSError):
            if owner is not None and owner.get("pid") == os.getpid():
                os.ftruncate(self._fd, 0)
            if self._created_dir and [p.name for p in self.exp.iterdir()] == [LOCK_NAME]:
                self.path.unlink()
                self.exp.rmdir()
                d = self.exp.parent
                while self._created_top != self.exp and d != d.parent and not any(d.iterdir()):
                    d.rmdir()  # the storage folders this run created, left empty
                    if d == self._created_top:
                        break
                    d = d.parent
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> ExperimentLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- interrupts -------------------------------------------------------------------------------------

class Interrupted(Exception):
    """The run was interrupted (SIGINT/SIGTERM) and stopped cleanly; ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


EXIT_DISK_FULL = 28  # after errno ENOSPC


class DiskFull(Interrupted):
    """The storage path has no room left: the run stopped as on an interrupt (nothing is lost, ``--resume``
    continues once space is freed). ``exit_code`` is 28, after errno ENOSPC."""

    def __init__(self, path: Path, needed: int | None, message: str):
        Exception.__init__(self, message)
        self.signum = None
        self.path, self.needed = Path(path), needed

    @property
    def exit_code(self) -> int:
        return EXIT_DISK_FULL


class InterruptGuard:
    """SIGINT/SIGTERM handlers for the run (main thread only). ``signum`` is the first signal received."""

    def __init__(self):
        self.signum: int | None = None
        self.count = 0
        self._poked = False
        self._saved: dict[int, Any] = {}
        self._saved_env: str | None = None
        self.active = False
        self.pending: BaseException | None = None  # why stop_stage stopped the stage

    def install(self) -> None:
        """(Re)install the handlers: called before Ray starts and again after, since ``ray.init`` installs
        its own SIGTERM handler (which aborts with a native stack dump)."""
        if threading.current_thread() is not threading.main_thread():
            return
        # Tune's own SIGINT handler would replace ours during each stage (and leave SIGTERM to Ray's abort).
        if not self.active:
            self._saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(sig)
            if current is not self._handle:
                self._saved.setdefault(sig, current)
                signal.signal(sig, self._handle)
        self.active = True

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._saved.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()
        if self.active:
            if self._saved_env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._saved_env
        self.active = False

    def _handle(self, signum: int, frame) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
        name = signal.Signals(signum).name
        if self.count == 1:
            print(f"\n[sctune] {name} received: stopping; finished work is kept and running trials keep their "
                  "last checkpoint (a second Ctrl-C or SIGTERM stops at once)", file=sys.stderr, flush=True)
            return
        # second signal: stop now; the default handlers take over for a third
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        raise KeyboardInterrupt(f"{name} after a first signal: stopping at once")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def poke_tune(self) -> None:
        """Ask the running ``Tuner.fit`` to stop as on its own Ctrl-C (called from the Tune loop, once)."""
        if self.signum is None or self._poked:
            return
        self._poked = True
        # tune.run registers this handler for SIGUSR1 (always) and SIGINT: it sets the loop's stop event; the
        # loop then saves the experiment state with unfinished trials still unfinished and ends.
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):
            handler(signal.SIGUSR1, None)
        else:
            raise KeyboardInterrupt("interrupted")

    def stop_stage(self, reason: BaseException) -> None:
        """Stop the running stage as an interrupt does, then raise ``reason`` (``raise_pending``) instead of
        its results: a full disk, a failure every trial would hit. Called from Tune's loop (a callback)."""
        if self.pending is None:
            self.pending = reason
        handler = signal.getsignal(signal.SIGUSR1)  # Tune's stop handler (see poke_tune)
        if callable(handler):
            handler(signal.SIGUSR1, None)

    def raise_pending(self) -> None:
        """After ``Tuner.fit`` returns: what ``stop_stage`` stopped it for, if anything."""
        reason, self.pending = self.pending, None
        if reason is not None:
            raise reason

    def reset(self) -> None:
        self.signum, self.count, self._poked, self.pending = None, 0, False, None


GUARD = InterruptGuard()


def interrupted_message(stage: str | None, done: int | None, total: int | None, exp: Path, signum: int) -> str:
    if stage is None:
        return (f"{signal.Signals(signum).name}: interrupted before stage 1 started. Resume with: python -m "
                f"sctune.search --resume --name {exp.name} --storage-path {exp.parent}")
    number = {"range": 1, "search": 2, "final": 3}.get(stage, "?")
    unit = {"range": "range tests", "search": "trials", "final": "runs"}.get(stage, "trials")
    if done is not None and total is not None:
        progress = f" after {done}/{total} {unit}"
    elif done == 0:
        progress = ", before it started"
    elif done is not None:  # a search the budget ends (no count of trials known in advance)
        progress = f" after {done} {unit}"
    else:
        progress = ""
    return (f"{signal.Signals(signum).name}: interrupted in stage {number} ({stage}){progress}; nothing is lost. "
            f"Resume with: python -m sctune.search --resume --name {exp.name} --storage-path {exp.parent}")


# -- processes: the watchdog ------------------------------------------------------------------------

def new_marker() -> str:
    return secrets.token_hex(8)


def marked_pids(marker: str, *, exclude: tuple[int, ...] = ()) -> list[int]:
    """Processes whose environment holds ``SCTUNE_RUN_MARKER=marker``."""
    needle = f"{MARKER_VAR}={marker}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle + b"\0" in env or env.endswith(needle):
            out.append(int(entry))
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def reap(marker: str, *, grace: float = 2.0) -> list[int]:
    """SIGTERM every process carrying ``marker``, SIGKILL what is left after ``grace`` s. Returns what it found."""
    me = (os.getpid(),)
    found = marked_pids(marker, exclude=me)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = [p for p in marked_pids(marker, exclude=me) if pid_alive(p)]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
    return found


def start_watchdog(marker: str) -> subprocess.Popen | None:
    """A watchdog for this driver: when it ends, by any means, the processes carrying ``marker`` end too."""
    if not sys.platform.startswith("linux"):
        return None
    env = {k: v for k, v in os.environ.items() if k != MARKER_VAR}
    try:
        return subprocess.Popen([sys.executable, "-m", "sctune.service.lifecycle", str(os.getpid()), marker],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                cwd=str(Path(__file__).resolve().parents[2]))  # where ``sctune`` imports from
    except OSError as e:
        log.warning("could not start the process watchdog (%s): if this run is killed, stop its Ray with "
                    "`ray stop` yourself", e)
        return None


def _watch(driver: int, marker: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver is not for us
    ticks = start_ticks(driver)
    try:
        fd = os.pidfd_open(driver)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        import select

        select.select([fd], [], [])  # readable when the driver exits
        os.close(fd)
    else:
        while _running(driver, ticks):
            time.sleep(0.2)
    reap(marker)


if __name__ == "__main__":  # the watchdog process: python -m sctune.service.lifecycle DRIVER_PID MARKER
    _watch(int(sys.argv[1]), sys.argv[2])
