"""Serving the built web client: the static server and the Envoy routes in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import httpx
import pytest

from jobwire.cli.services import descriptor_path, free_port, start_local_envoy, stop_envoy
from jobwire.cli.webui import WebServer
from jobwire.envoy import config as envoy_config
from jobwire.server.app import build_server
from jobwire.server.settings import ServerSettings


def _site(root: Path) -> Path:
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>jobwire</title>")
    (root / "assets" / "app-1234.js").write_text("console.log(1)")
    return root


async def test_static_server_serves_files_and_the_page_for_app_paths(tmp_path: Path) -> None:
    web = WebServer(_site(tmp_path / "dist"))
    task = asyncio.create_task(web.run())
    try:
        async with httpx.AsyncClient(base_url=f"http://{web.host}:{web.port}") as client:
            page = await client.get("/")
            asset = await client.get("/assets/app-1234.js")
            app_path = await client.get("/j/" + "a" * 64)
            listing = await client.get("/assets/")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert (page.status_code, page.headers["cache-control"]) == (200, "no-cache")
    assert "jobwire" in page.text
    assert asset.status_code == 200 and "immutable" in asset.headers["cache-control"]
    assert "javascript" in asset.headers["content-type"]
    assert app_path.status_code == 200 and "jobwire" in app_path.text
    assert listing.status_code == 200 and "jobwire" in listing.text  # no directory listing


async def test_static_server_says_how_to_build_when_not_built(tmp_path: Path) -> None:
    web = WebServer(tmp_path / "missing")
    task = asyncio.create_task(web.run())
    try:
        async with httpx.AsyncClient(base_url=f"http://{web.host}:{web.port}") as client:
            response = await client.get("/")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert response.status_code == 503 and "make web" in response.text


def test_config_with_web_routes_validates(tmp_path: Path) -> None:
    cfg = envoy_config.render(listen_port=free_port(), descriptor_path=descriptor_path(), web=("127.0.0.1", 1))
    path = envoy_config.write(cfg, tmp_path / "envoy.yaml")
    done = subprocess.run(
        [envoy_config.envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.envoy
async def test_envoy_routes_pages_to_the_web_server_and_keeps_rest(tmp_path: Path) -> None:
    # Its own server: the session stack may be busy with (or wounded by) other tests.
    server = await build_server(ServerSettings(data_directory=tmp_path / "server", host="127.0.0.1", port=0))
    started = asyncio.Event()
    web = WebServer(_site(tmp_path / "dist"))
    tasks = [asyncio.create_task(server.run(started)), asyncio.create_task(web.run())]
    job = "b" * 64
    try:
        await started.wait()
        upstreams = [("127.0.0.1", server.port)]
        envoy, port = await start_local_envoy(upstreams, tmp_path / "envoy.yaml", web=(web.host, web.port))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                page = await client.get("/")
                asset = await client.get("/assets/app-1234.js")
                html = await client.get(f"/j/{job}", headers={"accept": "text/html,application/xhtml+xml"})
                rest = await client.get(f"/j/{job}")
                health = await client.get("/healthz")
        finally:
            await stop_envoy(envoy)
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert page.status_code == 200 and "jobwire" in page.text
    assert asset.status_code == 200
    assert html.status_code == 200 and "<title>jobwire" in html.text
    assert rest.status_code == 404 and rest.json()["message"].startswith(f"job {job}")
    assert (health.status_code, health.text) == (200, "OK")
