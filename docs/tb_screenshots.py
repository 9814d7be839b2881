"""Screenshots of an sctune TensorBoard logdir, for the docs: ``python docs/tb_screenshots.py LOGDIR OUTDIR``.

Starts TensorBoard on 127.0.0.1 (never beyond loopback), renders with headless Chromium:

* ``scalars.png``          Scalars dashboard (``#scalars``), tags matching ``--tag-filter``
* ``hparams_table.png``    HParams dashboard, table view
* ``hparams_parallel_coords.png``  HParams parallel-coordinates view (needs a click: driven over the
  DevTools protocol on a pipe, no debugging port)
* ``images.png``           Images dashboard (range-test curves)

and dumps the DOM (``--dump-dom``) of ``#timeseries`` (run names are in its light DOM, unlike the
Polymer dashboards', whose content lives in shadow roots) to ``timeseries_dom.html``, plus the
HParams text including shadow roots to ``hparams_text.txt``. ``--demo`` first writes the synthetic
experiment from ``tests/tb_util.py`` into LOGDIR. Needs ``chromium`` (``apt-get install -y chromium``).

The URL fragments: ``#scalars&tagFilter=<regex>&regexInput=<run regex>`` (legacy dashboards keep
state in the hash), ``/?runFilter=<run regex>#timeseries`` (the Angular app keeps it in the query).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import logging
import os
import signal
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tb_util: the TensorBoard server / Chromium helpers the tests use

import tb_util  # noqa: E402

log = logging.getLogger("tb_screenshots")

# JS helpers: the Polymer dashboards render inside shadow roots, which querySelector does not enter.
_DEEP_JS = """
window.__deepAll = (sel) => { const out = []; const visit = (root) => {
  root.querySelectorAll(sel).forEach((e) => out.push(e));
  root.querySelectorAll('*').forEach((e) => { if (e.shadowRoot) visit(e.shadowRoot); }); };
  visit(document); return out; };
window.__deepText = () => { const parts = []; const visit = (root) => {
  parts.push(root.textContent || '');
  root.querySelectorAll('*').forEach((e) => { if (e.shadowRoot) visit(e.shadowRoot); }); };
  visit(document.documentElement); return parts.join('\\n'); };
