"""Helpers for the fault tests (test_reliability.py, test_cli_errors.py): run the CLI in its own process
group with a private RAY_TMPDIR, kill it, find what it left behind, read Tune's and TensorBoard's records;
inject faults into trials through sctune's trial hook (``fault_env``, ``inject_fault``).

Everything here is bounded: every wait has a timeout, and ``kill_leftovers`` kills only processes whose
command line names the test's own RAY_TMPDIR (never ``ray stop``: others run Ray on the same machine).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def short_tmpdir(prefix: str = "sctrel") -> Path:
    """A short private temp dir for RAY_TMPDIR: Ray's socket paths under it must stay < 108 bytes,
    which pytest's tmp_path is too long for."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def cli_env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", FAULT_ENV, HOOK_ENV):
        env.pop(k, None)
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def cli_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "sctune.search", *map(str, args)]


# -- fault injection ----------------------------------------------------------------------------
#
# sctune calls the function SCTUNE_TRIAL_HOOK names once per reported epoch in every trial
# (sctune.service.trainables.trial_hook); pointed at inject_fault below, it raises, kills the worker or slows
# epochs down as the rules in SCTUNE_FAULT_INJECT say. Inert unless both are set (fault_env sets both).

HOOK_ENV = "SCTUNE_TRIAL_HOOK"  # sctune.service.trainables.HOOK_ENV; not imported, so this module stays light
FAULT_ENV = "SCTUNE_FAULT_INJECT"


class InjectedFault(RuntimeError):
    """Raised in a trial by ``inject_fault``."""


def fault_env(spec: str) -> dict[str, str]:
    """Environment variables that make every trial run ``inject_fault`` with the rules ``spec``.

    Ray workers inherit them from the driver (or from the process that started the cluster's nodes);
    tests/ goes on PYTHONPATH so that they can import this module.
    """
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {HOOK_ENV: "fault_util:inject_fault", FAULT_ENV: spec, "PYTHONPATH": path}


def _fault_rules(stage: str) -> list[dict[str, str]]:
    """Parse ``SCTUNE_FAULT_INJECT``: rules ``STAGE[:key=value...]`` separated by ``;``.

    Keys: ``epoch=N`` fire after epoch N's checkpoint was reported (a range test has one "epoch", fired
    before its report); ``once=PATH`` fire only for whoever creates PATH first (O_EXCL; the trial id is
    written into it), so exactly one fault happens across trials and retries; ``action=raise`` (default,
    an exception in the trial) or ``exit`` (the worker process dies: ``os._exit``); ``delay=S`` sleep S
    seconds after every epoch (slow trials, for tests that act while trials run). Example:
    ``SCTUNE_FAULT_INJECT="search:epoch=2:once=/tmp/m;search:delay=0.5"``.
    """
    spec = os.environ.get(FAULT_ENV, "").strip()
    rules = []
    for text in filter(None, (r.strip() for r in spec.split(";"))):
        head, *pairs = text.split(":")
        rule = {"stage": head.strip()}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in ("epoch", "once", "action", "delay"):
                raise ValueError(f"{FAULT_ENV}: bad item {pair!r} in rule {text!r} "
                                 "(keys: epoch, once, action, delay)")
            rule[key] = value
        if rule["stage"] == stage:
            rules.append(rule)
    return rules


