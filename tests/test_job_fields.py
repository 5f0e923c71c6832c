"""Every field a job can ask for, on real dockerd: data refs, outputs, limits, bad input."""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import pytest
from google.protobuf import json_format

from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import BUSYBOX, StartWorker, wait_finished

pytestmark = pytest.mark.docker


async def run(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, fields: dict[str, object]) -> jobs_pb2.Job:
    definition = json_format.ParseDict(fields, definition_pb2.JobDefinition())
    submitted = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
    return await wait_finished(jobs, submitted.job_id)


def run_log(job: jobs_pb2.Job) -> str:
    return "".join(chunk.text for chunk in job.result.logs)


async def test_every_input_kind_and_nested_outputs(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue, egress_allow=("127.0.0.1",))  # the url input is Envoy's, on loopback
    uploaded = f"uploaded for {queue}\n".encode() * 100
    key = hashlib.sha256(uploaded).hexdigest()
    assert (await rest.put(f"/f/{key}", content=uploaded)).status_code == 200
    url = f"{rest.base_url}/f/{key}"
    script = (
        "cat /inputs/a/b/in.txt /inputs/raw.bin /inputs/data.json /inputs/note.txt > /dev/null"
        " && mkdir -p /outputs/x/y && cat /inputs/a/b/in.txt > /outputs/x/y/out.txt"
        " && cp /inputs/raw.bin /outputs/raw.bin && cp /inputs/data.json /outputs/data.json"
        " && cp /inputs/note.txt /outputs/note.txt"
    )
    job = await run(
        jobs,
        queue,
        {
            "image": BUSYBOX,
            "command": f"sh -c '{script}'",
            "inputs": {
                "a/b/in.txt": {"type": "url", "value": url},
                "raw.bin": {"type": "base64", "value": base64.b64encode(bytes(range(256))).decode()},
                "data.json": {"type": "json", "value": {"n": 1, "list": [1, "two"]}},
                "note.txt": {"type": "utf8", "value": "héllo ✓"},
            },
        },
    )
    assert job.result.exit_code == 0, (job.result.message, run_log(job))
    expected = {
        "x/y/out.txt": uploaded,
        "raw.bin": bytes(range(256)),
        "data.json": json.dumps({"n": 1, "list": [1, "two"]}).encode(),
        "note.txt": "héllo ✓".encode(),
    }
    assert set(job.result.outputs) == set(expected)
    for name, data in expected.items():
        served = await rest.get(f"/j/{job.id}/outputs/{name}")
        assert served.status_code == 200, name
        if name == "data.json":
            assert json.loads(served.content) == json.loads(data)
        else:
            assert served.content == data, name


async def test_memory_shm_and_pids_limits_are_the_containers_cgroup_limits(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    report = (
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max;"
        " cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max;"
        " df -k /dev/shm | tail -1"
    )
    job = await run(
        jobs,
        queue,
        {"image": BUSYBOX, "command": f"sh -c '{report}'", "requirements": {"memory": "64m"}, "shmSize": "2g"},
    )
    memory, pids, shm = run_log(job).splitlines()
    assert int(memory) == 64 * 1024 * 1024
    assert int(pids) == 4096
    assert int(shm.split()[1]) == 2 * 1024 * 1024  # 1K-blocks of /dev/shm


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ({"../escape.txt": {"type": "utf8", "value": "x"}}, "inputs: invalid file name '../escape.txt'"),
        ({"/etc/passwd": {"type": "utf8", "value": "x"}}, "inputs: invalid file name '/etc/passwd'"),
        ({"a.txt": {"type": "carrier-pigeon", "value": "x"}}, "carrier-pigeon"),
        ({"big.txt": {"type": "utf8", "value": "x" * (2 * 1024 * 1024)}}, "big.txt"),
    ],
)
async def test_bad_inputs_are_refused_naming_the_problem(
    rest: httpx.AsyncClient, queue: str, inputs: dict[str, object], problem: str
) -> None:
    response = await rest.post(f"/q/{queue}", json={"definition": {"image": BUSYBOX, "inputs": inputs}})
    assert response.status_code == 400, response.text
    assert problem in response.json()["message"]
    assert (await rest.get(f"/q/{queue}")).json().get("jobs", []) == []


async def test_status_and_metrics_show_workers_states_and_durations(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue, cpus=3, gpus=("0",))
    job = await run(jobs, queue, {"image": BUSYBOX, "command": f"echo {queue}"})
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS
    status = (await rest.get(f"/q/{queue}/status")).json()
    assert (status["queued"], status["running"], status["finished"]) == ("0", "0", "1")
    (worker,) = status["workers"]
    assert (worker["cpus"], worker["gpus"], worker["runningJobIds"]) == (3, ["0"], [])
    assert worker["version"]
    text = (await rest.get(f"/q/{queue}/metrics")).text
    assert f'jobwire_job_duration_seconds_count{{queue="{queue}"}} 1' in text
    assert f'jobwire_jobs{{queue="{queue}",state="finished"}} 1' in text
    assert f'jobwire_worker_gpus{{queue="{queue}"}} 1' in text
    assert "queue_length 0" in text
    assert 'jobwire_file_bytes_total{direction="uploaded"}' in text
