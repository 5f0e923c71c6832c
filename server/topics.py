"""Names of the event bus topics."""


def job(queue: str, job_id: str) -> str:
    """State changes and log batches of one job's run in `queue` (WatchJobResponse messages)."""
    return f"job:{queue}/{job_id}"


def queue(name: str) -> str:
    """Work became available on a queue (`work_notice` messages)."""
    return f"queue:{name}"


def work_notice(jobs: int) -> bytes:
    """The message telling a queue's servers that `jobs` jobs became available."""
    return str(jobs).encode()


def noticed_jobs(notice: bytes) -> int:
    """How many jobs a `work_notice` announces (1 for an empty message, which says "some")."""
    return int(notice) if notice.isdigit() else 1


def worker(worker_id: str) -> str:
    """Messages for one worker's stream, wherever it is connected (ConnectResponse messages)."""
    return f"worker:{worker_id}"
