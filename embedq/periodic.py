"""Periodic tasks, client side: declare entries, register them with the broker, manage them.

Entries come from ``app.conf.beat_schedule`` (Celery's format) and ``app.add_periodic_task``.
The broker runs the scheduler (``beat.py``); this module turns each entry into what the broker
needs to enqueue a run without ever unpickling anything: the task header template (the JSON
``Task.build_message`` makes, without id and eta), the pickled (args, kwargs) payload, the
schedule as a dict and the missed-run policy. ``app.beat.sync()`` sends them all in one BEAT
request; ``embedq.start()`` and ``python -m embedq.worker`` call it for you.
"""

import logging
import threading
from datetime import timedelta
from typing import Any, NamedTuple

from . import protocol as P
from .beat import MAX_ENTRY_NAME, from_us
from .missed_runs import MISSED_RUN_POLICIES
from .schedules import as_schedule, crontab

log = logging.getLogger(__name__)

#: Missed-run policy of entries that do not name one (see missed_runs.due_runs).
DEFAULT_POLICY = "skip"
#: Options that make no sense for a periodic run (each run is enqueued when its slot comes).
_REFUSED_OPTIONS = ("countdown", "eta", "task_id")


class Entry(NamedTuple):
    """One declared periodic entry, as the application wrote it."""

    name: str
    schedule: Any
    task: str
    args: tuple
    kwargs: dict
    options: dict
    policy: str


class PeriodicTasks:
    """``app.beat``: this app's periodic entries and the broker's view of them."""

    def __init__(self, app):
        self.app = app
        #: entries from add_periodic_task / @app.periodic_task (beat_schedule is read at sync)
        self.added = {}

    # -- declaring -------------------------------------------------------------------------
    def add(self, schedule, sig, args=None, kwargs=None, name=None, policy=None, **options):
        """Celery's ``add_periodic_task``: ``sig`` is a Task, a task name, or anything with
        ``.task``/``.name``, ``.args``, ``.kwargs``, ``.options`` (a future Signature)."""
        task_name, sig_args, sig_kwargs, sig_options = _unpack(sig)
        args = tuple(sig_args if args is None else args)
        kwargs = dict(sig_kwargs if kwargs is None else kwargs)
        options = {**sig_options, **options}
        name = name or f"{task_name}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"
        entry = _entry(name, {"task": task_name, "schedule": schedule, "args": args,
                              "kwargs": kwargs, "options": options, "policy": policy})
        self.added[name] = entry
        return name

    def declared(self):
        """Every entry of this app: ``beat_schedule`` first, then ``add_periodic_task``'s."""
        entries = {name: _entry(name, spec) for name, spec in (self.app.conf.get("beat_schedule") or {}).items()}
        entries.update(self.added)
        return entries

    def messages(self):
        """(entry JSON, payload) frame pairs of a BEAT add request."""
        frames = []
        for entry in self.declared().values():
            frames += build(self.app, entry)
        return frames

    # -- talking to the broker -------------------------------------------------------------
    def sync(self, client=None):
        """Register (or update) every declared entry with the broker; return their names.

        An entry whose schedule is unchanged keeps its last and next run, so re-registering
        (every worker start does) never fires a slot twice or resets an interval's rhythm.
        """
        frames = self.messages()
        if frames:
            _request(client or self.app.client, {"op": "add"}, frames)
        return list(self.declared())

    def list(self, client=None):
        """The broker's entries: dicts with name, task, schedule, policy, args, kwargs, queue,
        paused, error, runs, and last_run/next_run as aware UTC datetimes (or None)."""
        reply = _request(client or self.app.client, {"op": "list"})
        return [_with_datetimes(entry) for entry in reply.get("entries", [])]

    def pause(self, name, client=None):
        """Stop firing ``name`` (kept in the store; a paused entry stays paused on re-sync)."""
        self._change("pause", name, client)

    def resume(self, name, client=None):
        """Fire ``name`` again from its next slot (slots passed while paused are not made up)."""
        self._change("resume", name, client)

    def remove(self, name, client=None):
        """Delete ``name`` from the broker (a later sync that declares it adds it again)."""
        self._change("remove", name, client)
        self.added.pop(name, None)

    def _change(self, op, name, client):
        reply = _request(client or self.app.client, {"op": op, "names": [name]})
        if reply.get("missing"):
            raise KeyError(f"no periodic entry named {name!r}")


def _request(client, control, frames=()):
    conn = client.connection()
    req = next(client.requests)
    message = [P.PROTOCOL, P.BEAT, P.encode({**control, "req": req}), *frames]
    return conn.request(message, req, client.connection_timeout)