def inject_fault(stage: str, epoch: int, trial_id: str) -> None:
    """The trial hook: apply the ``SCTUNE_FAULT_INJECT`` rules for this stage and epoch (none if unset)."""
    if FAULT_ENV not in os.environ:
        return
    for rule in _fault_rules(stage):
        if "delay" in rule:
            time.sleep(float(rule["delay"]))
        if "epoch" not in rule or int(rule["epoch"]) != epoch:
            continue
        if "once" in rule:
            try:
                fd = os.open(rule["once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, trial_id.encode())
            os.close(fd)
        log.warning("%s: injecting a fault into trial %s at epoch %d", FAULT_ENV, trial_id, epoch)
        if rule.get("action", "raise") == "exit":
            os._exit(17)
        raise InjectedFault(f"{FAULT_ENV}: injected fault in {stage} trial {trial_id} at epoch {epoch}")


# -- processes ----------------------------------------------------------------------------------

def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (e.g. a test's RAY_TMPDIR)."""
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != me and text in _cmdline(int(d.name)):
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def kill_leftovers(ray_tmp: Path, *, timeout: float = 20.0) -> list[int]:
    """SIGKILL every process that names ``ray_tmp`` (Ray's raylet, GCS, workers of a killed driver);
    returns the pids it found. Only our own private session dir matches, never others' Ray."""
    found = pids_mentioning(str(ray_tmp))
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in found):
        time.sleep(0.1)
    return found


def kill_group(proc: subprocess.Popen, ray_tmp: Path | None = None, *, timeout: float = 30.0) -> list[int]:
    """SIGKILL the process group of ``proc`` (started with start_new_session), reap it, then kill what
    is left in ``ray_tmp``'s Ray session. Returns the leftover pids found after the group kill."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.1)
    return kill_leftovers(ray_tmp) if ray_tmp is not None else []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_alive(int(d.name)) and _pgid(int(d.name)) == pgid
               for d in Path("/proc").iterdir() if d.name.isdigit())


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


class Cli:
    """``python -m sctune.search ...`` in its own session, output to files; always cleaned up."""

    def __init__(self, args: list[str | Path], *, env: dict[str, str], log_dir: Path, tag: str):
        self.ray_tmp = Path(env["RAY_TMPDIR"])
        self.out_path, self.err_path = log_dir / f"{tag}.out", log_dir / f"{tag}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(cli_cmd(*args), env=env, cwd=REPO, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.t0 = time.monotonic()

    @property
    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.out_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"CLI still running after {timeout:.0f}s; stderr tail:\n{self.stderr[-3000:]}") \
                from None
        finally:
            self._close()

    def wait_until(self, what: str, predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2) -> Any:
        """Poll ``predicate`` until it returns something truthy; fail if the CLI exits first or on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                v = predicate()
            except (OSError, ValueError):  # files being written
                v = None
            if v:
                return v
            if self.proc.poll() is not None:
                self._close()
                raise AssertionError(f"CLI exited (rc {self.proc.returncode}) before {what}; stderr tail:\n"
                                     f"{self.stderr[-3000:]}")
            time.sleep(interval)
        self.kill()
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; stderr tail:\n{self.stderr[-3000:]}")

    def kill(self) -> list[int]:
        left = kill_group(self.proc, self.ray_tmp)
        self._close()
        return left

    def _close(self) -> None:
        for f in (self._out, self._err):
            if not f.closed:
                f.close()


def run_cli(args: list[str | Path], *, env: dict[str, str], log_dir: Path, tag: str, timeout: float) -> Cli:
    """Run the CLI to completion (bounded); returns the finished Cli (``.proc.returncode``, output)."""
    cli = Cli(args, env=env, log_dir=log_dir, tag=tag)
    try:
        cli.wait(timeout)
    finally:
        kill_leftovers(cli.ray_tmp)  # a finished driver shuts Ray down; this is only a safety net
    return cli


def cleanup_ray_tmp(ray_tmp: Path) -> None:
    kill_leftovers(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


# -- listening sockets (no psutil needed) ---------------------------------------------------------

def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(link[8:-1])
    except OSError:
        pass
    return out


def _hex_ip(h: str) -> str:
    if len(h) == 8:  # IPv4, little-endian
        return ".".join(str(int(h[i:i + 2], 16)) for i in (6, 4, 2, 0))
    words = [h[i:i + 8] for i in range(0, 32, 8)]  # IPv6: four little-endian 32-bit words
    raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
    import ipaddress

    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of the TCP sockets in LISTEN state held by ``pids``."""
    by_inode = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A":
                ip_hex, port_hex = parts[1].split(":")
                by_inode[parts[9]] = (_hex_ip(ip_hex), int(port_hex, 16))
    out = []
    for pid in pids:
        for inode in _socket_inodes(pid):
            if inode in by_inode:
                out.append((pid, *by_inode[inode]))
    return out


# -- Tune's and TensorBoard's records -----------------------------------------------------------

def tune_trials(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """Trials as Tune's newest experiment state in ``stage_dir`` (ray/<stage>) records them:
    ``{trial_id: {"status", "epoch" (last reported), "num_failures", "config"}}``; {} if there is none yet."""
    files = sorted(Path(stage_dir).glob("experiment_state-*.json"))
    if not files:
        return {}
    data = json.loads(files[-1].read_text())
    out = {}
    for state, meta in data["trial_data"]:
        state = json.loads(state) if isinstance(state, str) else state
        meta = json.loads(meta) if isinstance(meta, str) else meta
        last = meta.get("last_result") or {}
        if isinstance(last, str):
            last = json.loads(last)
        config = state.get("config") or {}
        if isinstance(config, str):
            config = json.loads(config)
        out[state["trial_id"]] = {"status": state["status"], "epoch": int(last.get("epoch", 0) or 0),
                                  "num_failures": int(meta.get("num_failures", 0) or 0), "config": config,
                                  "checkpoint": _latest_checkpoint(meta)}
    return out


def _latest_checkpoint(meta: dict) -> str | None:
    """The folder name of the checkpoint Tune's state records as the trial's latest (what --resume restores
    from), read from its checkpoint manager; None if there is none or the format is not readable."""
    try:
        import ray.cloudpickle as cloudpickle

        latest = cloudpickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"])).latest_checkpoint_result
        return None if latest is None else Path(latest.checkpoint.path).name
    except Exception:
        return None


def tb_event_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("*tfevents*"))


def tb_steps(run_dir: Path, tag: str = "val/acc") -> list[int]:
    """Steps at which ``tag`` was logged in a TensorBoard run, in file order (duplicates kept)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in tb_event_files(run_dir):
        for e in EventFileLoader(str(f)).Load():
            if e.HasField("summary") and any(v.tag == tag for v in e.summary.value):
                steps.append(int(e.step))
    return steps


def tb_session_status(run_dir: Path) -> str | None:
    """The HParams session status TensorBoard shows for a run: the first session end wins."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import metadata as hp

    for f in tb_event_files(run_dir):
        for e in EventFileLoader(str(f)).Load():
            if not e.HasField("summary"):
                continue
            for v in e.summary.value:
                if v.tag == hp.SESSION_END_INFO_TAG:
                    info = hp.parse_session_end_info_plugin_data(v.metadata.plugin_data.content)
                    return api_pb2.Status.Name(info.status)
    return None


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


def lines_matching(text: str, pattern: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(pattern, ln)]
