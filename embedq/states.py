"""Task states, with Celery's names and meanings, plus ``UNKNOWN`` for ids the broker never saw."""

#: Known to the broker and waiting to be delivered (queued or scheduled).
PENDING = "PENDING"
#: Delivered to (leased by) a worker node.
RECEIVED = "RECEIVED"
#: A pool process began running it.
STARTED = "STARTED"
#: Waiting for a retry.
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
#: The broker has no record of the id (Celery would say PENDING here, forever).
UNKNOWN = "UNKNOWN"

READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, RETRY})
EXCEPTION_STATES = frozenset({FAILURE, RETRY, REVOKED})
PROPAGATE_STATES = frozenset({FAILURE, REVOKED})
ALL_STATES = READY_STATES | UNREADY_STATES | {UNKNOWN}
