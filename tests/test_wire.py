"""The hand-made wire format of file chunks reads and writes what protobuf does."""

from __future__ import annotations

import pytest
from google.api import httpbody_pb2
from google.protobuf import any_pb2

from jobwire.core import wire
from jobwire.v1 import files_pb2

SIZES = [0, 1, 127, 128, 16_383, 16_384, 1024 * 1024, 1024 * 1024 + 7]


@pytest.mark.parametrize("size", SIZES)
def test_upload_requests_parse_as_protobuf(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    first = files_pb2.UploadFileRequest(key="a" * 64, offset=5, size=1 << 40)
    for head, expected in [(first.SerializeToString(), first), (b"", files_pb2.UploadFileRequest())]:
        parsed = files_pb2.UploadFileRequest.FromString(wire.upload_request(head, data))
        assert parsed.body.data == data
        parsed.ClearField("body")
        assert parsed == expected


@pytest.mark.parametrize("size", SIZES)
def test_body_data_reads_what_protobuf_writes(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    extension = any_pb2.Any(type_url="x/y", value=b"z")
    for body in [
        httpbody_pb2.HttpBody(data=data),
        httpbody_pb2.HttpBody(content_type="text/plain", data=data, extensions=[extension, extension]),
    ]:
        assert wire.body_data(body.SerializeToString()) == data


def test_body_data_refuses_what_is_no_message() -> None:
    serialized = httpbody_pb2.HttpBody(data=b"0123456789").SerializeToString()
    with pytest.raises(ValueError, match="truncated"):
        wire.body_data(serialized[:-1])
    with pytest.raises(ValueError, match="wire type"):
        wire.body_data(b"\x0f")
