"""Who may work a queue and who a worker is: the digests of queue credentials and worker secrets.

Only SHA-256 digests are stored (`jobwire.server.trust` makes them): both secrets are random and
high-entropy, so a digest needs no salt or key stretching to be useless to whoever reads the
database. Both tables are shared by every replica, like the rest of the store."""

from __future__ import annotations

import hmac

from jobwire.server.store.database import SqlBase


class CredentialRecords(SqlBase):
    """`base.CredentialStore` in the SQL both backends share."""

    async def add_queue_credential(self, queue: str, digest: str, now: float) -> bool:
        async with self._transaction() as db:
            if await db.one("SELECT 1 FROM queue_credentials WHERE queue = ? FOR UPDATE", queue):
                return False
            await db.run(
                "INSERT INTO queue_credentials (queue, digest, update_time) VALUES (?, ?, ?)", queue, digest, now
            )
        return True

    async def queue_credential(self, queue: str) -> str | None:
        async with self._reading() as db:
            row = await db.one("SELECT digest FROM queue_credentials WHERE queue = ?", queue)
        return None if row is None else str(row[0])

    async def replace_queue_credential(self, queue: str, current: str, new: str, now: float) -> bool:
        async with self._transaction() as db:
            row = await db.one("SELECT digest FROM queue_credentials WHERE queue = ? FOR UPDATE", queue)
            if row is None or not row[0] or not hmac.compare_digest(str(row[0]), current):
                return False
            await db.run("UPDATE queue_credentials SET digest = ?, update_time = ? WHERE queue = ?", new, now, queue)
        return True

    async def trust_worker(self, worker_id: str, digest: str, now: float) -> bool:
        async with self._transaction() as db:
            await db.run(
                "INSERT INTO worker_secrets (id, digest, create_time) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
                worker_id,
                digest,
                now,
            )
            (kept,) = await db.one("SELECT digest FROM worker_secrets WHERE id = ?", worker_id)
        return hmac.compare_digest(str(kept), digest)


SCHEMA = """
CREATE TABLE queue_credentials (queue TEXT PRIMARY KEY, digest TEXT NOT NULL, update_time {time} NOT NULL);
CREATE TABLE worker_secrets (id TEXT PRIMARY KEY, digest TEXT NOT NULL, create_time {time} NOT NULL)
"""
"""The two tables, for each backend's migration list (`time`: its type of Unix seconds)."""
