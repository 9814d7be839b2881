"""A real TensorBoard server (and headless Chromium) for tests and doc screenshots, on 127.0.0.1 only.

``make_tb_server(logdir)`` starts ``python -m tensorboard.main --host 127.0.0.1`` on a free port,
waits (bounded) until it answers, yields a ``TBServer`` with small JSON helpers for TensorBoard's
HTTP data API, and always kills the server on exit::

    with make_tb_server(logdir) as tb:
        runs = tb.wait_for(lambda: set(tb.get_json("/data/runs")) >= {"final/seed=0"} or None)

Nothing here talks to anything but 127.0.0.1: the HTTP client ignores proxy settings, and
``chromium_command`` blocks name resolution of every other host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # never bind or talk beyond loopback
T = TypeVar("T")

# All requests go straight to 127.0.0.1, even when http(s)_proxy is set in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# The statuses the TensorBoard frontend asks for (webapp/hparams/_redux/hparams_data_source.ts).
ALL_STATUSES = ["STATUS_FAILURE", "STATUS_RUNNING", "STATUS_SUCCESS", "STATUS_UNKNOWN"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class TBServer:
    """A running TensorBoard: ``base_url`` plus helpers for its data API."""

    logdir: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    base_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = f"http://{HOST}:{self.port}"

    def url(self, path: str, **query: str) -> str:
        qs = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"{self.base_url}{path}{qs}"

    def get(self, path: str, *, timeout: float = 30.0, **query: str) -> bytes:
        with _OPENER.open(self.url(path, **query), timeout=timeout) as resp:
            return resp.read()

    def get_json(self, path: str, **query: str) -> Any:
        return json.loads(self.get(path, **query))

    def post_json(self, path: str, body: Any, *, timeout: float = 30.0) -> Any:
        # The hparams plugin parses the raw POST body as the request proto in JSON.
        req = urllib.request.Request(
            self.url(path),
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with _OPENER.open(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def hparams_experiment(self) -> dict:
        return self.post_json("/data/plugin/hparams/experiment", {"experimentName": ""})

    def hparams_session_groups(self, experiment: dict | None = None) -> dict:
        """``session_groups`` with the request body the TensorBoard frontend sends."""
        experiment = experiment if experiment is not None else self.hparams_experiment()
        col_params = [{"hparam": h["name"]} for h in experiment.get("hparamInfos", [])]
        col_params += [{"metric": m["name"]} for m in experiment.get("metricInfos", [])]
        body = {
            "experimentName": "",
            "allowedStatuses": ALL_STATUSES,
            "colParams": col_params,
            "startIndex": 0,
            "sliceSize": 1_000_000,
        }
        return self.post_json("/data/plugin/hparams/session_groups", body)

    def wait_for(self, probe: Callable[[], T | None], *, timeout: float = 60.0, interval: float = 0.5) -> T:
        """Poll ``probe`` until it returns something truthy (TensorBoard loads logdirs lazily)."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                result = probe()
                if result:
                    return result
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                last_error = e
            time.sleep(interval)
        raise TimeoutError(
            f"condition not met within {timeout}s (last error: {last_error!r}); "
            f"server log:\n{self.server_log()}"
        )

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"tensorboard exited with {self.process.returncode}:\n{self.server_log()}")

    def server_log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # The server runs in its own process group (start_new_session), which also holds the data
    # server it spawns; signal that group only.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def make_tb_server(
    logdir: str | Path, *, timeout: float = 60.0, extra_args: Sequence[str] = (), attempts: int = 3
) -> Iterator[TBServer]:
    """Start TensorBoard on 127.0.0.1:<free port> for ``logdir``; kill it on exit, always.

    Waits until ``/data/runs`` answers (at most ``timeout`` s). Retries on a fresh port if the
    one picked was taken in between. ``extra_args`` go to tensorboard (e.g. ``--load_fast=false``).
    """
    logdir = Path(logdir)
    for attempt in range(1, attempts + 1):
        port = free_port()
        log_file = tempfile.NamedTemporaryFile(prefix="tensorboard-", suffix=".log", delete=False)
        log_path = Path(log_file.name)
        cmd = [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            HOST,
            "--port",
            str(port),
            "--reload_interval",
            "1",
            *extra_args,
        ]
        process = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log_file.close()
        server = TBServer(logdir=logdir, port=port, process=process, log_path=log_path)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    if "already in use" in server.server_log() and attempt < attempts:
                        break  # lost the port race: retry on another
                    server.check_alive()
                try:
                    server.get("/data/runs", timeout=5)
                    break
                except (urllib.error.URLError, OSError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"tensorboard did not answer on port {port} within {timeout}s:\n"
                            f"{server.server_log()}"
                        ) from None
                    time.sleep(0.3)
            if process.poll() is not None:
                continue
            yield server
            return
        finally:
            _stop(process)
            log_path.unlink(missing_ok=True)
    raise RuntimeError("could not start tensorboard")


