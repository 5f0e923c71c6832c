"""The S3 BlobStore (aiobotocore): blobs in a bucket shared by every replica, presigned URLs for clients.

A blob is the object `<prefix><key>`. An upload streamed through the server is written as
segments of `segment_size` bytes, each an object of its own under `<prefix>.partial/<key>/`
(keys never start with a dot, so these never collide with blobs); the commit assembles
them server-side (a multipart upload of `UploadPartCopy`s: the bytes are not sent again),
or copies the only one. A suspended upload records its segments in
`.partial/<key>/resume-<owner>.json` (each owner has its own), which a resume claims (reading
the stored bytes back once to continue the SHA-256). A key that is not a SHA-256 is written
once: its commit is conditional (If-None-Match: *). Clients that can reach the bucket get presigned URLs instead, so
bytes never pass through the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from jobwire.core.definition import DefinitionError, check_key, is_sha256
from jobwire.server.blobs.base import CHUNK_SIZE, URL_SECONDS, put_headers
from jobwire.server.errors import AlreadyExists, Conflict, InvalidArgument, NotFound

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
else:
    S3Client = Any

CONNECT_SECONDS, READ_SECONDS, ATTEMPTS = 5.0, 10.0, 2
"""A bucket that does not answer fails a call (UNAVAILABLE, "the file store is unavailable") after at
most ATTEMPTS tries of CONNECT_SECONDS to connect and READ_SECONDS without a byte, not botocore's
default of 60 s and 5 tries each."""
SEGMENT_SIZE = 8 * 1024 * 1024
"""Bytes per stored segment (S3 parts other than the last must be at least 5 MiB)."""
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; the prefix ends with `/` unless empty."""
    if not url.startswith("s3://"):
        raise ValueError(f"blob store URL {url!r} must look like s3://bucket/prefix")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"blob store URL {url!r} names no bucket")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _exists(error: ClientError) -> bool:
    """The error of a conditional write (If-None-Match: *) of a key that exists."""
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412")


