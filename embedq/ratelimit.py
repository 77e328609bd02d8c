"""Global rate limits per task type, kept by the broker (pure logic: the clock is an argument).

Celery enforces ``rate_limit`` in each worker separately, so ten workers run a "10/m" task 100
times a minute. embedq's broker is the only dispatcher, so one limiter here is global.

The rule: tasks of a rate-limited type start at least ``1 / rate`` seconds apart (a token
bucket of capacity one, as Celery's). A task taken from its queue too early is not put back at
the head of the queue to be looked at again every iteration: it is *scheduled* for the next free
slot, and that slot is reserved for it. A queue of 10,000 tasks limited to 10/s thus costs one
pass, after which each task comes due exactly when it may run.

The broker commits each type's next free start with the dispatch that moved it, and starts from
those after a restart, so a restart does not reset a limit ("5/h" stays 5 an hour). The
reservations themselves are memory only: after a restart, waiting tasks take fresh slots.
"""

import re

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
#: A reserved slot counts as reached this early (the loop may wake a little before it).
SLOT_TOLERANCE = 0.001


def parse_rate(value):
    """``"100/s" | "10/m" | "5/h" | 7.5`` (per second, as Celery) -> tasks per second, or None
    for no limit (None, 0, "0"). Raises ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
    else:
        match = _RATE.match(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError(f"rate_limit must look like '100/s', '10/m' or '5/h', not {value!r}")
        rate = float(match.group(1)) / _PER[match.group(2)]
    if rate < 0 or rate != rate or rate == float("inf"):
        raise ValueError(f"rate_limit must be a finite number >= 0, not {value!r}")
    return rate or None


class RateLimiter:
    """Next free start time per task name, and slots promised to tasks sent back to wait."""

    def __init__(self, next_free=None):
        #: task name -> earliest start of the next task of that name (the broker persists it)
        self.next_free = dict(next_free or {})
        self.reserved = {}       # task id -> the slot it was promised

    def admit(self, task_id, name, rate, now):
        """None if the task may start now; else the time it must wait for (a reserved slot)."""
        slot = self.reserved.pop(task_id, None)
        if slot is not None and now >= slot - SLOT_TOLERANCE:
            return None  # its slot came: already accounted for in next_free
        if slot is not None:
            self.reserved[task_id] = slot
            return slot
        interval = 1.0 / rate
        free = self.next_free.get(name, 0.0)
        if now >= free:
            self.next_free[name] = now + interval
            return None
        self.next_free[name] = free + interval
        self.reserved[task_id] = free
        return free

    def forget(self, task_id):
        self.reserved.pop(task_id, None)
