"""The worker's log batching: a burst of output travels in a few messages, and a last line is not held back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from jobwire.v1 import jobs_pb2, workers_pb2
from jobwire.worker.execution import _LogStream
from jobwire.worker.runner import STDOUT


@dataclass
class _Execution:
    job_id: str = "job"
    attempt: int = 1
    sent: list[workers_pb2.ConnectRequest] = field(default_factory=list)

    async def send(self, message: workers_pb2.ConnectRequest) -> None:
        self.sent.append(message)


async def test_a_burst_of_lines_is_sent_in_few_batches_in_order() -> None:
    execution = _Execution()
    stream = _LogStream(execution, jobs_pb2.LOG_KIND_RUN)  # type: ignore[arg-type]
    for n in range(1000):
        stream.add(STDOUT, f"{n}\n".encode())
        await stream.flush_if_idle()
    await asyncio.sleep(0.2)
    assert 1 <= len(execution.sent) <= 5
    text = "".join(chunk.text for message in execution.sent for chunk in message.logs.chunks)
    assert text == "".join(f"{n}\n" for n in range(1000))
    starts = [message.logs.start for message in execution.sent]
    sizes = [len(message.logs.chunks) for message in execution.sent]
    assert starts == [sum(sizes[:n]) for n in range(len(sizes))]  # contiguous, from 0
    stream.close()


async def test_a_last_line_goes_out_without_more_output() -> None:
    execution = _Execution()
    stream = _LogStream(execution, jobs_pb2.LOG_KIND_RUN)  # type: ignore[arg-type]
    stream.add(STDOUT, b"only line\n")
    await stream.flush_if_idle()
    for _ in range(100):
        if execution.sent:
            break
        await asyncio.sleep(0.01)
    assert [chunk.text for chunk in execution.sent[0].logs.chunks] == ["only line\n"]
    stream.close()
