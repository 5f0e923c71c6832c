"""`jobwire file …`: blobs on the server by key (by default the SHA-256 of their bytes)."""

from __future__ import annotations

from json import dumps
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter

from jobwire.cli.console import EXIT_CODES, CliError, Connection, Json, connect
from jobwire.cli.terminal import Transfers
from jobwire.errors import NotFound

file = App(name="file", help="Upload, download and look up blobs by key.")


@file.command
async def put(path: Path, *, key: str = "", connection: Connection = Connection()) -> None:
    """Upload a file and print its key; skipped when the server already has it.

    Parameters
    ----------
    path
        The file to upload.
    key
        The key to store it under (default: the SHA-256 of its bytes, which the server verifies).
    """
    if not path.is_file():
        raise CliError(f"{path} is not a file", 2)
    async with connect(connection) as client:
        with Transfers("uploaded") as transfers:
            print(await client.files.upload(path, key, progress=transfers))


@file.command
async def get(
    key: str,
    *,
    output: Annotated[Path | None, Parameter(name=["--output", "-o"])] = None,
    connection: Connection = Connection(),
) -> None:
    """Download a blob to a file (default: ./KEY).

    Parameters
    ----------
    output
        Where to write it.
    """
    target = output or Path(key)
    async with connect(connection) as client:
        with Transfers("downloaded") as transfers:
            await client.files.download(key, target, progress=transfers)
    print(target)


@file.command
async def exists(key: str, *, json: Json = False, connection: Connection = Connection()) -> int:
    """Tell whether the server has a blob: exit 0 and its size if so, exit 4 if not."""
    async with connect(connection) as client:
        size = await client.files.size(key)
    if json:
        print(dumps({"exists": size is not None, "size": str(size or 0)}))
    else:
        print(f"{key}: {size} bytes" if size is not None else f"{key}: not found")
    return 0 if size is not None else EXIT_CODES[NotFound]
