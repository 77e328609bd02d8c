"""Every exception embedq raises, in one place so users can import them from ``embedq``.

Names follow ``celery.exceptions`` where Celery has the concept, so ``except TimeoutError`` style
code ports unchanged.
"""


class EmbedqError(Exception):
    """Base class of all embedq errors."""


class ConfigurationError(EmbedqError):
    """A setting is missing or contradictory; the message names the fix."""


class ProtocolError(EmbedqError):
    """A frame could not be parsed. The broker drops such messages; it never crashes on them."""


class StorageFull(EmbedqError):
    """The broker's LMDB map reached ``broker_max_store_size``; the submit was not accepted.

    Raised synchronously by ``delay()``/``apply_async()``. Nothing already stored is harmed: free
    space by letting results expire, or raise the cap.
    """


class DataDirLocked(EmbedqError):
    """Another broker already owns this data directory (LMDB itself would not stop it)."""


class TimeoutError(EmbedqError, TimeoutError):  # noqa: A001 - Celery's name, also a builtin subclass
    """The operation did not complete in time (``AsyncResult.get(timeout=...)``, submit)."""


class BrokerUnavailable(TimeoutError):
    """The broker did not acknowledge a request within ``broker_connection_timeout``."""


class UnknownTaskError(EmbedqError, KeyError):
    """The broker has no record of this task id: never submitted, forgotten, or its result expired.

    Celery reports such ids as PENDING forever; embedq says so instead.
    """

    def __str__(self):
        return f"unknown task id {self.args[0]!r} (never submitted, forgotten, or result expired)"


class NotRegistered(EmbedqError, KeyError):
    """The worker has no task of this name: import the module that defines it with ``-A``."""


class TaskRevokedError(EmbedqError):
    """The task was revoked (or expired) and will not run."""


class RemoteTaskError(EmbedqError):
    """A task failed with an exception that could not be rebuilt on this side.

    ``exc_type`` is the remote exception's qualified class name; ``remote_traceback`` the
    formatted traceback from the worker.
    """

    def __init__(self, exc_type, message, remote_traceback=""):
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.exc_message = message
        self.remote_traceback = remote_traceback


class SoftTimeLimitExceeded(EmbedqError):
    """Raised *inside* a running task when its ``soft_time_limit`` passes, so it can clean up.

    A task may catch it and return normally; if it does not, the task fails with it. Code that
    holds the GIL in C (a long regex, ``sum`` over a huge range) cannot be interrupted this way;
    the hard ``time_limit`` still ends it.
    """


class TimeLimitExceeded(EmbedqError):
    """The task ran past its hard ``time_limit``: its pool process was killed and replaced, and
    the task failed with this error (it is not redelivered)."""
class Retry(EmbedqError):
    """Raised by ``Task.retry()`` to end this run and schedule another (Celery's ``Retry``).

    The worker turns it into a RETRY outcome: the broker keeps the task, shows RETRY, and delivers
    it again at ``when`` (seconds since the epoch)."""

    def __init__(self, message=None, exc=None, when=None):
        super().__init__(message or f"retry at {when}" + (f": {exc!r}" if exc is not None else ""))
        self.exc = exc
        self.when = when

    def __reduce__(self):
        return (type(self), (self.args[0], self.exc, self.when))


class MaxRetriesExceededError(EmbedqError):
    """``retry()`` was called with no retries left and no exception to re-raise."""


class WorkerLostError(EmbedqError):
    """The worker process running the task died, and the task may not be redelivered."""
