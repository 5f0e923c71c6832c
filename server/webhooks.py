"""Webhooks (`control.callbacks`): JSON POSTs kept in the store until delivered, retried with backoff.

The body is the seed's `{"jobId", "queue", "namespace", "config"}`; `finished` calls add
`"state": "finished"`, `"reason"` (`success`, `error`, `timed-out`, …) and `"exitCode"`. A call
is delivered when the receiver answers 2xx; otherwise it is tried again after 1 s, 2 s, 4 s, …
(at most an hour apart) for up to MAX_ATTEMPTS tries, surviving server restarts.

Calls obey the egress policy (`jobwire.core.egress`, `--egress-allow`): a call to an address it refuses
(loopback, private, link-local, …, directly or by a redirect) is never made, and is abandoned at once
with the reason logged. A receiver's answer is not read beyond its status, and a call has
CALL_TIME seconds in all.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
from google.protobuf import json_format

from jobwire.core import egress
from jobwire.server.store import StateStore
from jobwire.server.store.base import FINISHED_HOOK, Webhook
from jobwire.v1 import definition_pb2, jobs_pb2

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 20
CLAIM = 32
TIMEOUT = 10.0
CALL_TIME = 2 * TIMEOUT


def body(job_id: str, queue: str, namespace: str, callback: definition_pb2.Callback) -> bytes:
    """The seed's webhook body."""
    config = json_format.MessageToDict(callback.payload) if callback.HasField("payload") else {}
    return json.dumps({"jobId": job_id, "queue": queue, "namespace": namespace, "config": config}).encode()


class Webhooks:
    """Delivers due webhooks forever; several replicas may run one each (claims hide a call while it is tried)."""

    def __init__(
        self, store: StateStore, clock: Callable[[], float], policy: egress.Policy, interval: float = 1.0
    ) -> None:
        self.store, self.clock, self.policy, self.interval = store, clock, policy, interval

    async def run(self) -> None:
        async with egress.client(self.policy, TIMEOUT) as client:
            while True:
                due = await self.store.claim_webhooks(self.clock(), self.clock() + CALL_TIME, CLAIM)
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
            async with asyncio.timeout(CALL_TIME), client.stream("POST", hook.url, json=payload) as response:
                success, problem = response.is_success, f"HTTP {response.status_code}"
            if success:
                await self.store.settle_webhook(hook.id, None)
                return
        except (httpx.HTTPError, TimeoutError) as error:
            problem = f"{type(error).__name__}: {error}"
        except egress.EgressRefused as error:
            log.warning("webhook %s of job %s to %s abandoned: %s", hook.event, hook.job_id, hook.url, error)
            await self.store.settle_webhook(hook.id, None)
            return
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
