"""The browser client (web/) against a real `jobwire up`: Debian Chromium driven by playwright-core.

Each test runs one scenario of `web/tests/e2e.mjs` in its own browser; screenshots of every main
state land in web/test-results/ (kept as test artifacts, not committed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jobwire.cli.services import free_port

pytestmark = [pytest.mark.docker, pytest.mark.envoy, pytest.mark.web]

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
SCREENSHOTS = WEB / "test-results"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def web_stack(tmp_path_factory: pytest.TempPathFactory, docker_images: None) -> Iterator[str]:
    """`jobwire up` on free ports (server, Envoy, a worker on queue `local`, the web UI); its URL."""
    if not (WEB / "dist" / "index.html").is_file():
        pytest.fail("web client not built: run `make web` (as `make test` does)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no browser at {CHROMIUM}: run `make browser` (as `make test` does)")
    data = tmp_path_factory.mktemp("web-stack")
    port = free_port()
    command = [str(Path(sys.executable).parent / "jobwire"), "up", "--port", str(port)]
    command += ["--grpc-port", str(free_port()), "--data-directory", str(data), "--cpus", "2"]
    with (data / "up.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, process, data / "up.log")
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the page is served and the local worker has registered."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"jobwire up exited with {process.returncode}:\n{log.read_text()}")
        try:
            page = httpx.get(f"{url}/", timeout=2)
            status = httpx.get(f"{url}/q/local/status", timeout=2)
            if page.status_code == 200 and status.status_code == 200 and status.json()["workers"]:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"jobwire up did not become ready:\n{log.read_text()}")


def scenario(url: str, name: str) -> None:
    done = subprocess.run(
        ["node", str(WEB / "tests" / "e2e.mjs"), name],
        env={**os.environ, "JOBWIRE_URL": url, "SCREENSHOTS": str(SCREENSHOTS), "CHROMIUM": CHROMIUM},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr


def test_run_from_url_shows_live_logs_then_outputs_preview_and_download(web_stack: str) -> None:
    scenario(web_stack, "run")


def test_dropped_file_is_seen_by_the_job_at_inputs(web_stack: str) -> None:
    scenario(web_stack, "drop")


def test_cancel_ends_a_long_job_as_cancelled_and_removes_its_container(web_stack: str) -> None:
    scenario(web_stack, "cancel")


def test_job_page_shows_the_finished_job_with_logs_after_a_reload(web_stack: str) -> None:
    scenario(web_stack, "reload")


def test_editor_queue_panel_and_phone_layout(web_stack: str) -> None:
    scenario(web_stack, "views")


def test_terminal_scrollback_stays_bounded_on_a_long_log(web_stack: str) -> None:
    scenario(web_stack, "longlog")


def test_metaframe_inputs_become_job_inputs_and_outputs_come_back(web_stack: str) -> None:
    scenario(web_stack, "metaframe")


def test_failed_job_and_non_zero_exit_are_told_apart(web_stack: str) -> None:
    scenario(web_stack, "failures")


def test_build_mode_builds_an_inline_dockerfile_and_runs_it(web_stack: str) -> None:
    scenario(web_stack, "build")


def test_keyboard_only_reaches_every_control_and_axe_finds_nothing_serious(web_stack: str) -> None:
    scenario(web_stack, "keyboard")


def test_queue_typed_late_enables_run_and_an_edited_job_page_keeps_its_queue(web_stack: str) -> None:
    scenario(web_stack, "urlstate")


def test_double_click_on_run_submits_once_and_cancels_nothing(web_stack: str) -> None:
    scenario(web_stack, "dblclick")


def test_a_shared_link_on_a_phone_shows_the_command_before_run(web_stack: str) -> None:
    scenario(web_stack, "phone")
