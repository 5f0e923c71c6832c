"""Local files as job inputs, and build contexts, without a server."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from jobwire.errors import InvalidDefinition
from jobwire.inputs import local_inputs, pack_context


def test_small_inline_large_by_key_folders_nested(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("hi")
    (tmp_path / "large.bin").write_bytes(b"x" * 201)
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "sub" / "c.txt").write_text("c")
    inputs = local_inputs([tmp_path / "small.txt", str(tmp_path / "large.bin"), tmp_path / "folder"], 200)
    assert sorted(inputs.refs) == ["folder/sub/c.txt", "large.bin", "small.txt"]
    assert (inputs.refs["small.txt"].type, inputs.refs["small.txt"].value.string_value) == ("base64", "aGk=")
    digest = hashlib.sha256(b"x" * 201).hexdigest()
    assert (inputs.refs["large.bin"].type, inputs.refs["large.bin"].hash) == ("key", digest)
    assert [(u.name, u.key, u.size) for u in inputs.uploads] == [("large.bin", digest, 201)]


def test_mapping_names_inputs_and_takes_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("1,2")
    inputs = local_inputs({"data/a.csv": tmp_path / "a.csv", "raw.bin": b"\0" * 300}, 200)
    assert sorted(inputs.refs) == ["data/a.csv", "raw.bin"]
    assert inputs.uploads[0].source == b"\0" * 300
    assert list(local_inputs(str(tmp_path / "a.csv"), 200).refs) == ["a.csv"]  # one path, not its letters


def test_duplicate_and_missing_inputs_are_invalid(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("1")
    (tmp_path / "x.txt").write_text("2")
    with pytest.raises(InvalidDefinition, match=r"two inputs are named 'x\.txt'"):
        local_inputs([tmp_path / "x.txt", tmp_path / "a" / "x.txt"], 200)
    with pytest.raises(InvalidDefinition, match=r"cannot read input 'nope\.txt'"):
        local_inputs([tmp_path / "nope.txt"], 200)


def test_build_context_is_reproducible(tmp_path: Path) -> None:
    context = tmp_path / "context"
    (context / "src").mkdir(parents=True)
    (context / "Dockerfile").write_text("FROM scratch\n")
    (context / "src" / "run.sh").write_text("#!/bin/sh\n")
    (context / "src" / "run.sh").chmod(0o755)
    first = pack_context(context)
    os.utime(context / "Dockerfile", (1, 1))
    assert pack_context(context) == first  # times are not part of the archive
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(first))) as archive:
        members = {m.name: m for m in archive.getmembers()}
    assert sorted(members) == ["Dockerfile", "src", "src/run.sh"]
    assert members["src/run.sh"].mode == 0o755 and members["Dockerfile"].mode == 0o644
    with pytest.raises(InvalidDefinition, match="not a folder"):
        pack_context(tmp_path / "missing")
