"""Image builds (`definition.build`): fetch and unpack the context, write the Dockerfile, build, cache.

A built image is tagged by the SHA-256 of its build's canonical JSON and of its context archive's
bytes, so an identical build is done once per worker and no other build is ever served its image.
Each step runs in the job network within the job's memory and CPUs, and its time counts against the
job's time limit (worker/execution.py). Contexts are archives (tar, tar.gz or zip) named by a URL, or by `/f/KEY` (or a
bare SHA-256 key) for an archive uploaded to the server's blob store, or by a Git repository URL
(`worker/repositories.py`: that ref's archive from the Git host); an archive whose root holds
exactly one folder is unpacked from inside that folder, as GitHub archives are. Credentials in a
context URL are used for its download only: never in a log line, an error or the image's tag.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import httpx
from google.protobuf import json_format, struct_pb2

from jobwire.core.definition import canonical_json, without_credentials
from jobwire.files import sha256_file
from jobwire.v1 import definition_pb2
from jobwire.worker import repositories
from jobwire.worker.errors import BuildError
from jobwire.worker.runtime import BuildSpec, ContainerRuntime
from jobwire.worker.staging import Staging

TAG_PREFIX = "jobwire-build/"
_BLOB_CONTEXT = re.compile(r"^(?:/f/)?([0-9a-f]{64})$")


def build_tag(build: definition_pb2.ImageBuild, context_digest: str = "") -> str:
    """The image name of a build: the hash of everything that shapes the image, its definition and
    the SHA-256 of its context archive's bytes (a blob context's key is that; a URL's is measured)."""
    if not context_digest and (match := _BLOB_CONTEXT.match(build.context)):
        context_digest = match[1]
    shown = json_format.MessageToDict(build, preserving_proto_field_name=False)
    if "context" in shown:
        shown["context"] = without_credentials(shown["context"])  # a token does not change the image
    canonical = canonical_json(shown)
    keyed = hashlib.sha256(f"{canonical}\n{context_digest}".encode()).hexdigest()
    return f"{TAG_PREFIX}{keyed[:32]}:latest"


class Builder:
    """Builds images on the worker's container runtime, in a scratch folder per build, each step
    within the job's memory, CPUs and pids."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        staging: Staging,
        directory: Path,
        limits: tuple[int, int, int, str],
        git_archive_base: str = repositories.GITHUB,
    ) -> None:
        """`limits`: the job's memory, CPUs (in billionths), pids and network, which each build step
        gets; `git_archive_base`: where repository contexts' archives are fetched from."""
        self.runtime, self.staging, self.directory = runtime, staging, directory
        self.limits, self.git_archive_base = limits, git_archive_base

    async def ensure_built(self, build: definition_pb2.ImageBuild, log: Callable[[str], object]) -> str:
        """The tag of the built image, building it unless an identical build is cached."""
        self.directory.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=self.directory))
        try:
            archive = await self._archive(build, folder, log)
            digest = await asyncio.to_thread(sha256_file, archive) if archive and not _blob(build) else ""
            tag = build_tag(build, digest)
            if await self.runtime.has_image(tag):
                log(f"using the cached image of this build ({tag})\n")
                return tag
            await self.runtime.build(await self._spec(build, folder, archive, tag), log)
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        return tag

    async def _spec(self, build: definition_pb2.ImageBuild, folder: Path, archive: Path | None, tag: str) -> BuildSpec:
        root = await self._context(build, folder, archive)
        filename = build.filename or "Dockerfile"
        dockerfile = _inside(root, filename, "filename")
        if build.HasField("dockerfile"):
            dockerfile.parent.mkdir(parents=True, exist_ok=True)
            dockerfile.write_text(build.dockerfile)
        if not dockerfile.is_file():
            raise BuildError(f"no {filename} in the build context and no `dockerfile` given")
        arguments = dict(argument.partition("=")[::2] for argument in build.build_args)
        relative = dockerfile.relative_to(root).as_posix()
        target, platform = build.target or None, build.platform or None
        return BuildSpec(root, relative, tag, arguments, target, platform, *self.limits)

    async def _archive(
        self, build: definition_pb2.ImageBuild, folder: Path, log: Callable[[str], object]
    ) -> Path | None:
        """The context archive, downloaded (or linked from the blob cache) into `folder`; None without one."""
        if not build.HasField("context"):
            return None
        archive = folder / "context.archive"
        log(f"downloading the build context {without_credentials(build.context)}\n")
        if match := _blob(build):
            ref = definition_pb2.DataRef(type="key", value=struct_pb2.Value(string_value=match[1]))
        elif repository := repositories.repository(build.context, self.git_archive_base):
            await self._download(repository.archives(self.git_archive_base), repository.auth, archive, log)
            return archive
        elif (url := without_credentials(build.context)) != build.context:
            await self._download([url], repositories.credentials_only(build.context)[1], archive, log)
            return archive
        else:
            ref = definition_pb2.DataRef(type="url", value=struct_pb2.Value(string_value=build.context))
        await self.staging.write(ref, archive, "build context")
        return archive

    async def _download(
        self, urls: list[str], auth: httpx.BasicAuth | None, archive: Path, log: Callable[[str], object]
    ) -> None:
        """A context URL with credentials: fetched here, where they are sent but never shown."""
        policy, most = self.staging.policy, self.staging.max_download
        found = await repositories.download(urls, auth, archive, policy=policy, max_bytes=most, log=log)
        log(f"fetched {found}\n")

    async def _context(self, build: definition_pb2.ImageBuild, folder: Path, archive: Path | None) -> Path:
        unpacked = folder / "context"
        unpacked.mkdir()
        if archive is not None:
            await asyncio.to_thread(_unpack, archive, unpacked)
            unpacked = _hoisted(unpacked)
        return _inside(unpacked, build.build_context or ".", "buildContext")


def _blob(build: definition_pb2.ImageBuild) -> re.Match[str] | None:
    return _BLOB_CONTEXT.match(build.context) if build.HasField("context") else None


def _inside(root: Path, relative: str, field: str) -> Path:
    """`root / relative`, refusing paths that leave `root`."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or "\0" in relative:
        raise BuildError(f"build.{field} must be a relative path inside the context, not {relative!r}")
    return root / path


def _unpack(archive: Path, destination: Path) -> None:
    with archive.open("rb") as handle:
        magic = handle.read(4)
    try:
        if magic == b"PK\x03\x04":
            with zipfile.ZipFile(archive) as packed:
                for member in packed.namelist():
                    _inside(destination, member, "context (zip member)")
                packed.extractall(destination)
        else:
            with tarfile.open(archive) as packed:  # tar, tar.gz, tar.bz2, tar.xz
                packed.extractall(destination, filter="data")  # refuses links and paths leaving it
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as error:
        raise BuildError(f"the build context is not a readable tar or zip archive: {error}") from None


def _hoisted(folder: Path) -> Path:
    entries = list(folder.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder
