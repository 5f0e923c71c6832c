"""Every REST route through the real Envoy: a walk over the descriptor's HTTP rules, and the error codes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from jobwire.cli.services import descriptor_path
from jobwire.v1 import jobs_pb2_grpc
from tests.conftest import BUSYBOX, WorkerHandle, wait_finished

pytestmark = pytest.mark.docker
StartWorker = Callable[..., Awaitable[WorkerHandle]]
UNRESOLVED = "Could not resolve"  # the transcoder's own 404 text: no rule matched


def http_rules() -> Iterator[tuple[str, str]]:
    """(verb, path template) of every google.api.http rule in the served descriptor set."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path().read_bytes())
    for file in files.file:
        for service in file.service:
            for method in service.method:
                if method.options.HasExtension(annotations_pb2.http):
                    yield from _flatten(method.options.Extensions[annotations_pb2.http])


def _flatten(rule: http_pb2.HttpRule) -> Iterator[tuple[str, str]]:
    verb = rule.WhichOneof("pattern")
    yield verb, getattr(rule, verb)
    for extra in rule.additional_bindings:
        yield from _flatten(extra)


@dataclass
class World:
    """A finished job with inputs and outputs, a queue with no worker, and a stored blob."""

    queue: str
    idle: str
    job_id: str
    body: dict[str, object]
    blob: bytes

    @property
    def key(self) -> str:
        return hashlib.sha256(self.blob).hexdigest()


SCRIPT = "echo hello; echo oops >&2; mkdir -p /outputs/out; cp /inputs/dir/in.txt /outputs/out/copy.txt"


@pytest_asyncio.fixture(loop_scope="session")
async def world(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> World:
    await start_worker(queue)
    script = SCRIPT + "; head -c 1000 /dev/zero > /outputs/big.bin"
    body: dict[str, object] = {
        "definition": {
            "image": BUSYBOX,
            "command": f"sh -c '{script}'",
            "inputs": {"dir/in.txt": {"type": "utf8", "value": "input!"}},
            "env": {"Q": queue},
        }
    }
    response = await rest.post(f"/q/{queue}", json=body)
    assert response.status_code == 200, response.text
    job_id = response.json()["jobId"]
    await wait_finished(jobs, job_id)
    return World(queue, f"{queue}-idle", job_id, body, f"route walk {queue}".encode())


async def queued_job(rest: httpx.AsyncClient, queue: str, tag: str) -> str:
    """A job that stays queued (no worker on `queue`), held by namespace `tag`."""
    body = {"definition": {"image": BUSYBOX, "command": "true", "env": {"TAG": tag}}, "control": {"namespace": tag}}
    response = await rest.post(f"/q/{queue}", json=body)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["jobId"]
    return job_id


Check = Callable[[httpx.AsyncClient, World], Awaitable[None]]


def get(path: str, check: Callable[[httpx.Response, World], bool | None]) -> Check:
    """GET `path` (formatted with the world's fields) and check the 200 response (False fails)."""

    async def run(rest: httpx.AsyncClient, w: World) -> None:
        response = await rest.get(path.format(q=w.queue, j=w.job_id, k=w.key))
        assert response.status_code == 200, response.text
        assert check(response, w) is not False, response.text[:2000]

    return run


def data(response: httpx.Response) -> dict[str, object]:
    parsed: dict[str, object] = response.json()
    return parsed


def is_job(response: httpx.Response, w: World) -> None:
    assert response.json()["job"]["id"] == w.job_id
    assert response.json()["job"]["state"] == "JOB_STATE_FINISHED"


def is_definition(response: httpx.Response, w: World) -> None:
    assert response.json()["definition"]["image"] == BUSYBOX


def is_result(response: httpx.Response, w: World) -> None:
    result = response.json()["result"]
    assert (result["reason"], result["exitCode"], result["logsStart"]) == ("FINISH_REASON_SUCCESS", 0, "0")
    assert "".join(chunk["text"] for chunk in result["logs"]) in ("hello\noops\n", "oops\nhello\n")


def is_run_log(response: httpx.Response, w: World) -> None:
    body = response.json()
    assert body["final"] is True and body["sliceStart"] == "0" and body["nextCursor"] == str(len(body["chunks"]))
    assert sorted(chunk["text"] for chunk in body["chunks"]) == ["hello\n", "oops\n"]


def is_build_log(response: httpx.Response, w: World) -> None:
    body = response.json()
    assert body["final"] is True and body["nextCursor"] == str(len(body["chunks"]))


def is_event_stream(response: httpx.Response, w: World) -> None:
    assert response.headers["content-type"] == "text/event-stream"
    names = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[0] == "job" and names[-1] == "final" and "run-log" in names


def is_listed(response: httpx.Response, w: World) -> None:
    assert w.job_id in [job["id"] for job in response.json()["jobs"]]


def is_input(response: httpx.Response, w: World) -> None:
    assert response.content == b"input!"
    assert response.headers["content-length"] == "6"
    assert 'filename="in.txt"' in response.headers["content-disposition"]


def is_output(response: httpx.Response, w: World) -> None:
    assert response.content == b"input!"
    assert response.headers["content-type"].startswith("text/plain")


def post(path: str, body: object, check: Callable[[httpx.Response, World, str], None], idle: bool = False) -> Check:
    """POST to `path`; with `idle`, about a fresh queued job on the idle queue (formatted as {j})."""

    async def run(rest: httpx.AsyncClient, w: World) -> None:
        job_id = await queued_job(rest, w.idle, "ns1") if idle else w.job_id
        response = await rest.post(path.format(q=w.idle if idle else w.queue, j=job_id, i=w.idle), json=body)
        assert response.status_code == 200, response.text
        check(response, w, job_id)

    return run


def submitted(response: httpx.Response, w: World, job_id: str) -> None:
    assert response.json()["success"] is True and response.json()["jobId"] == w.job_id


BATCH = {"jobs": [{"definition": {"image": BUSYBOX, "command": f"echo batch {n}"}} for n in (1, 2)]}


def submitted_batch(response: httpx.Response, w: World, job_id: str) -> None:
    jobs = response.json()["jobs"]
    assert [job["success"] for job in jobs] == [True, True] and jobs[0]["jobId"] != jobs[1]["jobId"]
    assert [job["job"]["state"] for job in jobs] == ["JOB_STATE_QUEUED"] * 2  # the idle queue: no worker


def cancelled(response: httpx.Response, w: World, job_id: str) -> None:
    job = response.json()["job"]
    assert (job["id"], job["state"], job["finishReason"]) == (job_id, "JOB_STATE_FINISHED", "FINISH_REASON_CANCELLED")


def copied(response: httpx.Response, w: World, job_id: str) -> None:
    assert response.json()["success"] is True and response.json()["job"]["id"] == w.job_id


async def put_file(rest: httpx.AsyncClient, w: World) -> None:
    response = await rest.put(f"/f/{w.key}", content=w.blob)
    assert response.status_code == 200, response.text
    assert response.json() == {"key": w.key, "size": str(len(w.blob)), "sha256": w.key}


async def delete_job(rest: httpx.AsyncClient, w: World) -> None:
    job_id = await queued_job(rest, w.idle, "del")
    response = await rest.delete(f"/q/{w.idle}/j/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"jobId": job_id}
    assert (await rest.get(f"/j/{job_id}")).json()["job"]["finishReason"] == "FINISH_REASON_DELETED"


def refused(verb: str, path: str, words: str) -> Check:
    """An id-only request that would change a run: 400 naming the route to use, and nothing changed."""

    async def run(rest: httpx.AsyncClient, w: World) -> None:
        job_id = await queued_job(rest, w.idle, "kept")
        body = {"queue": "copied-by-id"} if verb == "post" else None
        response = await rest.request(verb.upper(), path.format(j=job_id), json=body)
        assert response.status_code == 400 and words in response.json()["message"], response.text
        assert (await rest.get(f"/q/{w.idle}/j/{job_id}")).json()["job"]["state"] == "JOB_STATE_QUEUED"
        assert (await rest.get("/q/copied-by-id")).json().get("jobs", []) == []

    return run


def plain(expected: str) -> Callable[[httpx.Response, World], None]:
    def check(response: httpx.Response, w: World) -> None:
        assert response.headers["content-type"].startswith("text/plain")
        assert expected in response.text

    return check


# One expectation per rule: the walk fails on a rule that has none (and on a stale entry).
EXPECTED: dict[tuple[str, str], Check] = {
    ("put", "/f/{key}"): put_file,
    ("get", "/f/{key}"): get("/f/{k}", lambda r, w: r.content == w.blob),
    ("get", "/f/{key}/exists"): get(
        "/f/{k}/exists", lambda r, w: r.json() == {"exists": True, "size": str(len(w.blob))}
    ),
    ("get", "/f/{key}/upload"): get(
        "/f/{k}/upload", lambda r, w: r.json() == {"key": w.key, "offset": "0", "complete": True, "inProgress": False}
    ),
    # The embedded filesystem store has no presigned URLs: the answer says to use the streams
    # (tests/test_scale_out.py covers S3).
    ("get", "/f/{key}/url"): get("/f/{k}/url", lambda r, w: r.json() == {"url": "", "headers": {}}),
    ("post", "/q/{queue}"): post("/q/{q}", {"definition": {}}, lambda r, w, j: None),
    ("post", "/q/{queue}/j"): post("/q/{q}/j", {"definition": {}}, lambda r, w, j: None),
    ("post", "/q/{queue}/batch"): post("/q/{i}/batch", BATCH, submitted_batch),
    ("get", "/q/{queue}"): get("/q/{q}", is_listed),
    ("get", "/q/{queue}/j"): get("/q/{q}/j?pageSize=10", is_listed),
    ("get", "/j/{job_id}"): get("/j/{j}", is_job),
    ("get", "/q/{queue}/j/{job_id}"): get("/q/{q}/j/{j}", is_job),
    ("delete", "/q/{queue}/j/{job_id}"): delete_job,
    ("delete", "/j/{job_id}"): refused("delete", "/j/{j}", "deleting needs the job's queue"),
    ("get", "/j/{job_id}/definition.json"): get("/j/{j}/definition.json", is_definition),
    ("get", "/q/{queue}/j/{job_id}/definition.json"): get("/q/{q}/j/{j}/definition.json", is_definition),
    ("get", "/j/{job_id}/result.json"): get("/j/{j}/result.json", is_result),
    ("get", "/j/{job_id}/results.json"): get("/j/{j}/results.json", is_result),
    ("get", "/q/{queue}/j/{job_id}/result.json"): get("/q/{q}/j/{j}/result.json", is_result),
    ("get", "/j/{job_id}/logs"): get("/j/{j}/logs?kind=LOG_KIND_RUN&since=0", is_run_log),
    ("get", "/j/{job_id}/{file=run-logs.json}"): get("/j/{j}/run-logs.json", is_run_log),
    ("get", "/j/{job_id}/{file=build-logs.json}"): get("/j/{j}/build-logs.json?since=0", is_build_log),
    ("get", "/q/{queue}/j/{job_id}/{file=run-logs.json}"): get("/q/{q}/j/{j}/run-logs.json", is_run_log),
    ("get", "/q/{queue}/j/{job_id}/{file=build-logs.json}"): get("/q/{q}/j/{j}/build-logs.json", is_build_log),
    ("get", "/j/{job_id}/watch"): get("/j/{j}/watch", lambda r, w: r.json()[0]["job"]["state"] == "JOB_STATE_FINISHED"),
    ("get", "/q/{queue}/j/{job_id}/watch"): get(
        "/q/{q}/j/{j}/watch", lambda r, w: r.json()[0]["job"]["queue"] == w.queue
    ),
    ("get", "/j/{job_id}/stream"): get("/j/{j}/stream", is_event_stream),
    ("get", "/q/{queue}/j/{job_id}/stream"): get("/q/{q}/j/{j}/stream?text=true", plain("hello\n")),
    ("get", "/j/{job_id}/inputs/{path=**}"): get("/j/{j}/inputs/dir/in.txt", is_input),
    ("get", "/q/{queue}/j/{job_id}/inputs/{path=**}"): get("/q/{q}/j/{j}/inputs/dir/in.txt", is_input),
    ("get", "/j/{job_id}/outputs/{path=**}"): get("/j/{j}/outputs/out/copy.txt", is_output),
    ("get", "/q/{queue}/j/{job_id}/outputs/{path=**}"): get(
        "/q/{q}/j/{j}/outputs/big.bin", lambda r, w: r.content == bytes(1000)
    ),
    ("post", "/q/{queue}/j/{job_id}/cancel"): post("/q/{q}/j/{j}/cancel?namespace=*", None, cancelled, idle=True),
    ("post", "/q/{queue}/j/{job_id}/{namespace}/cancel"): post("/q/{q}/j/{j}/ns1/cancel", None, cancelled, idle=True),
    ("post", "/q/{source_queue}/j/{job_id}/copy"): post("/q/{q}/j/{j}/copy", {"queue": "copied"}, copied),
    ("post", "/j/{job_id}/copy"): refused("post", "/j/{j}/copy", "copying needs the job's queue"),
    ("get", "/q/{queue}/status"): get("/q/{q}/status", lambda r, w: r.json()["finished"] == "1"),
    ("get", "/q/{queue}/metrics"): get("/q/{q}/metrics", plain('jobwire_jobs{queue="')),
    ("get", "/healthz"): get("/healthz", plain("OK")),
    ("get", "/info"): get("/info", lambda r, w: r.json()["inlineLimit"] == "200"),
    ("get", "/openapi.json"): get("/openapi.json", lambda r, w: r.json()["swagger"] == "2.0"),
}


async def test_every_http_rule_is_served_through_envoy(rest: httpx.AsyncClient, world: World) -> None:
    rules = list(http_rules())
    assert len(rules) == len(set(rules)), "a rule is annotated twice"
    assert set(rules) - set(EXPECTED) == set(), "rules without an expectation in this test"
    assert set(EXPECTED) - set(rules) == set(), "expectations for rules that no longer exist"
    # Submissions first (they must answer with the finished job from cache), file upload before reads.
    world.body.setdefault("control", {"namespace": "_"})
    for verb, template in sorted(rules, key=lambda rule: (rule[0] != "put", rule[0] != "post", rule)):
        check = EXPECTED[(verb, template)]
        if template in ("/q/{queue}", "/q/{queue}/j") and verb == "post":
            response = await rest.post(template.replace("{queue}", world.queue), json=world.body)
            assert response.status_code == 200, (template, response.text)
            submitted(response, world, world.job_id)
            continue
        try:
            await check(rest, world)
        except AssertionError as error:
            raise AssertionError(f"{verb.upper()} {template}: {error}") from error


# --- errors: status codes and JSON bodies ---------------------------------------------------


def assert_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert UNRESOLVED not in response.text
    body = response.json()
    assert set(body) >= {"code", "message"} and words in body["message"], body


async def test_unknown_jobs_and_files_are_404_with_a_json_body(rest: httpx.AsyncClient) -> None:
    unknown = "0" * 64
    for path in (
        f"/j/{unknown}",
        f"/j/{unknown}/result.json",
        f"/j/{unknown}/definition.json",
        f"/j/{unknown}/run-logs.json",
        f"/j/{unknown}/stream",
        f"/j/{unknown}/inputs/a.txt",
        f"/q/nobody/j/{unknown}",
        f"/f/{unknown}",
        f"/f/{unknown}/exists",
    ):
        assert_error(await rest.get(path), 404, "not found")
    assert_error(await rest.post(f"/q/nobody/j/{unknown}/cancel"), 404, "not found")
    assert_error(await rest.post(f"/q/nobody/j/{unknown}/copy", json={"queue": "x"}), 404, "not found")


async def test_invalid_input_is_400(rest: httpx.AsyncClient, world: World) -> None:
    assert_error(await rest.post(f"/q/{world.queue}", json={"definition": {"command": "x"}}), 400, "invalid definition")
    wrong = {"jobs": [*BATCH["jobs"], {"definition": {"command": "x"}}]}
    assert_error(await rest.post(f"/q/{world.idle}/batch", json=wrong), 400, "jobs[2]: invalid definition")
    assert_error(await rest.post(f"/q/{world.idle}/batch", json={"jobs": []}), 400, "1 to 1,000 jobs")
    assert_error(await rest.get(f"/j/{world.job_id}/run-logs.json?since=-1"), 400, "`since`")
    assert_error(await rest.put("/f/.hidden", content=b"x"), 400, "key")
    assert_error(await rest.get(f"/j/{world.job_id}/inputs/nope.txt"), 404, "not found")
    # Not a number: the transcoder itself refuses it (plain text), before any RPC.
    assert (await rest.get(f"/j/{world.job_id}/run-logs.json?since=abc")).status_code == 400
    assert (await rest.get(f"/j/{world.job_id}/result.json?bogus=1")).status_code == 400


async def test_state_conflicts_are_409(rest: httpx.AsyncClient, world: World) -> None:
    job_id = await queued_job(rest, world.idle, "conflict")
    assert_error(await rest.get(f"/j/{job_id}/outputs/a.txt"), 409, "has not finished")
    key = hashlib.sha256(b"never uploaded " + world.queue.encode()).hexdigest()
    assert_error(await rest.put(f"/f/{key}?offset=10", content=b"x"), 409, "start at offset 0")


async def test_cancel_namespace_from_query_and_path(rest: httpx.AsyncClient, world: World) -> None:
    body = {"definition": {"image": BUSYBOX, "command": "true", "env": {"NS": world.idle}}}
    for namespace in ("a", "b"):
        response = await rest.post(f"/q/{world.idle}", json={**body, "control": {"namespace": namespace}})
        job_id = response.json()["jobId"]
    first = (await rest.post(f"/q/{world.idle}/j/{job_id}/cancel", params={"namespace": "a"})).json()["job"]
    assert (first["state"], first["namespaces"]) == ("JOB_STATE_QUEUED", ["b"])
    second = (await rest.post(f"/q/{world.idle}/j/{job_id}/b/cancel")).json()["job"]
    assert (second["state"], second["finishReason"]) == ("JOB_STATE_FINISHED", "FINISH_REASON_CANCELLED")


async def test_metrics_are_prometheus_text(rest: httpx.AsyncClient, world: World) -> None:
    await queued_job(rest, world.idle, "metrics")
    response = await rest.get(f"/q/{world.idle}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert "# TYPE queue_length gauge" in lines and "queue_length 1" in lines


async def test_range_requests(rest: httpx.AsyncClient, world: World) -> None:
    blob = bytes(range(256)) * 4
    key = hashlib.sha256(blob).hexdigest()
    assert (await rest.put(f"/f/{key}", content=blob)).status_code == 200
    whole = await rest.get(f"/f/{key}")
    assert (whole.status_code, whole.headers["content-length"], whole.content) == (200, "1024", blob)
    assert whole.headers["accept-ranges"] == "bytes"
    for header, start, end in (("bytes=10-19", 10, 19), ("bytes=1000-", 1000, 1023), ("bytes=-4", 1020, 1023)):
        part = await rest.get(f"/f/{key}", headers={"Range": header})
        assert part.status_code == 206, (header, part.text)
        assert part.headers["content-range"] == f"bytes {start}-{end}/1024"
        assert part.content == blob[start : end + 1]
        assert part.headers["content-length"] == str(end - start + 1)
    beyond = await rest.get(f"/f/{key}", headers={"Range": "bytes=5000-"})
    assert (beyond.status_code, beyond.headers["content-range"]) == (416, "bytes */1024")


async def test_openapi_document_lists_every_route(rest: httpx.AsyncClient) -> None:
    document = json.loads((await rest.get("/openapi.json")).content)
    listed = {(verb, path) for path, operations in document["paths"].items() for verb in operations}
    for verb, template in http_rules():
        path = template.replace("{file=run-logs.json}", "run-logs.json").replace(
            "{file=build-logs.json}", "build-logs.json"
        )
        path = path.replace("{path=**}", "{path}")
        assert (verb, path) in listed, (verb, template)
    assert len(listed) == len(set(http_rules()))
    submit = document["paths"]["/q/{queue}"]["post"]
    assert submit["operationId"] == "JobService_SubmitJob"
    assert [p["name"] for p in submit["parameters"]] == ["queue", "body"]
    assert document["definitions"]["jobwire.v1.Job"]["properties"]["createTime"]["format"] == "date-time"


async def test_listing_shows_namespaces_live_jobs_first(rest: httpx.AsyncClient, world: World) -> None:
    waiting = await queued_job(rest, world.queue, "listed-ns")
    listing = (await rest.get(f"/q/{world.queue}")).json()["jobs"]
    assert [job["id"] for job in listing][:2] == [waiting, world.job_id]  # the live job before the finished one
    assert listing[0]["namespaces"] == ["listed-ns"] and listing[1]["namespaces"] == ["_"]
    first = (await rest.get(f"/q/{world.queue}", params={"pageSize": 1})).json()
    second = (await rest.get(f"/q/{world.queue}", params={"pageSize": 1, "pageToken": first["nextPageToken"]})).json()
    assert [first["jobs"][0]["id"], second["jobs"][0]["id"]] == [waiting, world.job_id]
    finished = (await rest.get(f"/q/{world.queue}", params={"state": "JOB_STATE_FINISHED"})).json()["jobs"]
    assert [job["id"] for job in finished] == [world.job_id]


async def test_a_url_input_redirects_to_its_bytes(rest: httpx.AsyncClient, world: World) -> None:
    blob = f"url input {world.queue}".encode()
    key = hashlib.sha256(blob).hexdigest()
    assert (await rest.put(f"/f/{key}", content=blob)).status_code == 200
    url = f"{str(rest.base_url).rstrip('/')}/f/{key}"
    body = {"definition": {"image": BUSYBOX, "inputs": {"data/in.bin": {"type": "url", "value": url}}}}
    job_id = (await rest.post(f"/q/{world.idle}", json=body)).json()["jobId"]
    response = await rest.get(f"/j/{job_id}/inputs/data/in.bin")
    assert (response.status_code, response.headers["location"]) == (302, url)
    assert (await rest.get(f"/j/{job_id}/inputs/data/in.bin", follow_redirects=True)).content == blob
