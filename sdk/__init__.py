"""jobwire: public compute queues over gRPC. The typed SDK.

    from jobwire import Client

    async with Client("localhost:8080") as client:
        job = await client.submit("local", image="python:3.12", command="python -V")
        result = await job.wait()

`SyncClient` is the same without `await`; errors are those of `jobwire.errors`.
"""

from jobwire.client import Client, SubmitOptions, new_queue_name
from jobwire.connection import Retry, Target
from jobwire.core.memory import keep_freed_buffers
from jobwire.errors import (
    FileNotFound,
    InvalidDefinition,
    InvalidRequest,
    JobFailed,
    JobNotFound,
    JobwireError,
    NotFound,
    RequestFailed,
    ServerUnavailable,
    Timeout,
    TooLarge,
)
from jobwire.files import FileClient, Progress, Transfer
from jobwire.job import Job
from jobwire.sync import SyncClient, SyncJob

__version__ = "0.1.0"
__all__ = [
    "Client",
    "FileClient",
    "FileNotFound",
    "InvalidDefinition",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "JobNotFound",
    "JobwireError",
    "NotFound",
    "Progress",
    "RequestFailed",
    "Retry",
    "ServerUnavailable",
    "SubmitOptions",
    "SyncClient",
    "SyncJob",
    "Target",
    "Timeout",
    "TooLarge",
    "Transfer",
    "keep_freed_buffers",
    "new_queue_name",
]
