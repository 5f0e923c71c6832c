"""Git repository URLs as build contexts (which URLs are repositories, the archives tried), and
credentials in URLs kept out of errors."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import cast

import pytest
from google.protobuf import struct_pb2

from jobwire.core.egress import Policy
from jobwire.files import FileClient
from jobwire.v1 import definition_pb2
from jobwire.worker import staging
from jobwire.worker.errors import BuildError, StagingError
from jobwire.worker.repositories import GITHUB, repository


def archives(url: str, base: str = GITHUB) -> list[str]:
    found = repository(url, base)
    assert found is not None, url
    return found.archives(base)


def test_a_ref_is_tried_as_a_branch_then_as_a_tag_or_commit() -> None:
    assert archives("https://github.com/o/r/tree/v1.2.3") == [
        "https://github.com/o/r/archive/refs/heads/v1.2.3.zip",
        "https://github.com/o/r/archive/v1.2.3.zip",
    ]
    assert archives("https://github.com/o/r.git/commit/0123abc", "https://git.lab.example/")[1] == (
        "https://git.lab.example/o/r/archive/0123abc.zip"
    )
    assert archives("https://github.com/o/r/tree/feature/x")[0].endswith("/refs/heads/feature/x.zip")


def test_without_a_ref_main_then_master() -> None:
    assert archives("https://github.com/o/r.git") == [
        "https://github.com/o/r/archive/refs/heads/main.zip",
        "https://github.com/o/r/archive/main.zip",
        "https://github.com/o/r/archive/refs/heads/master.zip",
    ]


def test_credentials_are_authentication_not_part_of_a_url() -> None:
    found = repository("https://x-access-token:ghp_abc@github.com/o/r/tree/v1")
    assert found is not None and found.auth is not None
    assert all("ghp_abc" not in url for url in found.archives(GITHUB))


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/o/r/archive/v1.zip",  # an archive: fetched as it is
        "https://files.example/o/r",  # another host than GitHub's or the base's
        "https://github.com/o",  # no repository
        "https://github.com/o/r/blob/main/README.md",
    ],
)
def test_other_urls_are_not_repositories(url: str) -> None:
    assert repository(url) is None


def test_the_bases_own_host_is_a_git_host() -> None:
    assert archives("https://git.lab.example/o/r/tree/dev", "https://git.lab.example")[0] == (
        "https://git.lab.example/o/r/archive/refs/heads/dev.zip"
    )


@pytest.mark.parametrize("ref", ["${REF}", "a..b/../c", "with space"])
def test_an_unusable_ref_is_a_build_error(ref: str) -> None:
    with pytest.raises(BuildError, match="names no usable Git ref"):
        repository(f"https://tok@github.com/o/r/tree/{ref}")


async def test_a_url_inputs_credentials_are_in_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `url` input with `user:token@` that fails to download: the job's error names the URL without them."""
    monkeypatch.setattr(staging, "DOWNLOAD_TRIES", 1)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: the connection is refused
    port = closed.getsockname()[1]
    url = f"http://user:tok3n@127.0.0.1:{port}/data.csv"
    ref = definition_pb2.DataRef(type="url", value=struct_pb2.Value(string_value=url))
    stage = staging.Staging(cast(FileClient, None), tmp_path / "cache", policy=Policy(("127.0.0.1",)))
    with pytest.raises(StagingError) as failed:
        await stage.write(ref, tmp_path / "data.csv", "data.csv")
    closed.close()
    assert f"http://127.0.0.1:{port}/data.csv" in str(failed.value) and "tok3n" not in str(failed.value)