true
"""


class CDPPipe:
    """Minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fds 3 and 4).

    A pipe instead of ``--remote-debugging-port``: nothing listens on any socket.
    """

    def __init__(self, url: str, *, window_size: tuple[int, int]) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-cdp-")
        cmd = tb_util.chromium_command(
            url, user_data_dir=self._profile.name, window_size=window_size, virtual_time_ms=0
        )
        # Drop the one-shot flags: this browser stays up and is driven over the pipe.
        cmd = [c for c in cmd[:-1] if not c.startswith("--virtual-time-budget")] + [
            "--remote-debugging-pipe",
            "about:blank",
        ]
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium expects to read commands on fd 3 and write replies on fd 4. Move both ends above
        # fd 10 first, so DUP2 to 3/4 can never clobber the other one.
        high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        devnull = os.open(os.devnull, os.O_RDWR)
        actions = [
            (os.POSIX_SPAWN_DUP2, high_r, 3),
            (os.POSIX_SPAWN_DUP2, high_w, 4),
            (os.POSIX_SPAWN_DUP2, devnull, 0),
            (os.POSIX_SPAWN_DUP2, devnull, 1),
            (os.POSIX_SPAWN_DUP2, devnull, 2),
        ]
        self.pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=actions, setsid=True)
        for fd in (to_browser_r, from_browser_w, high_r, high_w, devnull):
            os.close(fd)
        self._buf = b""
        self._next_id = 0
        self.session: str | None = None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, *, timeout: float = 60.0) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:  # events (no id) and stale replies are skipped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, width: int, height: int) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_js(self, expression: str, *, timeout: float = 60.0, what: str = "") -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.evaluate(_DEEP_JS)  # re-install after navigation/reload
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"page never showed {what or expression!r} within {timeout}s")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # the browser may already be gone; the kill below settles it
            log.debug("Browser.close failed", exc_info=True)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()


def parallel_coords_hidden_columns(experiment: dict, groups: list[dict]) -> list[str]:
    """Display names of the columns to hide so the parallel-coordinates plot shows lines.

    TensorBoard draws a session group only if it has a value in *every* visible column, and one
    sctune logdir holds all stages (range tests log wd/seed and bounds, search trials the
    one-cycle hparams, pruned trials no test accuracy). Keep the stage with the most session
    groups and only the columns all of its groups fill.
    """
    by_stage: dict[str, list[dict]] = {}
    for g in groups:
        stage = g["sessions"][0]["name"].split("/", 1)[0] if g.get("sessions") else ""
        by_stage.setdefault(stage, []).append(g)
    stage_groups = max(by_stage.values(), key=len)
    hidden = []
    for h in experiment.get("hparamInfos", []):
        if not all(h["name"] in g.get("hparams", {}) for g in stage_groups):
            hidden.append(h.get("displayName") or h["name"])
    for m in experiment.get("metricInfos", []):
        tags = [{v["name"]["tag"] for v in g.get("metricValues", [])} for g in stage_groups]
        if not all(m["name"]["tag"] in t for t in tags):
            hidden.append(m.get("displayName") or m["name"]["tag"])
    return hidden


def hparams_views(
    server: tb_util.TBServer,
    outdir: Path,
    *,
    experiment: dict,
    groups: list[dict],
    window_size: tuple[int, int],
) -> dict[str, Path]:
    """Parallel-coordinates screenshot and the HParams text (shadow DOM included), via CDP."""
    url = f"{server.base_url}/#hparams"
    sessions = [s["name"] for g in groups for s in g["sessions"]]
    hidden = parallel_coords_hidden_columns(experiment, groups)
    browser = CDPPipe(url, window_size=window_size)
    out: dict[str, Path] = {}
    try:
        browser.open(url, *window_size)
        probe = json.dumps(sessions[:1])
        browser.wait_js(
            f"{probe}.every((n) => window.__deepText().includes(n))", what="session names in the table"
        )
        text_path = outdir / "hparams_text.txt"
        text_path.write_text(browser.evaluate("window.__deepText()"))
        out["hparams_text"] = text_path
        clicked = browser.evaluate(
            "(() => { const t = window.__deepAll('paper-tab[view-id=\"parallel-coords-view\"]')[0];"
            " if (!t) return false; t.click(); return true; })()"
        )
        if not clicked:
            raise RuntimeError("no parallel-coordinates tab found")
        # Untick the columns in the query pane (left) that would hide every line.
        n_hidden = browser.evaluate(
            f"((hide) => {{ let n = 0; for (const b of window.__deepAll('tf-hparams-query-pane')[0]"
            f"  .shadowRoot.querySelectorAll('paper-checkbox')) {{"
            f"  if (hide.includes((b.textContent || '').trim()) && b.checked) {{ b.click(); n++; }} }}"
            f"  return n; }})({json.dumps(hidden)})"
        )
        log.info("parallel coordinates: hid %d columns %s", n_hidden, hidden)
        browser.wait_js(
            "(() => { const p = window.__deepAll('tf-hparams-parallel-coords-plot')[0];"
            " return p && p.shadowRoot.querySelectorAll('g.foreground path').length > 0; })()",
            what="parallel-coordinates lines",
        )
        time.sleep(1.5)  # let the axis transitions finish
        shot = outdir / "hparams_parallel_coords.png"
        browser.screenshot(shot)
        out["hparams_parallel_coords"] = shot
    finally:
        browser.close()
    return out


def ink_fraction(path: Path) -> float:
    """Share of pixels that differ from the page background (near 0 = blank page)."""
    from PIL import Image

    img = Image.open(path).convert("L").resize((400, 250))
    counts = img.histogram()  # 256 grey levels
    background = max(range(256), key=counts.__getitem__)
    return sum(c for level, c in enumerate(counts) if abs(level - background) > 16) / sum(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("outdir", type=Path)
    parser.add_argument(
        "--demo", action="store_true", help="first write the synthetic demo experiment into LOGDIR"
    )
    parser.add_argument(
        "--tag-filter", default=r"val/acc|train/loss|^lr$", help="scalar tag regex (#scalars)"
    )
    parser.add_argument("--run-filter", default="", help="run regex (#scalars, #timeseries)")
    parser.add_argument("--budget-ms", type=int, default=15000, help="Chromium --virtual-time-budget")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if tb_util.chromium_path() is None:
        log.error("chromium not found: apt-get update && apt-get install -y chromium")
        return 2
    if args.demo:
        tb_util.write_demo_logdir(args.logdir)
    args.outdir.mkdir(parents=True, exist_ok=True)
    size = (args.width, args.height)
    outputs: dict[str, Path] = {}
    with tb_util.make_tb_server(args.logdir) as server:
        runs = server.wait_for(lambda: [r for r in server.get_json("/data/runs") if r != "."], timeout=120)
        log.info("TensorBoard on %s lists %d runs", server.base_url, len(runs))
        experiment = server.hparams_experiment()
        groups = server.wait_for(
            lambda: server.hparams_session_groups(experiment).get("sessionGroups"), timeout=60
        )

        scalars_hash = "#scalars&" + urllib.parse.urlencode(
            {"tagFilter": args.tag_filter, "regexInput": args.run_filter}
        )
        shots = {"scalars": f"/{scalars_hash}", "hparams_table": "/#hparams", "images": "/#images"}
        for name, path in shots.items():
            target = args.outdir / f"{name}.png"
            tb_util.run_chromium(
                server.base_url + path, screenshot=target, virtual_time_ms=args.budget_ms, window_size=size
            )
            outputs[name] = target
        query = f"?{urllib.parse.urlencode({'runFilter': args.run_filter})}" if args.run_filter else ""
        dom = tb_util.run_chromium(
            f"{server.base_url}/{query}#timeseries",
            dump_dom=True,
            virtual_time_ms=args.budget_ms,
            window_size=size,
        )
        missing = [r for r in runs if r not in dom and (not args.run_filter or args.run_filter in r)]
        if missing:
            log.warning("timeseries DOM lacks runs %s (raise --budget-ms?)", missing)
        (args.outdir / "timeseries_dom.html").write_text(dom)
        outputs["timeseries_dom"] = args.outdir / "timeseries_dom.html"
        try:
            outputs.update(
                hparams_views(server, args.outdir, experiment=experiment, groups=groups, window_size=size)
            )
        except (RuntimeError, TimeoutError, OSError) as e:
            log.warning("parallel-coordinates view not captured: %s", e)
    for name, path in outputs.items():
        if path.suffix == ".png":
            ink = ink_fraction(path)
            (log.info if ink > 0.02 else log.warning)("%s: %s (%.0f%% non-background)", name, path, 100 * ink)
        else:
            log.info("%s: %s", name, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
