"""Open a page in headless Chromium over the DevTools protocol (the `--remote-debugging-pipe` transport
that Playwright uses: JSON messages separated by NUL on fds 3 and 4), read what rendered, take a screenshot."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def find_chromium() -> str | None:
    return next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd, self.read_fd = write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 60, session: str | None = None, **params: object) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(index)
            self.events.append(self._read(deadline))

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no answer from chromium in time"
            ready, _, _ = select.select([self.read_fd], [], [], remaining)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


@contextmanager
def chromium_session(width: int = 1200, mobile: bool = False) -> Iterator[tuple[_Pipe, str]]:
    """A headless Chromium with one page target: (the DevTools pipe, the page's session id)."""
    chromium = find_chromium()
    assert chromium, "chromium is not installed"
    to_browser_read, to_browser_write = os.pipe()
    from_browser_read, from_browser_write = os.pipe()

    def as_fds_3_and_4() -> None:
        # Move both ends above 10 first (a pipe may already sit on fd 3 or 4), then onto 3 and 4, inheritable.
        high_read = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
        high_write = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
        os.dup2(high_read, 3)
        os.dup2(high_write, 4)

    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe"]
            + [f"--user-data-dir={profile}", "--no-first-run", "about:blank"],
            preexec_fn=as_fds_3_and_4,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        pipe = _Pipe(to_browser_write, from_browser_read)
        try:
            target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
            session = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page.enable", "Network.enable", "Runtime.enable"):
                pipe.call(domain, session=session)
            pipe.call("Emulation.setDeviceMetricsOverride", session=session, width=width, height=900,
                      deviceScaleFactor=1, mobile=mobile)  # fmt: skip
            yield pipe, session
            pipe.call("Browser.close")
        finally:
            try:
                process.wait(timeout=10)  # Browser.close was sent, unless the caller failed first
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
            os.close(to_browser_write)
            os.close(from_browser_read)


def evaluate(pipe: _Pipe, session: str, expression: str) -> object:
    return pipe.call("Runtime.evaluate", session=session, returnByValue=True, expression=expression)["result"].get(
        "value"
    )


def screenshot_to(pipe: _Pipe, session: str, path: Path) -> None:
    shot = pipe.call("Page.captureScreenshot", session=session, format="png", captureBeyondViewport=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def inspect_page(page: Path | str, screenshot: Path, width: int = 1200, timeout: float = 90) -> dict:
    """Load `page` (a file or a URL); return its images (complete, natural size, src scheme), every URL it
    requested, failed loads, and the document height; save a full-page PNG screenshot."""
    url = page if isinstance(page, str) else page.resolve().as_uri()
    with chromium_session(width) as (pipe, session):
        pipe.call("Page.navigate", session=session, url=url)
        pipe.wait_event("Page.loadEventFired", timeout)
        images = evaluate(pipe, session, "Array.from(document.images).map(i => ({complete: i.complete, width: "
                          "i.naturalWidth, height: i.naturalHeight, scheme: i.src.split(':')[0]}))")  # fmt: skip
        height = evaluate(pipe, session, "document.body.scrollHeight")
        screenshot_to(pipe, session, screenshot)
        requested = [
            e["params"]["request"]["url"][:40] for e in pipe.events if e.get("method") == "Network.requestWillBeSent"
        ]
        failed = [e["params"] for e in pipe.events if e.get("method") == "Network.loadingFailed"]
    return {"images": images, "requested": requested, "failed": failed, "height": height}


def type_and_click(url: str, field: str, text: str, button: str, until: str, screenshot: Path, width: int = 1200,
                   timeout: float = 120) -> dict:  # fmt: skip
    """Open `url`, type `text` into the element with id `field` (real key input), click the element with id
    `button` (a real mouse click at its centre), wait until the JS expression `until` is true; screenshot."""
    with chromium_session(width, mobile=width < 600) as (pipe, session):
        pipe.call("Page.navigate", session=session, url=url)
        pipe.wait_event("Page.loadEventFired", timeout)
        clear = f"(() => {{ const f = document.getElementById('{field}'); f.value = ''; f.focus(); }})()"
        evaluate(pipe, session, clear)
        pipe.call("Input.insertText", session=session, text=text)
        box = evaluate(pipe, session, f"(() => {{ const r = document.getElementById('{button}')"
                       ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")  # fmt: skip
        assert isinstance(box, list)
        for kind in ("mousePressed", "mouseReleased"):
            pipe.call("Input.dispatchMouseEvent", session=session, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)  # fmt: skip
        deadline = time.monotonic() + timeout
        while not evaluate(pipe, session, until):
            assert time.monotonic() < deadline, f"not true in {timeout} s: {until}"
            time.sleep(0.2)
        page = evaluate(pipe, session, "({images: Array.from(document.images).map(i => ({complete: i.complete, "
                        "width: i.naturalWidth, alt: i.alt})), status: document.getElementById('status') ? "
                        "document.getElementById('status').textContent : '', scrollWidth: "
                        "document.documentElement.scrollWidth})")  # fmt: skip
        screenshot_to(pipe, session, screenshot)
        requested = [
            e["params"]["request"]["url"][:60] for e in pipe.events if e.get("method") == "Network.requestWillBeSent"
        ]
    assert isinstance(page, dict)
    return page | {"requested": requested}
