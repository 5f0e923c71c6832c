"""The GPU allocator, without GPUs: devices are names, nothing pretends to run on them."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from jobwire.worker.gpus import GpuPool
from tests.conftest import BUSYBOX, StartWorker, wait_finished


def test_jobs_get_distinct_free_devices_lowest_first() -> None:
    pool = GpuPool(["1", "3", "5"])
    assert pool.take(2) == ["1", "3"]
    assert pool.take(1) == ["5"]
    with pytest.raises(ValueError, match="needs 1 GPU"):
        pool.take(1)
    pool.give_back(["3"])
    assert pool.take(1) == ["3"]


def test_a_resumed_job_keeps_its_devices() -> None:
    pool = GpuPool(["0", "1"])
    assert pool.take_these(["1", "7"]) == ["1"]
    assert pool.take(1) == ["0"]
    assert pool.free == []


def test_zero_gpus_takes_nothing() -> None:
    pool = GpuPool([])
    assert pool.take(0) == []


async def test_a_gpu_job_on_a_machine_without_the_nvidia_runtime_says_so(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    """The worker offers devices 0 and 1 (`--gpus 2`) but dockerd here has no GPU driver: the job must
    fail with the engine's reason, not pretend to run."""
    await start_worker(queue, gpus=("0", "1"))
    definition = json_format.ParseDict(
        {"image": BUSYBOX, "command": f"echo {queue}", "requirements": {"gpus": 1}}, definition_pb2.JobDefinition()
    )
    submitted = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
    job = await wait_finished(jobs, submitted.job_id)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_ERROR
    assert "the Docker engine" in job.result.message and "nvidia" in job.result.message
