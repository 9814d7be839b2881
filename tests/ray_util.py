"""Local Ray clusters for tests that must not disturb anything else on the machine.

Every cluster started here:

* binds 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, ``node_ip_address=127.0.0.1``,
  dashboard on 127.0.0.1) on explicitly chosen free ports, never Ray's fixed defaults;
* keeps its sessions, sockets and its ``ray_current_cluster`` file under its own temp dir
  (``RAY_TMPDIR``), so another ``ray.init()`` on the machine never discovers it, and vice versa;
* runs with token authentication whose token comes from ``RAY_AUTH_TOKEN`` (nothing is read
  from or written to ``~/.ray``);
* carries a unique marker variable in the environment of every process it starts (inherited by
  raylets, workers and job drivers alike). Cleanup kills exactly the processes that carry it and
  checks that none is left: never ``ray stop``, which stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MARKER_VAR = "SCTUNE_TEST_RAY_MARKER"


# -- ports -----------------------------------------------------------------------------------------

def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (picked by the kernel)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in out:
            out.append(port)
    return out


def free_port_block(n: int, lo: int = 20000, hi: int = 32000) -> int:
    """First port of ``n`` consecutive free ports below the kernel's ephemeral range (for worker ports)."""
    for _ in range(200):
        start = random.randrange(lo, hi - n)
        if all(_bindable(p) for p in range(start, start + n)):
            return start
    raise RuntimeError(f"no block of {n} free ports in [{lo}, {hi})")


# -- processes -------------------------------------------------------------------------------------

def marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``MARKER_VAR=marker``: the ones a test's cluster started."""
    needle = f"{MARKER_VAR}={marker}".encode() + b"\0"
    me = {os.getpid(), os.getppid()}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or not ours to read
            continue
        if needle in env or env.endswith(needle[:-1]):
            pids.append(int(entry))
    return pids


def kill_marked(marker: str, *, timeout: float = 15.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process carrying ``marker``. Returns the pids still alive (should be [])."""
    for sig, wait in ((signal.SIGTERM, timeout / 2), (signal.SIGKILL, timeout / 2)):
        pids = marked_pids(marker)
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and marked_pids(marker):
            time.sleep(0.2)
    return [p for p in marked_pids(marker) if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # zombies are dead, just not reaped
    except OSError:
        return False


# -- environment -----------------------------------------------------------------------------------

def ray_env(tmp: Path, marker: str, token: str) -> dict[str, str]:
    """Environment variables for a test cluster and its clients (added to a copy of os.environ)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(tmp),  # sessions, sockets and ray_current_cluster live here
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,  # clients need RAY_AUTH_MODE=token too, or they send no token
        MARKER_VAR: marker,
    }


def reset_ray_auth_cache() -> None:
    """Ray caches the auth mode and token per process; re-read them from the environment."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # pragma: no cover - Ray without token auth
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def short_tmpdir(prefix: str) -> Path:
    # Ray puts unix sockets under the temp dir; keep the path short (sun_path is 108 bytes).
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def patched_environ(values: dict[str, str], drop: tuple[str, ...] = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")):
    saved = {k: os.environ.get(k) for k in (*values, *drop)}
    os.environ.update(values)
    for k in drop:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- an in-process multi-node cluster (ray.cluster_utils.Cluster) ----------------------------------

def _node_ports() -> dict[str, int]:
    names = ("node_manager_port", "object_manager_port", "dashboard_agent_listen_port", "metrics_export_port",
             "metrics_agent_port", "runtime_env_agent_port")
    return dict(zip(names, free_ports(len(names)), strict=True))


@contextlib.contextmanager
def in_process_cluster(*, head_cpus: float = 0, workers: list[dict] | None = None) -> Iterator:
    """``ray.cluster_utils.Cluster`` with a head of ``head_cpus`` CPUs and one node per ``workers`` entry
    (kwargs for ``add_node``, e.g. ``{"num_cpus": 1, "resources": {"x": 1}}``). Yields the Cluster;
    connect with ``ray.init(address=cluster.address)`` (sctune.search.run does)."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("a Ray runtime is already connected in this process")
    tmp = short_tmpdir("sct-rc-")
    marker = secrets.token_hex(8)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    cluster = None
    try:
        with patched_environ(ray_env(tmp, marker, secrets.token_hex(32))):
            ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the env was set
            reset_ray_auth_cache()
            try:
                head = {"num_cpus": head_cpus, "num_gpus": 0, "node_ip_address": "127.0.0.1",
                        "include_dashboard": False, "gcs_server_port": free_ports(1)[0],
                        "ray_client_server_port": free_ports(1)[0], **_node_ports()}
                cluster = Cluster(initialize_head=True, head_node_args=head)
                for w in workers or []:
                    cluster.add_node(**({"node_ip_address": "127.0.0.1", "num_gpus": 0} | _node_ports() | w))
                cluster.wait_for_nodes()
                yield cluster
            finally:
                if ray.is_initialized():
                    ray.shutdown()
                if cluster is not None:
                    cluster.shutdown()  # also removes $RAY_TMPDIR/ray/ray_current_cluster (ours)
                left = kill_marked(marker)
        assert not left, f"processes of the test cluster still alive: {left}"
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        # Forget this cluster's token only now that patched_environ has restored the environment: reset
        # inside it, Ray re-read the test token and kept token auth for the rest of the process, so the
        # next Ray this process drove (a plain, token-less cluster) never started a trial's actor.
        reset_ray_auth_cache()
        shutil.rmtree(tmp, ignore_errors=True)


# -- a real head started with `ray start --head --block` in its own session -------------------------

@dataclass
class Head:
    proc: subprocess.Popen
    tmp: Path
    marker: str
    env: dict[str, str]  # what a client (`ray job ...`) needs: auth mode + token, loopback, temp dir
    gcs_port: int
    dashboard_port: int
    log: Path

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray_cli(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=env or self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.tmp)


@contextlib.contextmanager
def ray_head(*, num_cpus: int = 2, startup_timeout: float = 90) -> Iterator[Head]:
    """Start a head node with the Jobs API (dashboard) on 127.0.0.1, yield it, stop exactly it."""
    tmp = short_tmpdir("sct-head-")
    home = tmp / "home"
    home.mkdir()
    marker = secrets.token_hex(8)
    (gcs, dash, client, agent_http, agent_grpc, metrics, nm, om, rtenv) = free_ports(9)
    workers = free_port_block(200)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # HOME is the temp dir: whatever Ray would read from or write to ~/.ray stays in the test's folder.
    env |= ray_env(tmp, marker, secrets.token_hex(32)) | {"HOME": str(home)}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--disable-usage-stats", "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--runtime-env-agent-port={rtenv}",
           f"--min-worker-port={workers}", f"--max-worker-port={workers + 199}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={tmp / 'ray'}"]
    log = tmp / "head.log"
    proc = None
    try:
        with open(log, "w") as out:
            # Its own session: Ctrl-C in the test's terminal does not reach it, cleanup does.
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                                    start_new_session=True)
        head = Head(proc, tmp, marker, env, gcs, dash, log)
        _wait_for_dashboard(head, startup_timeout)
        yield head
    finally:
        left: list[int] = []
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            left = kill_marked(marker)  # job drivers run in sessions of their own; get them too
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes of the test head still alive: {left}"


def _wait_for_dashboard(head: Head, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.proc.returncode}:\n{head.log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the server is up (and enforcing auth)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"dashboard not up after {timeout}s:\n{head.log.read_text()[-3000:]}")
