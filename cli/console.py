"""Talking to people and to the server from the CLI: one-line errors, gRPC channels."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

import grpc


class CliError(Exception):
    """A failure to report in one line (exit code 1)."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` to stderr and exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@asynccontextmanager
async def channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the server; RPC failures become one-line CliErrors."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(target, options=options) as opened:
        try:
            yield opened
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise CliError(f"cannot reach the jobwire server at {target} ({error.details()})") from None
            raise CliError(error.details() or error.code().name) from None
