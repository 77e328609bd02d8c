"""Schedules for periodic tasks: when should beat enqueue an entry next?

Names and semantics mirror ``celery.schedules`` so a Celery ``beat_schedule``
moves over unchanged.  Everything is pure (callers pass ``now``) so beat is
testable without sleeping, and schedules are stored by value (``to_dict()``),
never pickled, so stored entries survive code changes and cannot run code.

Cron library: ``cronsim`` (>= 2.7 for its seconds field), not ``croniter``.
  * DST: cronsim documents and tests one rule (Debian cron's, see
    ``crontab``): a 01:30 job fires once on a fall-back day.  croniter 7.0
    fires it twice (01:30 EDT and EST), double-running nightly jobs.
  * Maintenance: cronsim is one dependency-free module, "Production/Stable",
    kept exact because Healthchecks.io runs on it.  croniter pulls in
    python-dateutil and, after its author stepped away, lives on as a
    community-maintained "Beta".

Only the next-fire search is delegated: Celery's syntax is not cron's (ranges
wrap, Python sets are allowed, day_of_month AND day_of_week must both match
where cron ORs them), so parsing is ours.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, time, timedelta, timezone
from typing import Any, NamedTuple, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim

__all__ = ["crontab", "schedule", "as_schedule", "schedule_from_dict"]

UTC = timezone.utc

#: Candidates ``crontab.next_after`` may reject (repeated DST hour, weekday
#: filter) before giving up; real expressions need a handful.
_MAX_CANDIDATES = 10_000

_DAYS = "sunday monday tuesday wednesday thursday friday saturday".split()
_MONTHS = ("january february march april may june july august september "
           "october november december").split()
_DAYS_IN_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _names(names: list[str], first: int) -> dict[str, int]:
    """Full names and three-letter abbreviations, as Celery accepts."""
    return {key: i + first for i, name in enumerate(names)
            for key in (name, name[:3])}


class _Field(NamedTuple):
    low: int
    high: int           # highest canonical value
    accepted_high: int  # highest value accepted as input (day_of_week 7 = Sunday)
    names: dict[str, int]


_FIELDS = {
    "minute": _Field(0, 59, 59, {}),
    "hour": _Field(0, 23, 23, {}),
    "day_of_week": _Field(0, 6, 7, _names(_DAYS, 0)),
    "day_of_month": _Field(1, 31, 31, {}),
    "month_of_year": _Field(1, 12, 12, _names(_MONTHS, 1)),
}
_TERM = re.compile(r"(\*|[a-z0-9]+)(?:-([a-z0-9]+))?(?:/(\d+))?")


def _bad(field: str, spec: Any, detail: str) -> ValueError:
    return ValueError(f"crontab {field}={spec!r}: {detail}")


def _checked(field: str, spec: Any, value: Any) -> int:
    info = _FIELDS[field]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(field, spec, f"{value!r} is not an int")
    if not info.low <= value <= info.accepted_high:
        raise _bad(field, spec, f"{value} is outside {info.low}-{info.accepted_high}")
    return value


def _expand_term(field: str, spec: str, term: str) -> list[int]:
    """One comma-separated item: ``*``, ``a``, ``a-b``, each with ``/step``."""
    info = _FIELDS[field]
    match = _TERM.fullmatch(term)
    if not match or (match[1] == "*" and match[2]):
        raise _bad(field, spec, f"cannot parse {term!r}")
    start, end, step = match.groups()

    def number(token: str) -> int:
        value = int(token) if token.isdigit() else info.names.get(token)
        if value is None:
            raise _bad(field, spec, f"{token!r} is not a number or name")
        return _checked(field, spec, value)

    if start == "*":
        values = list(range(info.low, info.high + 1))
    elif end is not None:
        first, last = number(start), number(end)
        values = list(range(first, last + 1))
        if first > last:  # wraps, as in Celery: "fri-mon", "22-2"
            values = list(range(first, info.high + 1)) + list(range(info.low, last + 1))
    elif step is not None:  # cron's "5/15" means "5-59/15"
        values = list(range(number(start), info.high + 1))
    else:
        values = [number(start)]
    if step is not None and int(step) == 0:
        raise _bad(field, spec, "step must be at least 1")
    return values[::int(step or 1)]


def _expand(field: str, spec: Any) -> tuple[frozenset[int], str]:
    """Return the expanded set and the text to store for one field.

    Strings are stored as given (lower-cased) so stored schedules stay
    readable; other inputs as sorted lists.  Sunday 7 becomes 0.
    """
    spec = "*" if spec is None else spec  # as Celery's cronfield()
    if isinstance(spec, str):
        text = ",".join(term.strip() for term in spec.lower().split(","))
        values = []
        for term in text.split(","):
            if not term:
                raise _bad(field, spec, "empty list item")
            values += _expand_term(field, spec, term)
    elif isinstance(spec, int) and not isinstance(spec, bool):
        values, text = [spec], ""
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping)):
        values, text = list(spec), ""
    else:
        raise _bad(field, spec, "expected an int, a str or an iterable of ints")
    result = frozenset(0 if field == "day_of_week" and v == 7 else v
                       for v in (_checked(field, spec, v) for v in values))
    if not result:
        raise _bad(field, spec, "selects no values")
    return result, text or _compact(result, _FIELDS[field])


def _compact(values: frozenset[int], info: _Field) -> str:
    """Field text for a set: what to_dict stores and what cronsim parses."""
    if len(values) == info.high - info.low + 1:
        return "*"
    return ",".join(map(str, sorted(values)))


def _zone(tz: Any) -> ZoneInfo:
    name = "UTC" if tz is UTC else tz.key if isinstance(tz, ZoneInfo) else tz
    if not isinstance(name, str):  # stored by name, so it needs one
        raise ValueError(f"crontab tz={tz!r}: expected an IANA zone name")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"crontab tz={tz!r}: unknown time zone") from None


def _utc(dt: Any, what: str) -> datetime:
    if not isinstance(dt, datetime) or dt.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {dt!r}")
    return dt.astimezone(UTC)


class crontab:
    """Cron-style schedule, evaluated in time zone ``tz`` (default "UTC"; for beat entries
    without a ``tz`` of their own, the app's ``timezone`` setting, as in Celery).

    Fields take ints, iterables of ints, or strings such as ``*/15``,
    ``1-30/5``, ``1,5,9``, ``mon-fri``, ``jan``; Sunday is 0 or 7.  As in
    Celery, a day must match day_of_month AND day_of_week AND month_of_year.

    DST rule (cronsim's, copied from Debian cron).  A schedule restricted in
    both minute and hour, i.e. a job "at a time of day", follows the wall
    clock and fires at most once per wall-clock slot: a slot inside a
    spring-forward gap fires at the first instant after the gap (02:30 in New
    York -> 03:00 EDT; several slots in one gap collapse into that one run),
    and a slot in a fall-back overlap fires at its first occurrence only.
    Other schedules (every minute, ``*/15 * * * *``, hourly) follow real
    time, keeping their spacing: the repeated hour runs twice and the skipped
    hour not at all.  Debian decides by a leading "*"; we decide by the
    expanded values, so ``"*/15"`` and ``[0, 15, 30, 45]`` behave alike.
    """

    def __init__(self, minute: Any = "*", hour: Any = "*",
                 day_of_week: Any = "*", day_of_month: Any = "*",
                 month_of_year: Any = "*", tz: Union[str, ZoneInfo, None] = None):
        #: whether tz was given; beat evaluates a crontab without one in the app's timezone
        self.tz_given = tz is not None
        self.tz = _zone("UTC" if tz is None else tz)
        self._texts: dict[str, str] = {}
        for field, spec in zip(_FIELDS, (minute, hour, day_of_week,
                                         day_of_month, month_of_year)):
            values, self._texts[field] = _expand(field, spec)
            setattr(self, field, values)
        if not any(day <= _DAYS_IN_MONTH[month] for month in self.month_of_year
                   for day in self.day_of_month):
            raise ValueError(f"crontab never fires: no month in month_of_year="
                             f"{self._texts['month_of_year']!r} has a day in "
                             f"day_of_month={self._texts['day_of_month']!r}")
        self._cron_expr, self._filter_weekday = self._cronsim_expression()

    def _cronsim_expression(self) -> tuple[str, bool]:
        minute, hour, dow, dom, month = (_compact(getattr(self, field), info)
                                         for field, info in _FIELDS.items())
        # cronsim ORs two restricted day fields; to AND them it searches
        # day_of_month only and next_after() drops days of other weekdays.
        filter_weekday = dom != "*" and dow != "*"
        expr = f"{minute} {hour} {dom} {month} {'*' if filter_weekday else dow}"
        # cronsim applies its wall-clock DST rule to 5-field expressions whose
        # minute and hour do not start with "*"; the 6-field form (leading
        # seconds) opts out and follows real time.
        if minute == "*" or hour == "*":
            expr = "0 " + expr
        return expr, filter_weekday

    @classmethod
    def from_string(cls, expr: str, tz: Union[str, ZoneInfo, None] = None) -> crontab:
        """Parse standard cron order: minute hour day_of_month month day_of_week."""
        fields = expr.split() if isinstance(expr, str) else []
        if len(fields) != 5:
            raise ValueError(f"crontab expression {expr!r}: expected 5 fields "
                             "(minute hour day_of_month month_of_year day_of_week)")
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        return cls(minute, hour, day_of_week, day_of_month, month_of_year, tz)

    def next_after(self, dt: datetime, anchor: datetime | None = None) -> datetime:
        """First fire time strictly after aware ``dt``, as an aware UTC datetime.

        ``anchor`` exists so callers can treat every schedule alike; cron slots
        are fixed on the calendar, so it is ignored.
        """
        after = _utc(dt, "dt")
        candidates = CronSim(self._cron_expr, after.astimezone(self.tz))
        for _ in range(_MAX_CANDIDATES):
            candidate = next(candidates, None)
            if candidate is None:
                break
            # A wall-clock slot repeated by a fall-back fired at its first
            # occurrence, which may lie before `dt`.
            if candidate.astimezone(UTC) <= after:
                continue
            if (self._filter_weekday
                    and candidate.isoweekday() % 7 not in self.day_of_week):
                end_of_day = datetime.combine(candidate.date(), time(23, 59, 59),
                                              tzinfo=self.tz)
                candidates = CronSim(self._cron_expr, end_of_day)
                continue
            return candidate.astimezone(UTC)
        raise ValueError(f"{self!r} found no fire time after {dt}")

    def to_dict(self) -> dict[str, str]:
        return {"type": "crontab", **self._texts, "tz": self.tz.key}

    def _key(self) -> tuple:
        return (*(getattr(self, field) for field in _FIELDS), self.tz.key)

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, crontab) \
            else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._texts.items())
        return f"crontab({fields}, tz={self.tz.key!r})"


class schedule:
    """Fixed interval of ``run_every`` (seconds or a timedelta, > 0).

    Slots are ``anchor + k * run_every`` (k >= 0), computed in UTC so DST
    never stretches an interval, and anchored so a restarted beat keeps its
    rhythm instead of drifting by its downtime.
    """

    def __init__(self, run_every: Union[float, timedelta]):
        every = run_every
        if isinstance(every, (int, float)) and not isinstance(every, bool) \
                and math.isfinite(every):
            every = timedelta(seconds=every)
        if not isinstance(every, timedelta) or every <= timedelta(0):
            raise ValueError(f"schedule run_every={run_every!r}: must be "
                             "positive seconds or timedelta (>= 1 microsecond)")
        self.run_every: timedelta = every

    @property
    def seconds(self) -> float:
        return self.run_every.total_seconds()

    def next_after(self, dt: datetime, anchor: datetime | None = None) -> datetime:
        """First slot strictly after aware ``dt``, as an aware UTC datetime.

        Without ``anchor`` slots are anchored at ``dt`` (Celery's "last run +
        interval"); pass the entry's first start so restarts keep the grid.
        """
        after = _utc(dt, "dt")
        if anchor is None:
            return after + self.run_every
        start = _utc(anchor, "anchor")
        if after < start:
            return start
        return start + ((after - start) // self.run_every + 1) * self.run_every

    def to_dict(self) -> dict[str, Any]:
        return {"type": "interval", "seconds": self.seconds}

    def __eq__(self, other: object) -> bool:
        return self.run_every == other.run_every if isinstance(other, schedule) \
            else NotImplemented

    def __hash__(self) -> int:
        return hash(self.run_every)

    def __repr__(self) -> str:
        return f"schedule(run_every={self.seconds!r})"


Schedule = Union[crontab, schedule]


def as_schedule(value: Any) -> Schedule:
    """What ``beat_schedule[name]["schedule"]`` may hold; numbers are seconds."""
    if isinstance(value, (crontab, schedule)):
        return value
    if isinstance(value, (int, float, timedelta)) and not isinstance(value, bool):
        return schedule(value)
    raise TypeError(f"cannot use {value!r} as a schedule: expected seconds, "
                    "a timedelta, a crontab or a schedule")


def schedule_from_dict(data: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from ``to_dict()`` output (as stored in LMDB).

    Unknown keys are errors: a misspelt field silently becoming "*" would
    turn a daily job into a per-minute one.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"schedule dict expected, got {data!r}")
    kind = data.get("type")
    allowed = {"interval": {"type", "seconds"},
               "crontab": {"type", "tz", *_FIELDS}}.get(kind)
    if allowed is None:
        raise ValueError(f"unknown schedule type {kind!r} in {dict(data)!r}")
    if set(data) - allowed:
        raise ValueError(f"unknown {kind} schedule keys {sorted(set(data) - allowed)}")
    if kind == "crontab":
        return crontab(**{k: v for k, v in data.items() if k != "type"})
    if "seconds" not in data:
        raise ValueError(f"interval schedule without seconds: {dict(data)!r}")
    return schedule(data["seconds"])
