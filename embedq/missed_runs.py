"""Missed runs: which slots of a schedule to enqueue after beat was down or late. Pure.

Kept apart from ``schedules`` (when does an entry fire?) because this is a policy over a
schedule's slots (what to do about the ones nobody enqueued), decided per beat entry.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from .schedules import _utc, as_schedule, schedule

__all__ = ["due_runs", "DueRuns", "MISSED_RUN_POLICIES", "DEFAULT_SKIP_TOLERANCE",
           "DEFAULT_CATCH_UP_LIMIT"]

#: Accepted ``due_runs(policy=...)`` values; see its docstring.
MISSED_RUN_POLICIES = ("skip", "once", "all")
#: How late a slot may be noticed and still run under policy "skip": covers
#: beat's wake-up jitter and a busy loop, not an outage.
DEFAULT_SKIP_TOLERANCE = timedelta(seconds=5)
#: Most fire times one ``due_runs(policy="all")`` call returns; later calls
#: return the rest, so one call after a long outage cannot flood the queue.
DEFAULT_CATCH_UP_LIMIT = 1000
#: First look-back window when searching for the newest missed slot; doubled
#: until it holds one, so a year-long outage costs ~25 probes, not a walk.
_FIRST_LOOKBACK = timedelta(seconds=1)


class DueRuns(NamedTuple):
    """Result of ``due_runs``."""

    fire_times: list[datetime]  #: enqueue these now, oldest first (aware UTC)
    next_run: datetime          #: earliest slot not handled yet: sleep until it
    last_run: datetime          #: persist; pass back as ``last_run`` next time


def due_runs(sched: Any, last_run: datetime | None, now: datetime,
             policy: str = "once", *, anchor: datetime | None = None,
             limit: int = DEFAULT_CATCH_UP_LIMIT,
             tolerance: timedelta = DEFAULT_SKIP_TOLERANCE) -> DueRuns:
    """Decide which slots in ``(last_run, now]`` to enqueue under ``policy``.

    ``last_run`` is the last slot handled (the returned ``last_run``), not
    when it was enqueued, so lateness never shifts the grid; it also covers
    skipped slots, so they are not reconsidered.  ``None`` means a new entry,
    which has missed nothing (Celery, too, waits for its next slot).

    Policies for slots missed while beat was down or busy:
      * "skip": none; only the newest slot, if at most ``tolerance`` old
        (beat is merely late).  For jobs whose stale runs are useless.
      * "once": one run, for the newest missed slot.  For jobs that bring
        things up to date whatever was missed.
      * "all": each missed slot, oldest first, at most ``limit`` per call.
        For jobs that process per-period data.  Past ``limit``, ``next_run``
        is already due, so the backlog drains over successive calls.

    ``anchor`` pins an interval's grid (``schedule.next_after``); without it
    an interval is anchored at ``last_run``.  Crontabs ignore it.
    """
    sched = as_schedule(sched)
    if policy not in MISSED_RUN_POLICIES:
        raise ValueError(f"policy={policy!r}: expected one of {MISSED_RUN_POLICIES}")
    if limit < 1:
        raise ValueError(f"limit={limit!r}: must be at least 1")
    if tolerance < timedelta(0):
        raise ValueError(f"tolerance={tolerance!r}: must not be negative")
    now = _utc(now, "now")
    if last_run is None:
        return DueRuns([], sched.next_after(now, anchor), now)
    last_run = _utc(last_run, "last_run")
    if anchor is None and isinstance(sched, schedule):
        anchor = last_run

    def slot_after(moment: datetime) -> datetime:
        return sched.next_after(moment, anchor)

    if policy == "all":
        fire_times: list[datetime] = []
        cursor = last_run
        while len(fire_times) < limit and (slot := slot_after(cursor)) <= now:
            fire_times.append(slot)
            cursor = slot
        return DueRuns(fire_times, slot_after(cursor), cursor)
    newest = _newest_slot(slot_after, last_run, now)
    if newest is None:
        return DueRuns([], slot_after(last_run), last_run)
    runs = policy == "once" or now - newest <= tolerance
    return DueRuns([newest] if runs else [], slot_after(newest), newest)


def _newest_slot(slot_after: Callable[[datetime], datetime],
                 after: datetime, upto: datetime) -> datetime | None:
    """Newest slot in ``(after, upto]``, or None.

    Gallops back from ``upto``, then bisects: walking every missed slot of a
    short interval after a long outage would take millions of steps.
    """
    if slot_after(after) > upto:
        return None
    low, high = after, upto  # low < newest <= high; no slot in (high, upto]
    window = _FIRST_LOOKBACK
    while True:
        slot = slot_after(low)
        if slot_after(slot) > upto:
            return slot
        if upto - window > low:
            probe = upto - window
            window *= 2
        else:
            probe = low + (high - low) / 2
        if slot_after(probe) <= upto:
            low = probe
        else:
            high = probe
