"""The worker's errors: one tree.

WorkerError
 ├── JobError          an attempt fails with a message its job's owner reads (the job finishes as an error)
 │    ├── ImageError   the image is not local, cannot be pulled, or the engine refused the container
 │    ├── BuildError   the image could not be built; the build log says why
 │    └── StagingError an input could not be written; the message says which and why
 ├── BadMessage        the server sent something the worker will not act on (see validation.py)
 ├── StreamEnded       the server ended the worker's stream; the daemon reconnects
 └── Refused           the server refused the registration (credential, secret); the daemon stops
"""


class WorkerError(Exception):
    """Base of every error the worker raises itself."""


class JobError(WorkerError):
    """An attempt failed for a reason its job's owner can act on; the message says it."""


class ImageError(JobError):
    """The image is not available locally and could not be pulled, or the engine refused the container."""


class BuildError(JobError):
    """The image could not be built; the build log says why."""


class StagingError(JobError):
    """An input could not be written; the message says which and why."""


class BadMessage(WorkerError):
    """The server sent an id, a number or a name the worker refuses to act on."""


class StreamEnded(WorkerError):
    """The server ended the stream."""


class Refused(WorkerError):
    """The server refused the worker's registration; retrying with the same credential and secret
    cannot help, so the daemon stops with the server's reason."""
