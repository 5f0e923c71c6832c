"""Who may work a queue and who a worker is: queue credentials and worker secrets, checked when a
worker registers.

A queue name is the right to submit to a queue; a queue made by `CreateQueue` also has a worker
credential, the right to serve it. A worker's secret (made on its first start) proves its id: the
first registration of an id keeps the secret's digest (trust on first use), and every later one
must match, so no stream can take over another worker's id or its running attempts. Both secrets
are random (256 bits), so the store keeps a plain SHA-256 digest of each and compares digests in
constant time."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable

from jobwire.core import tokens
from jobwire.server.errors import Conflict, PermissionDenied, Unauthenticated
from jobwire.server.settings import ServerSettings
from jobwire.server.store.base import CredentialStore

log = logging.getLogger(__name__)
MIN_SECRET_CHARS = 16
"""Shorter worker secrets are refused: a secret must be unguessable to prove anything."""
_WRONG_CREDENTIAL = "the queue's worker credential is missing, wrong or revoked"


def digest(secret: str) -> str:
    """What the store keeps of a credential or secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


class Trust:
    """Mints queue credentials and checks what a registering worker presents."""

    def __init__(self, store: CredentialStore, settings: ServerSettings, clock: Callable[[], float]) -> None:
        self.store, self.settings, self.clock = store, settings, clock

    async def create_queue(self) -> tuple[str, str]:
        """A new queue's unguessable name (192 bits) and its worker credential, which is not kept."""
        queue, credential = tokens.token(24), tokens.token(32)
        if not await self.store.add_queue_credential(queue, digest(credential), self.clock()):
            raise Conflict("a queue of that name exists; try again")  # 192 random bits: never in practice
        return queue, credential

    async def rotate(self, queue: str, credential: str) -> str:
        """Replace the queue's worker credential (given) with a new one, returned; the old one dies now."""
        new = tokens.token(32)
        await self._replace(queue, credential, digest(new))
        log.info("a queue's worker credential was rotated")
        return new

    async def revoke(self, queue: str, credential: str) -> None:
        """Revoke the queue's worker credential (given): no worker may serve the queue any more."""
        await self._replace(queue, credential, "")
        log.info("a queue's worker credential was revoked")

    async def _replace(self, queue: str, credential: str, new: str) -> None:
        now = self.clock()
        if not credential or not await self.store.replace_queue_credential(queue, digest(credential), new, now):
            raise Unauthenticated(_WRONG_CREDENTIAL)

    async def admit(self, queue: str, worker_id: str, credential: str, secret: str) -> str | None:
        """Check a registration: the queue's worker credential, then the worker's secret. Returns the
        digest of the credential the session serves under (None: an open queue); raises Unauthenticated
        or PermissionDenied, saying nothing of the queue's jobs."""
        kept = await self.store.queue_credential(queue)
        try:
            if kept is None and self.settings.require_worker_credential:
                raise PermissionDenied(
                    "this server lets workers serve only queues made by `jobwire queue new`, with their credential"
                )
            if kept is not None and not (credential and kept and hmac.compare_digest(kept, digest(credential))):
                raise Unauthenticated(f"{_WRONG_CREDENTIAL} (--credential or JOBWIRE_CREDENTIAL)")
            await self._prove(worker_id, secret)
        except (Unauthenticated, PermissionDenied) as refused:
            log.warning("refused worker %s: %s", worker_id, refused)
            raise
        return kept

    async def _prove(self, worker_id: str, secret: str) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise Unauthenticated("register with the worker's secret (a worker makes one in its data directory)")
        if not await self.store.trust_worker(worker_id, digest(secret), self.clock()):
            raise Unauthenticated(
                f"worker id {worker_id!r} is another worker's: the secret does not match the one it registered"
                " with (a worker keeps its id and secret in its data directory)"
            )

    async def may_work(self, queue: str, credential: str) -> bool:
        """True while `credential` (a digest `admit` returned) is still the queue's live credential."""
        return bool(credential) and await self.store.queue_credential(queue) == credential
