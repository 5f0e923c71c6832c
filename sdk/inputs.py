"""Local files as job inputs: small ones inline, larger ones as blobs by SHA-256; build contexts packed.

Everything here is decided before anything is uploaded, so a definition is
checked (and its job id known) first, and a blob the server already holds is
never sent twice.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from google.protobuf import struct_pb2

from jobwire.errors import InvalidDefinition
from jobwire.files import sha256_file
from jobwire.v1 import definition_pb2

Source: TypeAlias = "str | os.PathLike[str] | bytes"
Files: TypeAlias = "Sequence[str | os.PathLike[str]] | Mapping[str, Source]"
"""Paths (each named by its base name; a folder adds every file under it as `folder/…`),
or a mapping from input name to a path or to bytes."""


@dataclass(frozen=True)
class Upload:
    """A blob an input needs on the server before the job is submitted."""

    name: str
    source: Path | bytes
    key: str
    size: int


@dataclass(frozen=True)
class Inputs:
    """Data refs by input name, and the blobs they refer to."""

    refs: dict[str, definition_pb2.DataRef]
    uploads: list[Upload]


def local_inputs(files: Files, inline_limit: int) -> Inputs:
    """Data refs for local files: inline base64 up to `inline_limit` bytes, else a `key` ref."""
    refs: dict[str, definition_pb2.DataRef] = {}
    uploads: list[Upload] = []
    for name, source in _named(files):
        if name in refs:
            raise InvalidDefinition(f"two inputs are named {name!r}; name them with a mapping")
        try:
            size = len(source) if isinstance(source, bytes) else source.stat().st_size
            if size <= inline_limit:
                data = source if isinstance(source, bytes) else source.read_bytes()
                refs[name] = data_ref("base64", base64.b64encode(data).decode())
                continue
            key = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else sha256_file(source)
        except OSError as error:
            raise InvalidDefinition(f"cannot read input {name!r} ({error.filename}): {error.strerror}") from None
        refs[name] = data_ref("key", key, digest=key)
        uploads.append(Upload(name, source, key, size))
    return Inputs(refs, uploads)


def data_ref(kind: str, value: str, *, digest: str | None = None) -> definition_pb2.DataRef:
    """A data ref with a string value."""
    return definition_pb2.DataRef(type=kind, value=struct_pb2.Value(string_value=value), hash=digest)


def pack_context(directory: Path) -> bytes:
    """`directory` as a reproducible tar.gz (sorted, no times or owners): same files, same bytes, same job id."""
    if not directory.is_dir():
        raise InvalidDefinition(f"build context {str(directory)!r} is not a folder")
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for path in sorted(directory.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            info = archive.gettarinfo(str(path), arcname=path.relative_to(directory).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644
            if path.is_file():
                with path.open("rb") as handle:
                    archive.addfile(info, handle)
            else:
                archive.addfile(info)
    return buffer.getvalue()


def _named(files: Files) -> Iterator[tuple[str, Path | bytes]]:
    if isinstance(files, str | os.PathLike):
        files = [files]
    items = files.items() if isinstance(files, Mapping) else ((None, f) for f in files)
    for name, source in items:
        if isinstance(source, bytes):
            yield str(name), source
            continue
        path = Path(source)
        base = name if name is not None else path.name
        if path.is_dir():
            for inner in sorted(p for p in path.rglob("*") if p.is_file()):
                yield f"{base}/{inner.relative_to(path).as_posix()}", inner
        else:
            yield base, path
