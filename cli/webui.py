"""The built browser client (web/dist) served over plain HTTP on loopback, behind Envoy's web routes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# In a source checkout (`pip install -e .`), cli/ sits next to web/.
DEFAULT_DIRECTORY = Path(__file__).resolve().parents[1] / "web" / "dist"
_NOT_BUILT = b"jobwire's web client is not built: run `make web` (or `make run`) in the repository.\n"


class _Handler(SimpleHTTPRequestHandler):
    """Files of the build; any other path is the app's page (it routes `/j/{id}` itself)."""

    def send_head(self) -> Any:
        root = Path(self.directory)
        if not (root / "index.html").is_file():
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, explain=_NOT_BUILT.decode())
            return None
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.path = "/index.html"
        return super().send_head()

    def end_headers(self) -> None:
        # Vite names assets by content hash: cache them for good, never the page itself.
        immutable = self.path.startswith("/assets/")
        self.send_header("Cache-Control", "public, max-age=31536000, immutable" if immutable else "no-cache")
        super().end_headers()

    def list_directory(self, path: Any) -> None:
        self.send_error(HTTPStatus.NOT_FOUND)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web: " + format, *args)


class WebServer:
    """A threaded static-file server bound at construction; `run()` serves until cancelled."""

    def __init__(self, directory: Path = DEFAULT_DIRECTORY, host: str = "127.0.0.1", port: int = 0) -> None:
        self.directory = directory
        handler = functools.partial(_Handler, directory=str(directory))
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.host, self.port = host, int(self._server.server_address[1])
        if not (directory / "index.html").is_file():
            log.warning("web client not built at %s: run `make web`", directory)

    async def run(self) -> None:
        """Serve in a thread until cancelled, then shut the server down."""
        thread = threading.Thread(target=self._server.serve_forever, name="jobwire-web", daemon=True)
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()
