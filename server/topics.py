"""Names of the event bus topics."""


def job(job_id: str) -> str:
    """State changes and log batches of one job (WatchJobResponse messages)."""
    return f"job:{job_id}"


def queue(name: str) -> str:
    """Work became available on a queue (empty messages)."""
    return f"queue:{name}"


def worker(worker_id: str) -> str:
    """Messages for one worker's stream, wherever it is connected (ConnectResponse messages)."""
    return f"worker:{worker_id}"
