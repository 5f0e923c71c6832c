"""BlobStore contract: every backend stores whole, verified blobs and reads them back from any offset."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from jobwire.server.blobs import BlobStore
from jobwire.server.blobs.base import CHUNK_SIZE, put_headers
from jobwire.server.blobs.filesystem import FileBlobStore
from jobwire.server.blobs.s3 import S3BlobStore
from jobwire.server.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from tests.services import S3Server

MIB = 1024 * 1024
DATA = bytes(range(256)) * (CHUNK_SIZE // 256 * 2 + 3)
"""A little over two read chunks, so reads cross chunk boundaries."""


@asynccontextmanager
async def filesystem(tmp_path: Path) -> AsyncIterator[BlobStore]:
    yield FileBlobStore(tmp_path / "blobs")


@asynccontextmanager
async def s3(tmp_path: Path, server: S3Server) -> AsyncIterator[BlobStore]:
    store = await S3BlobStore.open(f"s3://{uuid.uuid4().hex}/some/prefix", endpoint=server.endpoint)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["filesystem", "s3"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "filesystem":
        opened = filesystem(tmp_path)
    else:
        opened = s3(tmp_path, request.getfixturevalue("s3_server"))
    async with opened as store:
        yield store


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put(blobs: BlobStore, key: str, data: bytes, *, pieces: int = 3) -> str:
    """Write `data` under `key` in a few writes and commit; the digest commit returned."""
    writer = await blobs.writer(key)
    step = max(1, -(-len(data) // pieces))
    for start in range(0, len(data), step):
        await writer.write(data[start : start + step])
    return await writer.commit()


async def read_all(blobs: BlobStore, key: str, offset: int = 0) -> bytes:
    return b"".join([chunk async for chunk in blobs.read(key, offset)])


async def test_committed_blob_reads_back_whole(blobs: BlobStore) -> None:
    assert await put(blobs, "report.bin", DATA) == sha256(DATA)
    assert await blobs.size("report.bin") == len(DATA)
    assert await read_all(blobs, "report.bin") == DATA


async def test_writer_counts_bytes_written(blobs: BlobStore) -> None:
    writer = await blobs.writer("counted")
    await writer.write(b"abc")
    await writer.write(b"defgh")
    assert writer.size == 8
    await writer.commit()


async def test_blob_under_its_sha256_is_accepted(blobs: BlobStore) -> None:
    key = sha256(DATA)
    assert await put(blobs, key, DATA) == key
    assert await read_all(blobs, key) == DATA


async def test_empty_blob(blobs: BlobStore) -> None:
    key = sha256(b"")
    writer = await blobs.writer(key)
    assert await writer.commit() == key
    assert await blobs.size(key) == 0
    assert await read_all(blobs, key) == b""


@pytest.mark.parametrize(
    "offset",
    [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 17, len(DATA) - 1, len(DATA), len(DATA) + 5],
)
async def test_read_from_offset(blobs: BlobStore, offset: int) -> None:
    await put(blobs, "offsets", DATA)
    assert await read_all(blobs, "offsets", offset) == DATA[offset:]


async def test_blob_is_invisible_until_committed(blobs: BlobStore) -> None:
    writer = await blobs.writer("pending")
    await writer.write(b"half")
    assert await blobs.size("pending") is None
    with pytest.raises(NotFound):
        await read_all(blobs, "pending")
    await writer.commit()
    assert await read_all(blobs, "pending") == b"half"


async def test_missing_blob(blobs: BlobStore) -> None:
    assert await blobs.size("absent") is None
    with pytest.raises(NotFound, match="absent"):
        await read_all(blobs, "absent")


async def test_checksum_mismatch_is_rejected_and_stores_nothing(blobs: BlobStore) -> None:
    key = sha256(b"what the client promised")
    writer = await blobs.writer(key)
    await writer.write(b"what it sent")
    with pytest.raises(InvalidArgument, match="checksum mismatch") as caught:
        await writer.commit()
    assert sha256(b"what it sent") in str(caught.value)
    assert await blobs.size(key) is None
    with pytest.raises(NotFound):
        await read_all(blobs, key)


async def test_rejected_upload_can_be_retried_with_the_right_bytes(blobs: BlobStore) -> None:
    key = sha256(b"right")
    writer = await blobs.writer(key)
    await writer.write(b"wrong")
    with pytest.raises(InvalidArgument):
        await writer.commit()
    assert await put(blobs, key, b"right") == key
    assert await read_all(blobs, key) == b"right"


async def test_abort_stores_nothing(blobs: BlobStore) -> None:
    writer = await blobs.writer("dropped")
    await writer.write(b"partial bytes")
    await writer.abort()
    assert await blobs.size("dropped") is None
    with pytest.raises(NotFound):
        await read_all(blobs, "dropped")


async def test_abort_keeps_the_committed_blob(blobs: BlobStore) -> None:
    await put(blobs, "kept", b"original")
    writer = await blobs.writer("kept")
    await writer.write(b"replacement that never lands")
    await writer.abort()
    assert await read_all(blobs, "kept") == b"original"


async def test_concurrent_uploads_of_one_key_never_mix(blobs: BlobStore) -> None:
    first, second = await blobs.writer("shared"), await blobs.writer("shared")
    for index in range(4):
        await first.write(b"A" * (index + 1) * 1000)
        await second.write(b"B" * (index + 1) * 1000)
    await first.commit()
    with pytest.raises(AlreadyExists):  # not a SHA-256 key: written once, the first commit wins
        await second.commit()
    assert await read_all(blobs, "shared") == b"A" * 10_000


# Absolute keys are tested below, inside tmp_path: a regression must not write files elsewhere.
BAD_KEYS = ["", "../escape", "a/b", ".partial", ".hidden", "..", "x" * 129, "sp ace", "nul\0"]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_are_rejected(blobs: BlobStore, key: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid blob key"):
        await blobs.writer(key)
    with pytest.raises(InvalidArgument, match="invalid blob key"):
        await read_all(blobs, key)
    with pytest.raises(InvalidArgument, match="invalid blob key"):
        await blobs.size(key)


# The filesystem backend's own promises: where files go and what is left behind.


def files_under(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


async def test_filesystem_leaves_no_partial_file_after_mismatch_or_abort(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    writer = await blobs.writer(sha256(b"promised"))
    await writer.write(b"sent")
    with pytest.raises(InvalidArgument):
        await writer.commit()
    writer = await blobs.writer("aborted")
    await writer.write(b"bytes")
    await writer.abort()
    await put(blobs, "kept", b"bytes")
    assert files_under(tmp_path) == ["blobs/kept"]


async def test_filesystem_traversal_cannot_reach_outside_the_root(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"database")
    blobs = FileBlobStore(tmp_path / "blobs")
    with pytest.raises(InvalidArgument):
        await read_all(blobs, "../secret")
    with pytest.raises(InvalidArgument):
        await read_all(blobs, str(tmp_path / "secret"))
    with pytest.raises(InvalidArgument):
        await blobs.size(str(tmp_path / "secret"))
    for key in ("../planted", str(tmp_path / "planted")):
        with pytest.raises(InvalidArgument):
            await blobs.writer(key)
    assert files_under(tmp_path) == ["secret"]


# Resumable uploads: a suspended upload keeps its bytes for a resume at an offset.


async def test_suspended_upload_resumes_at_an_offset(blobs: BlobStore) -> None:
    key = sha256(DATA)
    writer = await blobs.writer(key)
    await writer.write(DATA[:CHUNK_SIZE])
    assert (await blobs.pending(key))[1] is True  # running
    await writer.suspend()
    assert await blobs.pending(key) == (CHUNK_SIZE, False)
    assert await blobs.size(key) is None
    resumed = await blobs.writer(key, CHUNK_SIZE - 10)  # stored bytes past the offset are dropped
    assert resumed.size == CHUNK_SIZE - 10
    await resumed.write(DATA[CHUNK_SIZE - 10 :])
    assert await resumed.commit() == key
    assert await read_all(blobs, key) == DATA
    assert await blobs.pending(key) == (0, False)


async def test_resume_past_the_stored_bytes_or_without_any_is_a_conflict(blobs: BlobStore) -> None:
    with pytest.raises(Conflict, match="start at offset 0"):
        await blobs.writer("never", 5)
    writer = await blobs.writer("short")
    await writer.write(b"abc")
    await writer.suspend()
    with pytest.raises(Conflict, match="resume at offset 3"):
        await blobs.writer("short", 4)
    assert await blobs.pending("short") == (3, False)  # a refused resume leaves the bytes
    claimed = await blobs.writer("short", 3)
    with pytest.raises(Conflict):  # one resume at a time
        await blobs.writer("short", 3)
    await claimed.write(b"def")
    await claimed.commit()
    assert await read_all(blobs, "short") == b"abcdef"


async def test_read_a_range(blobs: BlobStore) -> None:
    await put(blobs, "ranged", DATA)
    chunks = [chunk async for chunk in blobs.read("ranged", CHUNK_SIZE - 5, CHUNK_SIZE + 10)]
    assert b"".join(chunks) == DATA[CHUNK_SIZE - 5 : 2 * CHUNK_SIZE + 5]


async def test_a_suspended_upload_is_resumed_only_by_its_owner(blobs: BlobStore) -> None:
    data = b"0123456789" * 1000
    writer = await blobs.writer(sha256(data), owner="alice")
    await writer.write(data[:4000])
    await writer.suspend()
    assert await blobs.pending(sha256(data), owner="mallory") == (0, False)
    assert await blobs.pending(sha256(data)) == (0, False)
    with pytest.raises(Conflict, match="no interrupted upload"):
        await blobs.writer(sha256(data), 4000, owner="mallory")
    assert await blobs.pending(sha256(data), owner="alice") == (4000, False)
    resumed = await blobs.writer(sha256(data), 4000, owner="alice")
    await resumed.write(data[4000:])
    assert await resumed.commit() == sha256(data)
    assert await read_all(blobs, sha256(data)) == data


async def test_a_key_that_is_no_hash_is_written_once(blobs: BlobStore) -> None:
    assert await put(blobs, "notes.txt", b"first words") == sha256(b"first words")
    with pytest.raises(AlreadyExists, match=r"'notes\.txt' exists with other bytes"):
        await put(blobs, "notes.txt", b"other words")
    assert await put(blobs, "notes.txt", b"first words") == sha256(b"first words")  # the same bytes: fine
    assert await read_all(blobs, "notes.txt") == b"first words"
    assert await blobs.pending("notes.txt") == (0, False)  # the refused upload left nothing behind


async def test_s3_write_once_holds_for_an_upload_assembled_from_parts(s3_server: S3Server) -> None:
    store = await S3BlobStore.open(f"s3://{uuid.uuid4().hex}", endpoint=s3_server.endpoint, segment_size=5 * MIB)
    try:
        first, other = b"a" * (6 * MIB), b"b" * (6 * MIB)
        await put(store, "big.bin", first)
        with pytest.raises(AlreadyExists):
            await put(store, "big.bin", other)
        assert await put(store, "big.bin", first) == sha256(first)
        assert await read_all(store, "big.bin") == first
        listing = await store.client.list_objects_v2(Bucket=store.bucket)
        assert [item["Key"] for item in listing.get("Contents", [])] == ["big.bin"]  # no partial objects
    finally:
        await store.close()


# The S3 backend's own promises: multipart assembly, presigned URLs, nothing left behind.


async def test_s3_large_upload_is_assembled_from_parts_and_resumes_mid_part(s3_server: S3Server) -> None:
    store = await S3BlobStore.open(f"s3://{uuid.uuid4().hex}", endpoint=s3_server.endpoint, segment_size=5 * MIB)
    try:
        data = bytes(range(256)) * (11 * MIB // 256)
        writer = await store.writer(sha256(data))
        for start in range(0, 7 * MIB, MIB):
            await writer.write(data[start : start + MIB])
        await writer.suspend()  # one full 5 MiB part and a 2 MiB tail are stored
        assert await store.pending(sha256(data)) == (7 * MIB, False)
        resumed = await store.writer(sha256(data), 6 * MIB + 123)  # inside the tail: the tail is cut
        await resumed.write(data[6 * MIB + 123 :])
        assert await resumed.commit() == sha256(data)
        assert await store.size(sha256(data)) == len(data)
        assert await read_all(store, sha256(data)) == data
        listing = await store.client.list_objects_v2(Bucket=store.bucket)
        assert [item["Key"] for item in listing.get("Contents", [])] == [sha256(data)]  # no partial objects
    finally:
        await store.close()


async def test_s3_presigned_urls_move_bytes_without_the_server(s3_server: S3Server) -> None:
    store = await S3BlobStore.open(f"s3://{uuid.uuid4().hex}/p", endpoint=s3_server.endpoint)
    try:
        data = b"straight to the bucket"
        key = sha256(data)
        async with httpx.AsyncClient() as client:
            put_url = await store.presigned_url(key, method="PUT")
            response = await client.put(put_url, content=data, headers=put_headers(key))
            assert response.status_code == 200, response.text
            assert await store.size(key) == len(data)
            get_url = await store.presigned_url(key, filename="attachment; filename=x.txt")
            response = await client.get(get_url)
            assert response.content == data
            assert response.headers["content-disposition"] == "attachment; filename=x.txt"
    finally:
        await store.close()


async def test_stale_lists_committed_blobs_written_before_and_delete_removes_them(blobs: BlobStore) -> None:
    await put(blobs, "old", b"bytes")
    writer = await blobs.writer("unfinished")
    await writer.write(b"partial")
    await writer.suspend()
    now = time.time()
    assert await blobs.stale(now - 3600) == []
    assert await blobs.stale(now + 3600) == ["old"]  # never a partial upload
    await blobs.delete("old")
    await blobs.delete("old")  # gone already: not an error
    assert await blobs.size("old") is None
    assert await blobs.stale(now + 3600) == []
    assert await blobs.pending("unfinished") == (7, False)
