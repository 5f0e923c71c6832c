"""A job's files on the worker: inputs written before the run, outputs collected after it."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import shutil
import stat
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from google.protobuf import struct_pb2

from jobwire.connection import Retry
from jobwire.core import egress
from jobwire.core.definition import (
    MAX_RESULT_OUTPUTS,
    DefinitionError,
    check_relative_path,
    inline_bytes,
    is_sha256,
    without_credentials,
)
from jobwire.core.units import format_duration
from jobwire.errors import JobwireError
from jobwire.files import FileClient, sha256_file
from jobwire.v1 import definition_pb2
from jobwire.worker.errors import StagingError

log = logging.getLogger(__name__)
DOWNLOAD_TRIES = 5
READ_TIMEOUT = 60.0
UPLOAD_RETRY = Retry(attempts=sys.maxsize, initial_backoff=1.0, max_backoff=30.0)
"""Pauses before an output upload is tried again (with jitter, each doubling, at most 30 s), bounded
by time (`upload_patience`), not by count."""
_OWN_BLOB = re.compile(r"/f/([0-9a-f]{64})")
INLINE_BUDGET = 1024 * 1024
"""Most bytes of inline (base64) contents in a result; further small files are uploaded as blobs,
which take a fixed `KEY_REF` each, so that many small outputs still fit `MAX_RESULT_OUTPUTS`."""
RESULT_OVERHEAD = 24
"""Bytes an output takes in the result beyond its name and value (map entry, field tags and lengths,
the DataRef's type), rounded up (22 measured for a 200-byte file inlined), so that the worker's
count is never below the server's check of the same bound."""
KEY_REF = 128
"""Bytes of an uploaded output's value in the result: its SHA-256 as key and as hash."""


@dataclass(frozen=True)
class OutputLimits:
    """What a job's outputs may be: the worker's own limits, lowered by the server's."""

    inline: int
    """Largest file returned inline in the result; larger ones are uploaded."""
    count: int
    """Most output files."""
    size: int
    """Most bytes in all output files together."""

    def check(self, count: int, size: int) -> None:
        """Raises `StagingError` naming the first limit that `count` files of `size` bytes in total pass."""
        if count > self.count:
            raise StagingError(f"too many outputs: more than {self.count} files (the limit, max-outputs)")
        if size > self.size:
            raise StagingError(f"outputs too big: more than {_human(self.size)} in total (the limit, max-output-size)")


class Staging:
    """Writes data refs to disk (with a blob cache shared by jobs) and collects outputs."""

    def __init__(
        self,
        files: FileClient,
        cache_dir: Path,
        *,
        policy: egress.Policy | None = None,
        max_download: int = 10 * 1024**3,
        download_time: float = 3600.0,
        public_url: Callable[[], Awaitable[str]] | None = None,
        upload_patience: float = 3600.0,
    ) -> None:
        """`url` refs are fetched under `policy` (none: the default policy), at most `max_download`
        bytes in `download_time` seconds; one that names `public_url` (the server's, once it said it)
        `/f/KEY` is the blob KEY, fetched over `files`. An output upload that fails for a reason that
        may pass is retried for up to `upload_patience` seconds (see `_store`)."""
        self.files, self.cache_dir, self.upload_patience = files, cache_dir, upload_patience
        self.policy = policy or egress.Policy()
        self.max_download, self.download_time, self.public_url = max_download, download_time, public_url
        cache_dir.mkdir(parents=True, exist_ok=True)

    async def write_inputs(
        self, definition: definition_pb2.JobDefinition, inputs_dir: Path, config_dir: Path
    ) -> list[tuple[str, str, bool]]:
        """Write inputs and config files; returns extra (host, container, read_only) binds."""
        binds: list[tuple[str, str, bool]] = []
        refs = list(definition.inputs.items())
        for index, (name, ref) in enumerate(definition.config_files.items()):
            if name.startswith("/"):
                host = config_dir / str(index)
                await self.write(ref, host, name)
                binds.append((str(host), name, True))
            else:
                refs.append((name, ref))
        for name, ref in refs:
            try:
                check_relative_path(name, what="inputs")
            except DefinitionError as error:
                raise StagingError(str(error)) from None
            await self.write(ref, inputs_dir / name, name)
        return binds

    async def write(self, ref: definition_pb2.DataRef, destination: Path, name: str) -> None:
        """Write one data ref to `destination`."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        kind = ref.type or "utf8"
        try:
            if kind == "key":
                await self._cached(ref.value.string_value, destination, self.files.download)
            elif kind == "url" and (key := await self._own_blob(ref.value.string_value)):
                await self._cached(key, destination, self.files.download)
            elif kind == "url":
                url = ref.value.string_value
                await self._cached(ref.hash or "", destination, lambda _, path: self._fetch(url, path))
            else:
                destination.write_bytes(inline_bytes(ref))
        except StagingError:
            raise
        except egress.EgressRefused as error:
            raise StagingError(f"input {name!r}: {error}") from None
        except Exception as error:  # a message naming a URL names it without its credentials
            raise StagingError(f"input {name!r}: {type(error).__name__}: {without_credentials(str(error))}") from None

    async def _cached(self, key: str, destination: Path, fetch: Callable[[str, Path], Awaitable[None]]) -> None:
        """Hard-link from the cache when `key` is a SHA-256 we hold; fetch (and cache) otherwise."""
        if not is_sha256(key):
            await fetch(key, destination)
            return
        cached = self.cache_dir / key
        if not cached.exists():
            await fetch(key, destination)
            digest = await asyncio.to_thread(sha256_file, destination)
            if digest != key:
                raise StagingError(f"downloaded bytes hash to {digest}, expected {key}")
            _link(destination, cached)
            return
        _link(cached, destination)

    async def collect_outputs(self, outputs_dir: Path, limits: OutputLimits) -> dict[str, definition_pb2.DataRef]:
        """Every regular file under `outputs_dir`: inline when small, else uploaded by SHA-256.
        Raises `StagingError` naming the limit when they are too many or too big (nothing uploaded)."""
        if _empty(outputs_dir):  # most jobs leave none: no thread round trip to say so
            return {}
        found = await asyncio.to_thread(_found, outputs_dir, limits)
        outputs: dict[str, definition_pb2.DataRef] = {}
        for path, content in found:
            name = path.relative_to(outputs_dir).as_posix()
            if content is not None:
                data = base64.b64encode(content).decode()
                outputs[name] = definition_pb2.DataRef(type="base64", value=_string(data))
                continue
            digest = await asyncio.to_thread(sha256_file, path)
            await self._store(path, digest, name)  # skipped when the server has the blob
            outputs[name] = definition_pb2.DataRef(type="key", value=_string(digest), hash=digest)
        return outputs

    async def _store(self, path: Path, digest: str, name: str) -> None:
        """Upload an output, retrying with backoff (and jitter) while the failure may pass: the server
        unreachable, restarting or out of disk space, a slow or failing bucket. The container has
        finished: its outputs are worth waiting for, up to `upload_patience`. A refusal that cannot
        pass (the file is past the server's size limit, the request is invalid) is the job's error."""
        loop = asyncio.get_running_loop()
        give_up, delays = loop.time() + self.upload_patience, UPLOAD_RETRY.delays()
        while True:
            try:
                await self.files.upload(path, digest)
                return
            except (JobwireError, httpx.HTTPError) as error:
                if not _passing(error):
                    raise StagingError(f"output {name} could not be stored: the server refused it: {error}") from None
                pause = next(delays)
                if loop.time() + pause > give_up:
                    raise StagingError(
                        f"output {name} could not be stored within {format_duration(self.upload_patience)}"
                        f" (upload-patience): {error}"
                    ) from None
                log.warning("upload of output %s failed (%s); retrying in %.1f s", name, error, pause)
                await asyncio.sleep(pause)

    async def _own_blob(self, url: str) -> str:
        """KEY when `url` is this server's own `/f/KEY` (what the seed's upload helper writes), else ''."""
        if self.public_url is None:
            return ""
        try:
            named, public = httpx.URL(url), httpx.URL(await self.public_url())
        except httpx.InvalidURL:
            return ""
        same_origin = (named.scheme, named.host, _port(named)) == (public.scheme, public.host, _port(public))
        prefix = public.path.rstrip("/")
        match = _OWN_BLOB.fullmatch(named.path.removeprefix(prefix)) if named.path.startswith(prefix) else None
        return match[1] if same_origin and match and not named.query else ""

    async def _fetch(self, url: str, destination: Path) -> None:
        """GET `url` under the egress policy (each redirect checked again), bounded in size and time."""
        error: Exception | None = None
        try:
            async with asyncio.timeout(self.download_time):
                for _ in range(DOWNLOAD_TRIES):
                    try:
                        await self._get(url, destination)
                        return
                    except httpx.HTTPError as failure:
                        error = failure
                        await asyncio.sleep(1)
        except TimeoutError:
            shown = without_credentials(url)
            raise StagingError(f"download of {shown} took longer than {self.download_time:.0f} s") from None
        raise StagingError(without_credentials(f"download of {url} failed after {DOWNLOAD_TRIES} tries: {error}"))

    async def _get(self, url: str, destination: Path) -> None:
        async with (
            egress.client(self.policy, READ_TIMEOUT) as client,
            client.stream("GET", url, headers={"accept-encoding": "identity"}) as response,
        ):
            response.raise_for_status()
            too_big = StagingError(f"download of {without_credentials(url)} is larger than {self.max_download} bytes")
            if int(response.headers.get("content-length") or 0) > self.max_download:
                raise too_big
            written = 0
            with destination.open("wb") as handle:
                async for block in response.aiter_bytes():
                    written += len(block)
                    if written > self.max_download:
                        raise too_big
                    handle.write(block)


_PERMANENT = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE,
)


def _passing(error: JobwireError | httpx.HTTPError) -> bool:
    """Whether an upload's failure may pass by itself. RESOURCE_EXHAUSTED is both the server's size
    limit (`upload exceeds the limit of N bytes`: permanent) and its disk full (passes once space is
    freed); the bucket's errors (no status) and every other status are taken as passing."""
    if isinstance(error, httpx.HTTPError) or error.code is None:
        return True
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "exceeds the limit" not in str(error)
    return error.code not in _PERMANENT


def _port(url: httpx.URL) -> int | None:
    return url.port or {"http": 80, "https": 443}.get(url.scheme)


def _link(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _empty(folder: Path) -> bool:
    """True when `folder` holds nothing (or is missing): one directory read, cheap enough for the loop."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True


def _found(root: Path, limits: OutputLimits) -> list[tuple[Path, bytes | None]]:
    """The output files under `root`, each with its contents when it is inlined: small files, in
    name order, while `INLINE_BUDGET` lasts (the rest are uploaded). In a thread: a job may leave
    thousands."""
    found: list[tuple[Path, bytes | None]] = []
    inlined = result = 0
    for path, size in _regular_files(root, limits):
        inline = size <= limits.inline and inlined + _base64_size(size) <= INLINE_BUDGET
        inlined += _base64_size(size) if inline else 0
        result += len(path.relative_to(root).as_posix()) + RESULT_OVERHEAD + (_base64_size(size) if inline else KEY_REF)
        if result > MAX_RESULT_OUTPUTS:
            passed = _human(MAX_RESULT_OUTPUTS)
            raise StagingError(f"outputs too big for a result: their names and references pass {passed}")
        found.append((path, path.read_bytes() if inline else None))
    return found


def _regular_files(root: Path, limits: OutputLimits) -> list[tuple[Path, int]]:
    """The regular files under `root` with their sizes, sorted; stops at the first limit passed."""
    files: list[tuple[Path, int]] = []
    total = 0
    for folder, _, names in os.walk(root, followlinks=False):
        for name in names:
            path = Path(folder) / name
            status = path.lstat()
            if not stat.S_ISREG(status.st_mode):
                continue
            files.append((path, status.st_size))
            total += status.st_size
            limits.check(len(files), total)
    return sorted(files)


def _human(size: int) -> str:
    """`size` in the largest binary unit that keeps one decimal meaningful: `10 GiB`, `1.5 MiB`, `200 bytes`."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def _base64_size(size: int) -> int:
    return (size + 2) // 3 * 4


def _string(text: str) -> struct_pb2.Value:
    return struct_pb2.Value(string_value=text)
