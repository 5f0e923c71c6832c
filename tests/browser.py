"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`).

No driver library: Chromium reads JSON commands, each ended by a NUL byte, from fd 3 and
writes replies and events to fd 4. Blocking; call it from a thread when an event loop
serves the pages it loads.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_binary() -> str | None:
    """Debian's chromium (installed by `make browser`), if present."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def headless(folder: Path) -> Iterator[Chromium]:
    """A Chromium with its profile and log in `folder`, closed after."""
    browser = Chromium(folder / "profile", folder / "chromium.log")
    try:
        yield browser
    finally:
        browser.close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    """Serve `directory` on a loopback port of its own (an origin of its own); yields the origin."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Chromium:
    """One headless Chromium process; `evaluate_page` loads a URL and awaits an expression."""

    def __init__(self, profile: Path, log: Path) -> None:
        binary = chromium_binary()
        assert binary, "chromium missing; `make browser` installs it (as `make test` does)"
        to_chrome, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome = os.pipe()
        # bash, not sh: dash cannot redirect file descriptors above 9.
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome}', binary, *FLAGS,
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                pass_fds=(to_chrome, from_chrome),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._next_id = 0

    def evaluate_page(self, url: str, expression: str, timeout: float) -> Any:
        """Open `url` in a new tab, wait for its load event, return the awaited value of `expression`."""
        deadline = time.monotonic() + timeout
        target = self.send("Target.createTarget", {"url": "about:blank"}, deadline=deadline)["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, deadline=deadline)
        session_id = session["sessionId"]
        self.send("Page.enable", session=session_id, deadline=deadline)
        self.send("Page.navigate", {"url": url}, session=session_id, deadline=deadline)
        self._wait_event("Page.loadEventFired", session_id, deadline)
        params = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        reply = self.send("Runtime.evaluate", params, session=session_id, deadline=deadline)
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: str = "", deadline: float
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, (method, reply["error"])
                result: dict[str, Any] = reply["result"]
                return result

    def _wait_event(self, method: str, session: str, deadline: float) -> None:
        while not ((message := self._read(deadline)).get("method") == method and message.get("sessionId") == session):
            pass

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "Chromium did not answer in time"
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                data = os.read(self._from_chrome, 1 << 16)
                assert data, f"Chromium exited ({self.process.poll()})"
                self._buffer += data
        message, _, self._buffer = self._buffer.partition(b"\0")
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def close(self) -> None:
        try:
            os.write(self._to_chrome, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)
