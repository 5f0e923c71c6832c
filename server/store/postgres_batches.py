"""What a PostgreSQL store keeps between calls to spend fewer round trips: where the logs it
stored end (`LogEnds`), the finishes waiting to be written together (`Finish`), the runs its claims
are taking (`Claims`), and the numbered parameters of a statement built for many rows (`Parameters`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobwire.server.store.base import LogTotals
from jobwire.server.store.transitions import Change, Holding

_ARRAY_TYPES = {bool: "boolean[]", int: "bigint[]", float: "float8[]", str: "text[]", bytes: "bytea[]"}

LOG_ENDS_KEPT = 4096
"""How many runs' log ends a store remembers (`LogEnds`): more attempts than its workers run at once."""
RunKey = tuple[str, str, int]
"""A run's attempt: (queue, job id, attempt)."""


@dataclass
class RunLogs:
    """What a store knows of the logs of one attempt held by one session: each log's totals after the
    last batch the store stored; with `claimed` (the store assigned the attempt) a log not named is empty."""

    session: str
    totals: dict[int, LogTotals] = field(default_factory=dict)
    claimed: bool = False


class LogEnds:
    """Where the logs of the attempts this store assigned or appended to end, as far as it knows, so
    that an append needs no read first. Knowing is never trusted: `_LOG_APPEND` still checks the
    holding, and a log's batches follow each other without a gap, so a memory behind the log (another
    replica's append, one stored by the locked path) names a start where a batch is stored, which the
    log's primary key refuses; the append then takes the read. The `kept` most recently used attempts;
    an attempt's entry goes when it finishes, is released or re-queued, or on any doubt (an error)."""

    def __init__(self, kept: int = LOG_ENDS_KEPT) -> None:
        self.kept = kept
        self.runs: OrderedDict[RunKey, RunLogs] = OrderedDict()

    def known(self, run: RunKey, session: str, kind: int) -> LogTotals | None:
        logs = self.runs.get(run)
        if logs is None or logs.session != session:
            return None
        self.runs.move_to_end(run)
        return logs.totals.get(kind, LogTotals() if logs.claimed else None)

    def claimed(self, run: RunKey, session: str) -> None:
        self._keep(run, RunLogs(session, claimed=True))

    def stored(self, run: RunKey, session: str, kind: int, totals: LogTotals) -> None:
        logs = self.runs.get(run)
        if logs is None or logs.session != session:
            logs = self._keep(run, RunLogs(session))
        self.runs.move_to_end(run)
        logs.totals[kind] = totals

    def forget(self, run: RunKey) -> None:
        self.runs.pop(run, None)

    def _keep(self, run: RunKey, logs: RunLogs) -> RunLogs:
        self.runs[run] = logs
        self.runs.move_to_end(run)
        while len(self.runs) > self.kept:
            self.runs.popitem(last=False)
        return logs


@dataclass(eq=False)
class Finish:
    """One caller's finish waiting to be written with others (`PostgresStore._finish_together`):
    once `done`, the run's row (`RUN_COLUMNS, definition, …`; None: not held as `held`) or `error`."""

    queue: str
    job_id: str
    held: Holding
    change: Change
    now: float
    done: bool = False
    row: Any = None
    error: BaseException | None = None


class Parameters:
    """The numbered parameters ($1, $2, …) of a statement built piece by piece."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.unnested: list[str] = []
        self.names: list[str] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    def column(self, name: str, values: Sequence[Any]) -> str:
        """One value per row: a parameter if all are equal, else a column (`u.name`) of `unnest()`."""
        if all(value == values[0] for value in values):
            return self.add(values[0])
        return self.array(name, values)

    def array(self, name: str, values: Sequence[Any]) -> str:
        kind = _ARRAY_TYPES[type(next((value for value in values if value is not None), ""))]
        self.unnested.append(f"{self.add(list(values))}::{kind}")
        self.names.append(name)
        return f"u.{name}"

    def sets(self, changes: Sequence[Change]) -> str:
        """The SET clause writing each change (all setting the same columns) to its row of `u`."""
        sets = [
            f"{column} = {self.column(f'u_{column}', [c.columns[column] for c in changes])}"
            for column in changes[0].columns
        ]
        entry = self.array("u_entry", [change.entry for change in changes])
        return ", ".join([*sets, f"history = history || {entry}"])

    def unnest(self) -> str:
        return f"unnest({', '.join(self.unnested)}) WITH ORDINALITY AS u ({', '.join(self.names)}, u_n)"


@dataclass
class Taking:
    """The runs of one queue this store's claims chose and are assigning: the next read passes over
    those being assigned as it begins (one committed while it runs may still show as waiting to it).
    Reads take turns (`turn`), so each knows every run the reads before it chose; a run leaves
    `assigning` once its assignment is committed, when no read beginning after sees it waiting."""

    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    reads: int = 0
    assigning: set[str] = field(default_factory=set)


class Claims:
    """What this store's claims of each queue are taking (`Taking`), so that workers woken together
    neither read nor contend for the same oldest runs."""

    def __init__(self) -> None:
        self.queues: dict[str, Taking] = {}

    @contextlib.asynccontextmanager
    async def reading(self, queue: str) -> AsyncIterator[Taking]:
        """A read of the queue's waiting runs, in its turn; what it chooses goes to `assigning`."""
        taking = self.queues.setdefault(queue, Taking())
        taking.reads += 1
        try:
            async with taking.turn:
                yield taking
        finally:
            taking.reads -= 1
            self._tidy(queue, taking)

    def assigned(self, queue: str, runs: set[str]) -> None:
        """`runs`, chosen by a read, are assigned (or not) now."""
        taking = self.queues.get(queue)
        if taking is None:  # nothing chosen, and no claim of the queue left
            return
        taking.assigning -= runs
        self._tidy(queue, taking)

    def _tidy(self, queue: str, taking: Taking) -> None:
        if not (taking.reads or taking.assigning) and self.queues.get(queue) is taking:
            del self.queues[queue]