def _unpack(sig):
    """(task name, args, kwargs, options) of whatever add_periodic_task was given."""
    if isinstance(sig, str):
        return sig, (), {}, {}
    from .task import Task

    if isinstance(sig, Task):
        return sig.name, (), {}, {}
    task = getattr(sig, "task", None) or getattr(sig, "name", None)
    task = getattr(task, "name", task)  # .task may be a Task object or a name
    if not isinstance(task, str):
        raise TypeError(f"cannot schedule {sig!r}: expected a Task, a task name, or an object "
                        "with .task (or .name), .args, .kwargs, .options")
    return (task, tuple(getattr(sig, "args", None) or ()), dict(getattr(sig, "kwargs", None) or {}),
            dict(getattr(sig, "options", None) or {}))


def _entry(name, spec):
    """A validated Entry from a beat_schedule item (Celery's keys plus "policy")."""
    if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_ENTRY_NAME:
        raise ValueError(f"periodic entry name {name!r}: 1 to {MAX_ENTRY_NAME} bytes of text")
    task = spec.get("task")
    task = getattr(task, "name", task)
    if not isinstance(task, str):
        raise ValueError(f"periodic entry {name!r}: 'task' must be a task name")
    policy = spec.get("policy") or DEFAULT_POLICY
    if policy not in MISSED_RUN_POLICIES:
        raise ValueError(f"periodic entry {name!r}: policy {policy!r} is not one of {MISSED_RUN_POLICIES}")
    options = dict(spec.get("options") or {})
    refused = [key for key in _REFUSED_OPTIONS if key in options]
    if refused:
        raise ValueError(f"periodic entry {name!r}: options {refused} do not apply to periodic runs")
    return Entry(name, as_schedule(spec.get("schedule")), task, tuple(spec.get("args") or ()),
                 dict(spec.get("kwargs") or {}), options, policy)


def build(app, entry):
    """(entry JSON, payload): everything the broker needs to enqueue runs of ``entry``."""
    schedule = entry.schedule
    if isinstance(schedule, crontab) and not schedule.tz_given:  # Celery: the app's timezone
        fields = {k: v for k, v in schedule.to_dict().items() if k not in ("type", "tz")}
        schedule = crontab(**fields, tz=app.conf.timezone or "UTC")
    options = dict(entry.options)
    expires = options.pop("expires", None)
    if isinstance(expires, timedelta):
        expires = expires.total_seconds()
    if expires is not None and not (isinstance(expires, (int, float)) and expires > 0):
        raise ValueError(f"periodic entry {entry.name!r}: expires must be positive seconds")
    task = app.tasks.get(entry.task) or type("Task", (app.Task,), {"name": entry.task, "app": app})()
    _, header, payload = task.build_message(entry.args, entry.kwargs, task_id="-", **options)
    header = {k: v for k, v in P.decode(header).items() if k not in ("id", "eta", "expires")}
    obj = {"name": entry.name, "schedule": schedule.to_dict(), "policy": entry.policy,
           "header": header, "expires": expires, "args": repr(entry.args), "kwargs": repr(entry.kwargs)}
    return [P.encode(obj), payload]


def _with_datetimes(entry):
    for key in ("last_run", "next_run"):
        value = entry.get(key)
        entry[key] = None if value is None else from_us(round(value * 1_000_000))
    return entry


def describe(schedule_dict):
    """Short text for a stored schedule: ``every 10s`` or ``*/10 * * * * (UTC)``."""
    if schedule_dict.get("type") == "interval":
        return f"every {schedule_dict['seconds']:g}s"
    fields = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
    return " ".join(str(schedule_dict.get(f, "*")) for f in fields) + f" ({schedule_dict.get('tz')})"


def sync_in_background(app, url):
    """Register ``app``'s entries from a thread that retries until the broker answers (a worker
    node starting before its broker must not wait for it, nor give up on the schedule). The
    entries are built here, so a bad one fails the caller at once."""
    from .client import Client

    frames = app.beat.messages()
    if not frames:
        return None

    def register():
        client = Client(url, app.conf)
        try:
            while True:
                try:
                    _request(client, {"op": "add"}, frames)
                    log.info("registered %d periodic entries with the broker", len(frames) // 2)
                    return
                except TimeoutError:  # BrokerUnavailable: keep trying, quietly
                    log.warning("broker unavailable; registering periodic entries again")
        finally:
            client.close()

    thread = threading.Thread(target=register, name="embedq-beat-sync", daemon=True)
    thread.start()
    return thread
