"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (no Python dependency).

Chromium reads commands from its fd 3 and writes replies and events to its fd 4, each message JSON
ended by a NUL byte. Enough to open a local page in a fresh headless browser, watch its console,
evaluate JavaScript, dispatch real mouse clicks and take screenshots; nothing leaves the machine.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ENV_EXECUTABLE = "AUDITBENCH_CHROMIUM"
REPLY_TIMEOUT_S = 120.0
"""Guards against a hung browser (a test must fail, not hang); not a speed check: replies take ms."""


def find_chromium() -> str | None:
    """$AUDITBENCH_CHROMIUM, else the first Chromium or Chrome on PATH."""
    chosen = os.environ.get(ENV_EXECUTABLE)
    if chosen:
        return shutil.which(chosen)
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


class BrowserError(RuntimeError):
    """Chromium exited, did not answer, or answered a command with an error."""


class HeadlessChromium:
    """One headless Chromium with a private profile; ``with`` closes it."""

    def __init__(self, executable: str, profile: Path, width: int = 1400, height: int = 900) -> None:
        # Chromium wants the pipe on its fds 3 and 4. A tiny Python launcher moves our ends (on fds
        # >= 10, so neither is overwritten before it is copied) there and execs the browser; no
        # preexec_fn, which is unsafe in a process with threads.
        self.width, self.height = width, height
        to_browser, from_browser = _high_pipe(), _high_pipe()
        read_end, write_end = to_browser[0], from_browser[1]
        flags = [
            "--headless=new", "--remote-debugging-pipe", f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "about:blank",
        ]
        launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                    "os.close(int(sys.argv[1])); os.close(int(sys.argv[2])); os.execv(sys.argv[3], sys.argv[3:])")
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(read_end), str(write_end), executable, *flags],
            pass_fds=(read_end, write_end), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        os.close(read_end)
        os.close(write_end)
        self._out, self._in = to_browser[1], from_browser[0]
        self._replies: dict[int, queue.Queue] = {}
        self._events: queue.Queue = queue.Queue()
        self._next_id = 0
        self._lock = threading.Lock()
        self._gone = False
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.process.stderr), daemon=True).start()

    # ----- protocol -------------------------------------------------------------------------------

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its reply; raise BrowserError on an error reply."""
        if self._gone:
            raise BrowserError(f"Chromium exited (code {self.process.poll()}); stderr: {self.stderr()}")
        with self._lock:
            self._next_id += 1
            message_id = self._next_id
            self._replies[message_id] = queue.Queue()
        message = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        reply = self._wait(self._replies[message_id], f"reply to {method}")
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Wait for event ``method``; return its params and every other event that came before it."""
        seen = []
        while True:
            event = self._wait(self._events, f"event {method}")
            if event["method"] == method and (session is None or event.get("sessionId") == session):
                return event.get("params", {}), seen
            seen.append(event)

    def drain_events(self) -> list[dict[str, Any]]:
        events = []
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events

    # ----- a page ---------------------------------------------------------------------------------

    def open_page(self) -> str:
        """A new tab with Page, Runtime and Log domains enabled; return its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False}, session)
        return session

    def navigate(self, session: str, url: str) -> list[dict[str, Any]]:
        """Load ``url`` and wait for its load event (images decoded); return the events meanwhile."""
        self.send("Page.navigate", {"url": url}, session)
        _, events = self.wait_event("Page.loadEventFired", session)
        return events

    def evaluate(self, session: str, expression: str) -> Any:
        """The JSON value of a JavaScript expression evaluated in the page."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                 "awaitPromise": True}, session)
        if "exceptionDetails" in result:
            raise BrowserError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, session: str, x: float, y: float) -> None:
        """A real left click (press and release) at viewport coordinates."""
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "clickCount": 1}, session)

    def screenshot(self, session: str, path: Path, full_page: bool = True) -> None:
        """A PNG of the viewport, or of the whole page."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", params, session)["data"]))

    # ----- plumbing -------------------------------------------------------------------------------

    def _wait(self, source: queue.Queue, what: str) -> dict[str, Any]:
        try:
            message = source.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            raise BrowserError(f"no {what} from Chromium within {REPLY_TIMEOUT_S:.0f} s; "
                               f"stderr: {self.stderr()}") from None
        if message is None:
            raise BrowserError(f"Chromium exited (code {self.process.poll()}) before the {what}; "
                               f"stderr: {self.stderr()}")
        return message

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._in, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:  # the browser is gone: wake every waiter
                self._gone = True
                for waiter in [*self._replies.values(), self._events]:
                    waiter.put(None)
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message and message["id"] in self._replies:
                    self._replies[message["id"]].put(message)
                else:
                    self._events.put(message)

    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")[-2000:]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("Browser.close")
            except BrowserError:
                pass
            try:
                self.process.wait(timeout=REPLY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for fd in (self._out, self._in):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _high_pipe() -> tuple[int, int]:
    """A pipe (read, write) on descriptors >= 10, close-on-exec; the low originals are closed."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends[0], ends[1]
