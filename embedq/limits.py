"""Time limits and recycling limits of pool processes: what applies, and how each is enforced.

::

    task header {"time_limit", "soft_time_limit"}  >  the task's own attributes  >  the worker's
    defaults (--time-limit / task_time_limit, --soft-time-limit / task_soft_time_limit)

- The **soft** limit is enforced inside the pool process: a one-shot ``ITIMER_REAL`` whose SIGALRM
  handler raises SoftTimeLimitExceeded in the task, so it can clean up (or even carry on).
- The **hard** limit cannot be enforced from inside: a task stuck in C code holding the GIL runs
  no signal handler. The pool process publishes the deadline of what it runs in its status array
  and the *supervisor* kills it with SIGKILL when it passes, then reports the task settled as
  FAILURE/TimeLimitExceeded (a result built here, sent with the node's LOST).
- ``max_tasks_per_child`` / ``max_memory_per_child`` (resident set, KiB, as in Celery) are checked
  by the pool process after each task; it then retires (hands back what it prefetched, waits for
  its results to be settled, exits) and the supervisor starts a fresh one.
"""

import math
import os
import signal
import time
from typing import NamedTuple

from . import protocol as P
from . import serialize, states
from .errors import SoftTimeLimitExceeded, TimeLimitExceeded


class Limits(NamedTuple):
    """A worker node's defaults, handed to each of its pool processes."""

    time_limit: float | None = None
    soft_time_limit: float | None = None
    max_tasks_per_child: int | None = None
    #: KiB of resident memory, as in Celery
    max_memory_per_child: int | None = None

    @classmethod
    def from_settings(cls, conf, time_limit=None, soft_time_limit=None, max_tasks_per_child=None,
                      max_memory_per_child=None):
        """Explicit values (the command line) win over the app's settings."""
        def pick(value, setting):
            return value if value is not None else conf.get(setting)

        return cls(pick(time_limit, "task_time_limit"), pick(soft_time_limit, "task_soft_time_limit"),
                   pick(max_tasks_per_child, "worker_max_tasks_per_child"),
                   pick(max_memory_per_child, "worker_max_memory_per_child"))


#: No limits at all (a pool process started without a node's defaults).
NO_LIMITS = Limits()


def _seconds(value):
    """A usable limit from an untrusted header field, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) and value > 0 else None


def effective(header, task, defaults):
    """(soft, hard) seconds for one delivery, None where there is no limit."""
    return (_first_limit(header.get("soft_time_limit"), getattr(task, "soft_time_limit", None),
                         defaults.soft_time_limit),
            _first_limit(header.get("time_limit"), getattr(task, "time_limit", None), defaults.time_limit))


def _first_limit(per_call, per_task, default):
    """The first usable limit in order of precedence (most tasks have none at all)."""
    if per_call is None and per_task is None and default is None:
        return None
    for value in (per_call, per_task, default):
        if value is not None and (seconds := _seconds(value)) is not None:
            return seconds
    return None


class SoftLimit:
    """The soft time limit of the task a pool process is running (one at a time).

    ``armed`` is true only while task code runs, so an alarm that fires just after the task
    returned does nothing. While ``hold`` is set (the process is sending a message from a signal
    handler), the alarm is postponed a little instead of interrupting that send.
    """

    #: seconds a postponed alarm waits before firing again
    RETRY = 0.01

    def __init__(self):
        self.armed = False
        self.hold = False
        self.seconds = None

    def install(self):
        signal.signal(signal.SIGALRM, self._fire)

    def arm(self, seconds):
        self.seconds = seconds
        self.armed = True
        if seconds:
            signal.setitimer(signal.ITIMER_REAL, seconds)

    def disarm(self):
        self.armed = False
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _fire(self, signum, frame):
        if not self.armed:
            return
        if self.hold:
            signal.setitimer(signal.ITIMER_REAL, self.RETRY)
            return
        self.armed = False
        raise SoftTimeLimitExceeded(f"soft time limit ({self.seconds:g}s) exceeded")


def failure(token, header, exc, started):
    """The result header (dict) and payload of a task that failed with ``exc``."""
    body, meta = serialize.dumps_exception(exc)
    done = time.time()
    result = {"id": header.get("id"), "token": token, "task": header.get("task"),
              "state": states.FAILURE, **meta,
              "date_done": done, "runtime": round(done - started, 6), "pid": os.getpid()}
    return result, body


def time_limit_result(token, task_id, task_name, limit, started, pid):
    """(result header frame, payload frame) for a task killed at its hard limit; built by the
    supervisor, which settles it through the broker like a pool process's RESULT."""
    exc = TimeLimitExceeded(f"task {task_name} exceeded its time limit of {limit:g}s; "
                            f"pool process {pid} was killed")
    body, meta = serialize.dumps_exception(exc)
    done = time.time()
    result = {"id": task_id, "token": token, "task": task_name, "state": states.FAILURE, **meta,
              "date_done": done, "runtime": round(done - started, 6) if started else None,
              "pid": pid}
    return P.encode(result), body


def memory_kib(process):
    """Resident set size of a ``psutil.Process`` in KiB (Celery's unit for the memory limit)."""
    return process.memory_info().rss // 1024