def _missing(error: ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code", "")) in _MISSING


@dataclass
class _Resumable:
    """A suspended upload: its segments (object names and sizes) in order."""

    segments: list[tuple[str, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(size for _, size in self.segments)


class S3BlobStore:
    """BlobStore on one bucket (and prefix) of an S3-compatible service."""

    def __init__(
        self, client: S3Client, signer: S3Client, bucket: str, prefix: str, stack: AsyncExitStack, segment_size: int
    ) -> None:
        self.client, self.bucket, self.prefix, self.segment_size = client, bucket, prefix, segment_size
        self._signer = signer  # presigns for the public endpoint (presigning makes no request)
        self._stack = stack
        self._running: Counter[str] = Counter()
        self._claims: dict[str, asyncio.Lock] = {}

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        endpoint: str = "",
        public_endpoint: str = "",
        region: str = "",
        segment_size: int = SEGMENT_SIZE,
        read_seconds: float = READ_SECONDS,
    ) -> S3BlobStore:
        """Connect to the bucket of `s3://bucket/prefix` (credentials from the usual AWS sources),
        creating the bucket if it does not exist; presigned URLs name `public_endpoint` (default
        `endpoint`)."""
        bucket, prefix = parse_url(url)
        session = get_session()
        stack = AsyncExitStack()
        region = region or session.get_config_variable("region") or "us-east-1"

        async def connect(at: str) -> S3Client:
            config = AioConfig(
                signature_version="s3v4",
                s3={"addressing_style": "path" if at else "auto"},
                connect_timeout=min(CONNECT_SECONDS, read_seconds),
                read_timeout=read_seconds,
                retries={"max_attempts": ATTEMPTS, "mode": "standard"},
            )
            return await stack.enter_async_context(
                session.create_client("s3", endpoint_url=at or None, region_name=region, config=config)
            )

        client = await connect(endpoint)
        signer = await connect(public_endpoint) if public_endpoint and public_endpoint != endpoint else client
        try:
            await client.head_bucket(Bucket=bucket)
        except ClientError as error:
            if not _missing(error):
                await stack.aclose()
                raise
            await client.create_bucket(Bucket=bucket)
        return cls(client, signer, bucket, prefix, stack, segment_size)

    async def close(self) -> None:
        await self._stack.aclose()

    def _name(self, key: str) -> str:
        try:
            check_key(key)
        except DefinitionError as error:
            raise InvalidArgument(str(error)) from None
        return self.prefix + key

    def _partial(self, key: str) -> str:
        return f"{self.prefix}.partial/{key}/"

    async def writer(self, key: str, offset: int = 0, *, owner: str = "") -> S3BlobWriter:
        self._name(key)
        writer = S3BlobWriter(self, key, owner)
        if offset > 0:
            lock = self._claims.setdefault(key, asyncio.Lock())
            async with lock:  # two resumes in this process cannot both claim the upload
                resumable = await self._resumable(key, owner)
                if resumable is None:
                    raise Conflict(f"no interrupted upload of {key!r} is stored; start at offset 0")
                if offset > resumable.size:
                    raise Conflict(
                        f"only {resumable.size} bytes of {key!r} are stored; resume at offset {resumable.size}"
                    )
                await self.client.delete_object(Bucket=self.bucket, Key=self._record(key, owner))
            await writer.resume(resumable, offset)
        self._running[key] += 1
        return writer

    def ended(self, key: str) -> None:
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]

    def _record(self, key: str, owner: str) -> str:
        """The object naming the segments of `owner`'s suspended upload of `key`."""
        return self._partial(key) + (f"resume-{owner}.json" if owner else "resume.json")

    async def _resumable(self, key: str, owner: str) -> _Resumable | None:
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=self._record(key, owner))
            async with response["Body"] as body:
                record = json.loads(await body.read())
        except ClientError as error:
            if _missing(error):
                return None
            raise
        return _Resumable([(str(name), int(size)) for name, size in record["segments"]])

    async def save_resumable(self, key: str, owner: str, resumable: _Resumable) -> None:
        """Make `resumable` the key's suspended upload (the latest one wins; the one it replaces is dropped)."""
        previous = await self._resumable(key, owner)
        body = json.dumps({"segments": resumable.segments}).encode()
        await self.client.put_object(Bucket=self.bucket, Key=self._record(key, owner), Body=body)
        if previous is not None:
            mine = {name for name, _ in resumable.segments}
            await self.delete_objects([name for name, _ in previous.segments if name not in mine])

    async def delete_objects(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):
            batch = [{"Key": name} for name in names[start : start + 1000]]
            await self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})  # type: ignore[typeddict-item]

    async def pending(self, key: str, *, owner: str = "") -> tuple[int, bool]:
        self._name(key)
        resumable = await self._resumable(key, owner)
        return (resumable.size if resumable else 0), key in self._running

    async def read(self, key: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        name = self._name(key)
        async for chunk in self.read_object(name, offset, length, key):
            yield chunk

    async def read_object(self, name: str, offset: int, length: int, key: str) -> AsyncIterator[bytes]:
        """The bytes of object `name` from `offset` (at most `length`; 0: to the end)."""
        extra = {"Range": f"bytes={offset}-{offset + length - 1 if length else ''}"} if offset or length else {}
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=name, **extra)  # type: ignore[arg-type]
        except ClientError as error:
            if _missing(error):
                raise NotFound(f"file {key!r} not found") from None
            if error.response.get("Error", {}).get("Code") == "InvalidRange":
                return  # a range starting at the end: nothing to send
            raise
        async with response["Body"] as body:
            async for chunk in body.iter_chunks(CHUNK_SIZE):
                yield chunk

    async def size(self, key: str) -> int | None:
        name = self._name(key)
        try:
            head = await self.client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as error:
            if _missing(error):
                return None
            raise
        return int(head["ContentLength"])

    async def stale(self, before: float) -> list[str]:
        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix) :]
                if "/" not in key and not key.startswith(".") and item["LastModified"].timestamp() < before:
                    names.append(key)
        return names

    async def delete(self, key: str) -> None:
        await self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    async def presigned_url(self, key: str, *, method: str = "GET", filename: str = "", content_type: str = "") -> str:
        """A URL that reads (GET) or writes (PUT) the blob without credentials, for URL_SECONDS.

        A PUT of a SHA-256 key is signed with the S3 checksum of that hash: the bucket itself
        refuses bytes that do not match (the client must send the header `put_headers` names)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._name(key)}
        if method == "GET":
            if filename:
                params["ResponseContentDisposition"] = filename
            if content_type:
                params["ResponseContentType"] = content_type
            return await self._signer.generate_presigned_url("get_object", Params=params, ExpiresIn=URL_SECONDS)
        if method != "PUT":
            raise InvalidArgument(f"no presigned URL for method {method!r} (GET or PUT)")
        if is_sha256(key):
            params["ChecksumSHA256"] = put_headers(key)["x-amz-checksum-sha256"]
        return await self._signer.generate_presigned_url("put_object", Params=params, ExpiresIn=URL_SECONDS)


class S3BlobWriter:
    """An upload in segments under the key's partial prefix, hashed as it is written."""

    def __init__(self, store: S3BlobStore, key: str, owner: str) -> None:
        self.store, self.key, self.owner, self.size = store, key, owner, 0
        self._upload = uuid.uuid4().hex
        self._segments: list[tuple[str, int]] = []
        self._buffer = bytearray()
        self._hash = hashlib.sha256()

    async def resume(self, resumable: _Resumable, offset: int) -> None:
        """Continue `resumable` at `offset`: full segments before it are kept, the rest re-read or dropped."""
        start, dropped = 0, []
        for name, size in resumable.segments:
            if start >= offset:
                dropped.append(name)
                continue
            wanted = min(size, offset - start)
            data = b"".join([c async for c in self.store.read_object(name, 0, wanted, self.key)])
            self._hash.update(data)
            if wanted == size == self.store.segment_size:
                self._segments.append((name, size))
            else:  # a short or cut segment continues in the buffer, so parts stay full-sized
                self._buffer += data
                dropped.append(name)
            start += size
        self.size = offset
        await self.store.delete_objects(dropped)

    async def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        self._buffer += data
        while len(self._buffer) >= self.store.segment_size:
            await self._flush(self.store.segment_size)

    async def _flush(self, length: int) -> None:
        name = f"{self.store._partial(self.key)}{self._upload}-{len(self._segments):06d}"
        data = bytes(self._buffer[:length])
        await self.store.client.put_object(Bucket=self.store.bucket, Key=name, Body=data)
        self._segments.append((name, len(data)))
        del self._buffer[:length]

    async def commit(self) -> str:
        digest = self._hash.hexdigest()
        if is_sha256(self.key) and digest != self.key:
            await self.abort()
            raise InvalidArgument(
                f"checksum mismatch: the bytes hash to {digest}, not to the key {self.key}; nothing was stored"
            )
        try:
            try:
                await self._assemble(once=not is_sha256(self.key))
            except ClientError as error:
                if not _exists(error) or await self._digest_of_blob() != digest:
                    raise
            await self.store.delete_objects([name for name, _ in self._segments])
        except BaseException as error:
            if isinstance(error, ClientError) and _exists(error):
                await self.store.delete_objects([name for name, _ in self._segments])
                raise AlreadyExists(
                    f"file {self.key!r} exists with other bytes; a key that is not a SHA-256 of its bytes is"
                    " written once: upload under another key (or under the bytes' SHA-256)"
                ) from None
            raise
        finally:
            self.store.ended(self.key)
        return digest

    async def _digest_of_blob(self) -> str:
        """SHA-256 hex of the stored blob's bytes."""
        digest = hashlib.sha256()
        async for chunk in self.store.read(self.key):
            digest.update(chunk)
        return digest.hexdigest()

    async def _assemble(self, *, once: bool) -> None:
        """Store the segments and buffer as the blob; `once`: only if no blob is there (a conditional
        write, If-None-Match: *, which the bucket answers 412 when one is)."""
        client, bucket, final = self.store.client, self.store.bucket, self.store.prefix + self.key
        condition: dict[str, Any] = {"IfNoneMatch": "*"} if once else {}
        if not self._segments:
            await client.put_object(Bucket=bucket, Key=final, Body=bytes(self._buffer), **condition)
            return
        if self._buffer:
            await self._flush(len(self._buffer))
        if len(self._segments) == 1 and not once:  # a copy cannot be conditional: once goes multipart
            source = {"Bucket": bucket, "Key": self._segments[0][0]}
            await client.copy_object(Bucket=bucket, Key=final, CopySource=source)  # type: ignore[arg-type]
            return
        upload = await client.create_multipart_upload(Bucket=bucket, Key=final)
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, (name, _) in enumerate(self._segments, start=1):
                copied = await client.upload_part_copy(
                    Bucket=bucket,
                    Key=final,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": bucket, "Key": name},
                )
                parts.append({"ETag": copied["CopyPartResult"]["ETag"], "PartNumber": number})
            await client.complete_multipart_upload(
                Bucket=bucket,
                Key=final,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                **condition,
            )
        except BaseException:
            await client.abort_multipart_upload(Bucket=bucket, Key=final, UploadId=upload_id)
            raise

    async def suspend(self) -> None:
        try:
            if self._buffer:
                await self._flush(len(self._buffer))
            await self.store.save_resumable(self.key, self.owner, _Resumable(list(self._segments)))
        finally:
            self.store.ended(self.key)

    async def abort(self) -> None:
        try:
            await self.store.delete_objects([name for name, _ in self._segments])
        finally:
            self.store.ended(self.key)