# ---------------------------------------------------------------------------------------------
# headless Chromium


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def chromium_command(
    url: str,
    *,
    user_data_dir: str | Path,
    screenshot: str | Path | None = None,
    dump_dom: bool = False,
    virtual_time_ms: int = 15000,
    window_size: tuple[int, int] = (1600, 1000),
) -> list[str]:
    """Headless Chromium that can only reach 127.0.0.1 (every other host name fails to resolve)."""
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"only {HOST} URLs are allowed, got {url!r}")
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium not found (apt-get install -y chromium)")
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-breakpad",
        "--disable-client-side-phishing-detection",
        "--no-default-browser-check",
        "--no-proxy-server",
        f"--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE {HOST}",
        "--hide-scrollbars",
        f"--user-data-dir={user_data_dir}",
        f"--window-size={window_size[0]},{window_size[1]}",
        f"--virtual-time-budget={virtual_time_ms}",
    ]
    if screenshot is not None:
        cmd.append(f"--screenshot={screenshot}")
    if dump_dom:
        cmd.append("--dump-dom")
    return [*cmd, url]


def run_chromium(
    url: str,
    *,
    screenshot: str | Path | None = None,
    dump_dom: bool = False,
    virtual_time_ms: int = 15000,
    timeout: float = 120.0,
    window_size: tuple[int, int] = (1600, 1000),
) -> str:
    """Run headless Chromium once (fresh profile); return the dumped DOM (or "")."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = chromium_command(
            url,
            user_data_dir=profile,
            screenshot=screenshot,
            dump_dom=dump_dom,
            virtual_time_ms=virtual_time_ms,
            window_size=window_size,
        )
        # Own process group, so a timeout takes Chromium's helper processes down too.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {err[-2000:]}")
    return out


# ---------------------------------------------------------------------------------------------
# a small synthetic experiment (for server tests and doc screenshots)


@dataclass(frozen=True)
class DemoBounds:
    """Stands in for sctune.core.bounds' result (same attributes and to_dict())."""

    min_lr: float | None
    max_lr: float | None
    status: str
    confidence: float
    message: str

    @property
    def verdict(self) -> dict:
        return {"message": self.message}

    def to_dict(self) -> dict:
        return {
            "min_lr": self.min_lr,
            "max_lr": self.max_lr,
            "status": self.status,
            "confidence": self.confidence,
            "verdict": self.verdict,
        }


