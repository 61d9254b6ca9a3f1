"""The page at GET / in a real headless Chromium (Debian's `chromium`), driven over the
DevTools protocol on a pipe (--remote-debugging-pipe: fds 3 and 4, NUL-separated JSON), so no
driver binary, no debugging port and no extra Python package: load the page, pick a class by
name, a guidance scale and a seed, click Generate, and check that previews and a full progress
bar came over the stream and the base and upsampled images appear at their sizes. The
screenshot is kept: under $ADM_TEST_ARTIFACTS when set, else in pytest's tmp dir; its path is
printed."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_serve import export_tiny_models, start_serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The machine's network is closed: without these Chromium floods its log with failed fetches.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=900,600", "--remote-debugging-pipe"]
ARGS = {"max_images": "2", "default_steps": "5", "upsampler_steps": "3",
        "upsampler_sampler": "ddim", "batch_rows": "2", "batch_wait_s": "0.01"}
OPTIONS = {name: {"ray_actor_options": {"num_cpus": 0.1}}
           for name in ("GuidedSampler", "Upsampler", "Ingress")}


class Chromium:
    """A headless Chromium and one DevTools session on a page."""

    def __init__(self, profile: Path, log: Path):
        self._in_r, self._in_w = os.pipe()  # we write commands; Chromium reads them on fd 3
        self._out_r, self._out_w = os.pipe()  # Chromium writes on fd 4; we read
        self.log = log
        with open(log, "wb") as err:
            # bash (dash takes no fd above 9) moves the pipe ends to fds 3 and 4, then execs.
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{self._in_r} 4>&{self._out_w}', CHROMIUM,
                 *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                pass_fds=(self._in_r, self._out_w), stdin=subprocess.DEVNULL,
                stdout=err, stderr=err)
        os.close(self._in_r)
        os.close(self._out_w)
        self._buf, self._id, self.events, self.session = b"", 0, [], None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self.log.read_text()[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, timeout_s: float = 30) -> dict:
        """One command (in the page's session once attached); its result."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._in_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target,
                                                           "flatten": True})["sessionId"]
        self.send("Runtime.enable")

    def js(self, expression: str):
        out = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60):
        deadline = time.monotonic() + timeout_s
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.2)
        return value

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        x, y = self.js(f"(() => {{ const r = document.querySelector({selector!r})"
                       f".getBoundingClientRect(); return [r.x + r.width / 2, "
                       f"r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                   "button": "left", "clickCount": 1})

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout_s=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._in_w)
        os.close(self._out_r)


@pytest.fixture(scope="module")
def page_url(ray_session, tmp_path_factory):
    from ray import serve

    nets = export_tiny_models(tmp_path_factory.mktemp("page") / "models")
    try:
        yield start_serve(nets, ARGS, OPTIONS, "page", "/")
    finally:
        serve.shutdown()


def _artifact_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("ADM_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_page_generates_in_headless_chromium(page_url, tmp_path):
    assert Path(CHROMIUM).is_file(), (
        "Debian's `chromium` is not installed: `apt-get install chromium` (.ci/run does it)")
    browser = Chromium(tmp_path / "profile", tmp_path / "chromium.log")
    try:
        browser.open(page_url + "/")
        # (no <body> yet while the page is still loading: not ready, not an error)
        browser.wait_for("document.body?.dataset.state === 'ready'")
        options = browser.js("[...document.querySelectorAll('#cls option')].map(o => o.text)")
        assert options[:3] == ["tench", "goldfish", "great white shark"]
        browser.js("document.getElementById('cls').value = 'stingray'")
        browser.js("document.getElementById('scale').value = '2'")
        browser.js("document.getElementById('seed').value = '7'")
        browser.js("document.getElementById('glo').value = '0.5'")
        browser.js("document.getElementById('ghi').value = '50'")
        browser.click("#go")
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && "
                                 "document.body.dataset.state")
        status = browser.js("document.getElementById('status').textContent")
        assert state == "done", status
        # The step engine streamed it: previews of the base and the upsampler came before
        # the result (base 5 steps, a preview every 2: steps 2 and 4; upsampler 3 steps: 2),
        # and the progress bar ended full.
        assert browser.js("document.body.dataset.previews") == "3"
        assert browser.js("document.getElementById('bar').value") == 1
        sizes = browser.js("['base', 'up'].map(id => [document.getElementById(id).naturalWidth,"
                           " document.getElementById(id).naturalHeight])")
        assert sizes == [[8, 8], [16, 16]]  # base side by side with the upsampled image
        assert "seed 7" in status and "guidance 2 for sigma in (0.5, 50]" in status
        shot = browser.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = _artifact_dir(tmp_path) / "serve_page.png"
        path.write_bytes(base64.b64decode(shot))
        print(f"\npage screenshot: {path}")
        # Quality "fast" goes out with the request; this server does not list the preset's
        # sampler, so the page shows the 422 that names the setting, and stays usable.
        browser.js("document.getElementById('quality').value = 'fast'")
        browser.click("#go")
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && "
                                 "document.body.dataset.state")
        status = browser.js("document.getElementById('status').textContent")
        assert state == "error" and status.startswith("422: quality: the fast preset samples "
                                                      "with unipc"), status
        assert browser.js("document.getElementById('go').disabled") is False
        errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
        assert not errors, errors
    finally:
        browser.close()
