"""Webhooks (`control.callbacks`): JSON POSTs kept in the store until delivered, retried with backoff.

The body is the seed's `{"jobId", "queue", "namespace", "config"}`; `finished` calls add
`"state": "finished"`, `"reason"` (`success`, `error`, `timed-out`, …) and `"exitCode"`. A call
is delivered when the receiver answers 2xx; otherwise it is tried again after 1 s, 2 s, 4 s, …
(at most an hour apart) for up to MAX_ATTEMPTS tries, surviving server restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
from google.protobuf import json_format

from jobwire.server.store import StateStore
from jobwire.server.store.base import FINISHED_HOOK, Webhook
from jobwire.v1 import definition_pb2, jobs_pb2

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 20
CLAIM = 32
TIMEOUT = 10.0


def body(job_id: str, queue: str, namespace: str, callback: definition_pb2.Callback) -> bytes:
    """The seed's webhook body."""
    config = json_format.MessageToDict(callback.payload) if callback.HasField("payload") else {}
    return json.dumps({"jobId": job_id, "queue": queue, "namespace": namespace, "config": config}).encode()


class Webhooks:
    """Delivers due webhooks forever; several replicas may run one each (claims hide a call while it is tried)."""

    def __init__(self, store: StateStore, clock: Callable[[], float], interval: float = 1.0) -> None:
        self.store, self.clock, self.interval = store, clock, interval

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=True) as client:
            while True:
                due = await self.store.claim_webhooks(self.clock(), self.clock() + 2 * TIMEOUT, CLAIM)
                await asyncio.gather(*(self._deliver(client, hook) for hook in due))
                if len(due) < CLAIM:
                    await asyncio.sleep(self.interval)

    async def _deliver(self, client: httpx.AsyncClient, hook: Webhook) -> None:
        payload: dict[str, Any] = json.loads(hook.body)
        if hook.event == FINISHED_HOOK and (job := await self.store.get_job(hook.job_id, queue=hook.queue)) is not None:
            reason = jobs_pb2.FinishReason.Name(job.finish_reason).removeprefix("FINISH_REASON_")
            payload |= {
                "state": "finished",
                "reason": reason.lower().replace("_", "-"),
                "exitCode": job.result.exit_code,
            }
        try:
            response = await client.post(hook.url, json=payload)
            if response.is_success:
                await self.store.settle_webhook(hook.id, None)
                return
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            problem = f"{type(error).__name__}: {error}"
        if hook.attempts + 1 >= MAX_ATTEMPTS:
            log.warning(
                "webhook %s of job %s to %s abandoned after %d tries (%s)",
                hook.event,
                hook.job_id,
                hook.url,
                MAX_ATTEMPTS,
                problem,
            )
            await self.store.settle_webhook(hook.id, None)
            return
        delay = min(2.0**hook.attempts, 3600.0)
        log.info(
            "webhook %s of job %s to %s failed (%s); retrying in %.0f s",
            hook.event,
            hook.job_id,
            hook.url,
            problem,
            delay,
        )
        await self.store.settle_webhook(hook.id, self.clock() + delay)