DEMO_METRICS = [
    ("val/acc", "val accuracy"),
    ("val/loss", "val loss"),
    ("train/loss", "train loss"),
    ("test/acc", "test accuracy"),
    ("range_test/min_lr", "range min_lr"),
    ("range_test/max_lr", "range max_lr"),
]
DEMO_HPARAMS = {
    "wd": {"choices": [1e-4, 1e-3]},
    "seed": {"choices": [0, 1]},
    "max_lr": {"type": "float", "low": 0.05, "high": 3.0, "log": True, "display_name": "max LR"},
    "optimizer": {"choices": ["sgd", "adam"]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
}


def _range_frame(wd: float, seed: int):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    n = 200
    lr = np.linspace(0.01, 3.0, n)
    peak = 1.2 if wd < 5e-4 else 0.6  # the smaller wd tolerates larger LRs
    acc_true = 0.95 / (1 + np.exp(-8 * (lr - 0.15))) - 0.6 * np.clip(lr - peak, 0, None) ** 2
    loss = 2.3 - 1.9 * (acc_true / 0.95) + 0.08 * rng.standard_normal(n)
    diverge_at = np.searchsorted(lr, peak + 0.9)
    loss[diverge_at:] = loss[diverge_at - 1] * np.exp(np.arange(1, n - diverge_at + 1))
    loss[-1] = np.nan
    smooth = pd.Series(loss).ewm(alpha=0.05).mean().to_numpy()
    acc = np.full(n, np.nan)
    acc[::10] = np.clip(acc_true[::10] + 0.01 * rng.standard_normal(len(acc[::10])), 0, 1)
    return pd.DataFrame(
        {
            "step": np.arange(n),
            "lr": lr,
            "loss": loss,
            "smooth_loss": smooth,
            "acc": acc,
            "val_loss": np.where(np.isfinite(acc), 2.3 * (1 - acc), np.nan),
        }
    ), peak


def write_demo_logdir(logdir: str | Path) -> dict[str, str]:
    """Write a small synthetic sctune experiment; return {run name: expected sctune status}.

    Stage 1: range tests for wd in {1e-4, 1e-3} x seed in {0, 1} (session groups by wd).
    Stage 2: six search trials: three succeed, one pruned (closed by the driver, ``aborted``),
    one crashes (``failure``), one still running (no session end). Stage 3: one final fit.
    """
    import numpy as np

    from sctune.present import tensorboard as tb

    logdir = Path(logdir)
    tb.write_hparams_config(logdir, hparams=DEMO_HPARAMS, metrics=DEMO_METRICS)
    expected: dict[str, str] = {}
    for wd in (1e-4, 1e-3):
        for seed in (0, 1):
            df, peak = _range_frame(wd, seed)
            bounds = DemoBounds(
                min_lr=peak / 4,
                max_lr=peak,
                status="ok",
                confidence=0.9 if wd < 5e-4 else 0.7,
                message=(
                    "accuracy stays high up to LR 1.2: super-convergence likely"
                    if wd < 5e-4
                    else "accuracy falls after LR 0.6: super-convergence unlikely"
                ),
            )
            name = tb.run_name("range", wd=wd, seed=seed)
            # Seeds of one wd form one session group: one HParams row, metrics averaged over seeds.
            with tb.TrialLogger(logdir, name, hparams={"wd": wd}, group=f"range/wd={wd}") as log:
                tb.log_range_test(log, df, bounds)
            expected[name] = "success"

    trials = [  # (max_lr, optimizer, dropout, final val acc, outcome)
        (1.0, "sgd", 0.1, 0.93, "success"),
        (2.5, "sgd", 0.0, 0.90, "success"),
        (0.3, "adam", 0.2, 0.88, "success"),
        (0.08, "sgd", 0.3, 0.55, "aborted"),
        (2.9, "adam", 0.4, 0.30, "failure"),
        (0.6, "sgd", 0.25, 0.80, "running"),
    ]
    steps = 30
    for i, (max_lr, opt, dropout, final_acc, outcome) in enumerate(trials):
        name = tb.run_name("search", trial=f"demo_{i:05d}")
        hp = {"max_lr": max_lr, "optimizer": opt, "dropout": dropout, "wd": 1e-4}
        last = steps if outcome in ("success", "running") else steps // 3
        log = tb.TrialLogger(logdir, name, hparams=hp)
        for step in range(last):
            t = step / (steps - 1)
            frac = min(t / 0.45, 1.0) if t < 0.45 else max(0.0, 1 - (t - 0.45) / 0.45)
            lr = max_lr / 25 + (max_lr - max_lr / 25) * frac
            acc = final_acc * (1 - np.exp(-5 * (step + 1) / steps))
            log.scalars(
                {
                    tb.TRAIN_LOSS: 2.3 * (1 - acc) + 0.05,
                    tb.VAL_LOSS: 2.3 * (1 - acc) + 0.1,
                    tb.VAL_ACC: acc,
                    tb.LR: lr,
                    tb.MOMENTUM: 0.95 - 0.1 * frac,
                    tb.THROUGHPUT: 5000.0 + 10 * i,
                },
                step,
            )
        if outcome == "success":
            log.end("success", metrics={tb.TEST_ACC: final_acc - 0.01})
            log.close()
        elif outcome == "failure":
            log.end("failure")
            log.close()
        elif outcome == "aborted":
            log.close()  # the scheduler pruned it and the worker was killed: the driver ends it
            tb.end_session(logdir, name, status="aborted")
        else:
            log.close()  # still running: no session end
        expected[name] = outcome

    name = tb.run_name("final", seed=0)
    with tb.TrialLogger(
        logdir, name, hparams={"max_lr": 1.0, "optimizer": "sgd", "dropout": 0.1, "wd": 1e-4, "seed": 0}
    ) as log:
        for step in range(steps):
            log.scalars(
                {tb.TRAIN_LOSS: 2.0 * np.exp(-step / 8) + 0.1, tb.VAL_ACC: 0.94 * (1 - np.exp(-step / 6))},
                step,
            )
        log.end("success", metrics={tb.TEST_ACC: 0.935})
    expected[name] = "success"
    return expected
