"""The job state machine on its own: who may act on a job, and what each transition writes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from jobwire.server.store import transitions
from jobwire.server.store.base import Attempt, Holder
from jobwire.server.store.transitions import FINISHED, QUEUED, RUNNING, Holding
from jobwire.v1 import jobs_pb2

W1 = Holder("w1", "s1", "q")
RUNNING_W1 = Holding(RUNNING, 2, "w1", "s1")
ATTEMPT = Attempt("job", 2)


def entry(change: transitions.Change) -> jobs_pb2.JobEvent:
    (event,) = jobs_pb2.Job.FromString(change.entry).history
    return event


@pytest.mark.parametrize(
    ("holding", "attempt", "holder", "holds", "may_retake"),
    [
        (RUNNING_W1, ATTEMPT, W1, True, True),
        (RUNNING_W1, ATTEMPT, Holder("w1", "s2", "q"), False, True),  # the same worker, registered again
        (RUNNING_W1, ATTEMPT, Holder("w2", "s1", "q"), False, False),
        (RUNNING_W1, Attempt("job", 1), W1, False, False),  # an earlier attempt
        (Holding(QUEUED, 2, "", ""), ATTEMPT, W1, False, False),
        (Holding(FINISHED, 2, "w1", "s1"), ATTEMPT, W1, False, False),
        (None, ATTEMPT, W1, False, False),  # an unknown job
    ],
)
def test_only_the_session_holding_the_attempt_may_act_on_it(
    holding: Holding | None, attempt: Attempt, holder: Holder, holds: bool, may_retake: bool
) -> None:
    assert transitions.holds(holding, attempt, holder) is holds
    assert transitions.may_retake(holding, attempt, holder) is may_retake


def test_an_assignment_records_the_next_attempt_its_worker_and_session() -> None:
    change = transitions.assigned(1, W1, 10.0, lease=30.0)
    assert change.columns | {"update_time": 0} == dict(
        state=RUNNING, attempt=2, worker_id="w1", session="s1", update_time=0, lease_expires=40.0
    )
    assert (entry(change).attempt, entry(change).message) == (2, "assigned to worker w1 as attempt 2")


def test_a_finish_ends_the_job_with_its_result_and_arms_webhooks() -> None:
    result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_ERROR, exit_code=3, message="boom")
    change = transitions.finished(ATTEMPT, W1, result, 5.0)
    assert change.finishes and change.columns["finish_reason"] == jobs_pb2.FINISH_REASON_ERROR
    assert jobs_pb2.JobResult.FromString(change.columns["result"]) == result
    assert entry(change).message == "finished (error, exit code 3): boom"


@pytest.mark.parametrize(
    ("requeue", "message"),
    [
        (lambda h: transitions.released(h, "draining", 5.0), "re-queued: released by worker w1: draining"),
        (
            lambda h: transitions.lease_ran_out(h, 5.0),
            "re-queued: worker-lost: no word from worker w1 within its lease",
        ),
        (lambda h: transitions.left_behind(h, 5.0), "re-queued: worker-lost: worker w1 came back without this attempt"),
    ],
)
def test_a_requeue_frees_the_job_of_its_worker_and_session(
    requeue: Callable[[Holding], transitions.Change], message: str
) -> None:
    change = requeue(RUNNING_W1)
    assert (change.columns["state"], change.columns["session"]) == (QUEUED, "")  # no session holds it
    assert not change.finishes and (entry(change).attempt, entry(change).message) == (2, message)


def test_a_client_ends_queued_and_running_jobs_but_only_a_delete_ends_a_finished_one() -> None:
    cancel = jobs_pb2.FINISH_REASON_CANCELLED
    running = transitions.ended_by_client(RUNNING_W1, cancel, "cancelled", 5.0)
    assert running is not None and running.finishes and entry(running).message == "cancelled by a client"
    assert transitions.to_stop(RUNNING_W1, "job") == ATTEMPT
    assert transitions.to_stop(Holding(QUEUED, 2, "", ""), "job") is None
    done = Holding(FINISHED, 2, "w1", "s1")
    assert transitions.ended_by_client(done, cancel, "cancelled", 5.0) is None
    assert transitions.ended_by_client(done, jobs_pb2.FINISH_REASON_DELETED, "deleted", 5.0, force=True) is not None


def test_a_submission_queues_a_known_job_again_only_without_a_final_result() -> None:
    assert transitions.may_queue_again(FINISHED, jobs_pb2.FINISH_REASON_CANCELLED)
    assert not transitions.may_queue_again(FINISHED, jobs_pb2.FINISH_REASON_SUCCESS)
    assert not transitions.may_queue_again(RUNNING, 0)


SUCCESS = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_SUCCESS)
LOST_W1 = Holding(QUEUED, 2, "w1", "")  # what `lease_ran_out` leaves: queued, still naming w1


@pytest.mark.parametrize(
    ("holding", "holder", "result", "may_finish"),
    [
        (RUNNING_W1, W1, SUCCESS, True),
        (LOST_W1, Holder("w1", "s2", "q"), SUCCESS, True),  # back past its lease, nobody else has it
        (LOST_W1, Holder("w1", "s2", "q"), jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_ERROR), True),
        (LOST_W1, Holder("w2", "s3", "q"), SUCCESS, False),  # another worker
        # the worker obeying the stop of its lost attempt: the job must run again
        (LOST_W1, Holder("w1", "s2", "q"), jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_CANCELLED), False),
        (Holding(RUNNING, 3, "w2", "s3"), Holder("w1", "s2", "q"), SUCCESS, False),  # given to another since
        (Holding(QUEUED, 2, "", ""), Holder("w1", "s2", "q"), SUCCESS, False),  # released or queued again
    ],
)
def test_a_result_of_an_attempt_lost_past_its_lease_is_taken_until_the_job_is_given_again(
    holding: Holding, holder: Holder, result: jobs_pb2.JobResult, may_finish: bool
) -> None:
    assert transitions.may_finish(holding, ATTEMPT, holder, result) is may_finish


def test_a_lease_that_ran_out_queues_the_job_again_still_naming_its_worker() -> None:
    columns = transitions.lease_ran_out(RUNNING_W1, 5.0).columns
    assert (columns["state"], columns["worker_id"], columns["session"]) == (QUEUED, "w1", "")
    assert transitions.left_behind(RUNNING_W1, 5.0).columns["worker_id"] == ""


def test_a_worker_back_past_its_lease_retakes_its_attempt_until_the_job_is_given_again() -> None:
    back = Holder("w1", "s2", "q")
    assert transitions.may_retake(LOST_W1, ATTEMPT, back)
    assert not transitions.may_retake(LOST_W1, ATTEMPT, Holder("w2", "s3", "q"))
    assert not transitions.may_retake(Holding(RUNNING, 3, "w2", "s3"), ATTEMPT, back)
    change = transitions.renewed(back, 40.0, LOST_W1, 10.0)
    assert change.columns == dict(lease_expires=40.0, session="s2", state=RUNNING, worker_id="w1", update_time=10.0)
    assert (entry(change).attempt, entry(change).worker_id) == (2, "w1")
    assert not transitions.renewed(back, 40.0, RUNNING_W1, 10.0).entry  # an ordinary renewal: no history
