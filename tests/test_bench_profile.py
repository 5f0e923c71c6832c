"""The profile's summariser (`bench/profile.py`) on a small made-up py-spy folded file: each sample goes
to its innermost categorised frame."""

from __future__ import annotations

from bench.profile import OTHER, category, frames, summarise

LOOP = (
    "<module> (jobwire:6);main (cli/app.py:46);BaseEventLoop.run_forever (asyncio/base_events.py:607);"
    "BaseEventLoop._run_once (asyncio/base_events.py:1922)"
)
TASK = LOOP + ";Handle._run (asyncio/events.py:80)"
SUBMIT = TASK + ";JobServicer.SubmitJob (server/servicers/jobs.py:30);Scheduler.submit (server/scheduler.py:85)"
FILL = TASK + ";WorkerSession._fill_forever (server/sessions.py:213);WorkerSession._fill (server/sessions.py:232)"
THREAD = (
    "Thread._bootstrap (threading.py:1002);Thread._bootstrap_inner (threading.py:1045);Thread.run (threading.py:982)"
)
FOLDED = f"""\
{SUBMIT};Lifecycle.submit (server/store/lifecycle.py:33);SqliteDatabase.run (server/store/sqlite.py:179) 5
{SUBMIT};Lifecycle.submit (server/store/lifecycle.py:33) 3
{FILL};Scheduler.claim (server/scheduler.py:328);SqliteStore.claim (server/store/sqlite.py:329) 2
{FILL};Scheduler.claim (server/scheduler.py:328);Lifecycle.claim (server/store/lifecycle.py:90) 1
{TASK};WorkerSession.handle (server/sessions.py:154);WorkerSession._on_finished (server/sessions.py:190);\
Scheduler.finished (server/scheduler.py:348);Lifecycle.finish (server/store/lifecycle.py:120) 4
{TASK};WorkerSession.handle (server/sessions.py:154);Scheduler.started (server/scheduler.py:336) 1
{TASK};SqliteStore._commit_when_quiet (server/store/sqlite.py:319) 6
{TASK} 7
{TASK};_send (server/servicers/workers.py:77) 2
{TASK};_send (server/servicers/workers.py:77);take_ready (core/batching.py:10) 1
{LOOP} 2
{LOOP};EpollSelector.select (selectors.py:468) 3
{THREAD} 8
{THREAD};_worker (concurrent/futures/thread.py:81) 1
{THREAD};_worker (concurrent/futures/thread.py:83);SqliteStore._checkpoint (server/store/sqlite.py:242) 2
 1
"""


def test_samples_go_to_their_innermost_categorised_frame() -> None:
    summary = summarise(FOLDED.splitlines(keepends=True))
    assert summary.samples == 49
    assert dict(summary.categories) == {
        "SQLite statements": 5,  # SQL run by the submit path is SQL
        "submit path": 3,
        "claim path": 3,  # the store's claim, and the shared SQL's Python around it
        "finish path": 4,
        "worker stream, other": 2,  # Scheduler.started, and take_ready under a _send that is not innermost
        "commits": 6,
        "gRPC machinery: calls and streams": 9,  # Handle._run and _send when innermost: Cython below
        "event loop": 2,
        "gRPC machinery: selector wake-ups": 3,
        "gRPC machinery: poller thread": 8,  # Thread.run innermost: grpc's Cython poller
        "WAL checkpoints": 2,
        OTHER: 2,  # an executor thread (_worker innermost), the empty stack
    }
    assert summary.within["submit path"] == 8  # with the SQL it runs
    assert summary.within["SQLite statements"] == 5
    assert summary.own["SqliteStore._commit_when_quiet (server/store/sqlite.py)"] == 6
    assert summary.own["(no stack)"] == 1
    assert summary.inclusive["Scheduler.submit (server/scheduler.py)"] == 8
    assert not any(name.startswith(("BaseEventLoop", "Thread.", "<module>")) for name in summary.inclusive)


def test_a_frame_below_a_categorised_one_keeps_it_only_if_uncategorised() -> None:
    # Thread.run is the poller only when innermost; Handle._run is gRPC only when innermost.
    assert category(frames("Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81)")) == OTHER
    assert category(frames(f"{TASK};BaseEventLoop.call_soon (asyncio/base_events.py:761)")) == "event loop"
    # The submission stream's `answer`: its own innermost time is the stream's write; around `_submit`, submitting.
    answer = f"{TASK};JobServicer.SubmitJobStream.<locals>.answer (server/servicers/jobs.py:52)"
    assert category(frames(answer)) == "gRPC machinery: calls and streams"
    assert category(frames(f"{answer};JobServicer._submit (server/servicers/jobs.py:36)")) == "submit path"
    assert category(frames(f"{answer};history_entry (server/store/rows.py:9)")) == "submit path"
