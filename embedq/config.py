"""Settings, under Celery's names, and the only place embedq reads environment variables.

``app.conf`` is a :class:`Settings`. Unknown names are kept (so a Celery config module loads
unchanged) but only the names in :data:`DEFAULTS` have an effect; ``Settings.unused()`` lists the
rest so a port can see what embedq ignores.
"""

import os
from pathlib import Path

DURABILITY_MODES = ("fsync", "process")

DEFAULTS = {
    #: Where clients and workers reach the broker, e.g. ``tcp://127.0.0.1:5555`` or ``ipc:///tmp/eq``.
    "broker_url": None,
    #: ``fsync``: an accepted task survives power loss (each group commit is fsynced).
    #: ``process``: it survives any process crash; the OS flushes to disk in its own time.
    "broker_durability": "fsync",
    #: The broker's LMDB directory (``data_dir`` of ``embedq.start`` overrides it).
    "broker_data_dir": None,
    #: Cap on the LMDB map; at the cap submits fail with ``StorageFull``.
    "broker_max_store_size": 4 << 30,
    #: Largest message the broker accepts; bigger ones are dropped by ZeroMQ before parsing.
    "broker_max_message_size": 64 << 20,
    #: Seconds between heartbeats, broker <-> worker node.
    "broker_heartbeat": 0.5,
    #: Missed heartbeats before a peer is declared dead (eviction after heartbeat * liveness).
    "broker_heartbeat_liveness": 3,
    #: Seconds a client waits for the broker to acknowledge a submit before BrokerUnavailable.
    "broker_connection_timeout": 30.0,
    #: Seconds of silence after which a client re-sends an unanswered request (safe: ids dedupe).
    "broker_resend_interval": 1.0,
    #: Seconds a stored result lives (Celery's default: one day). None keeps results forever.
    "result_expires": 86400.0,
    #: Queue for tasks with no route.
    "task_default_queue": "celery",
    #: Routes by task name (dict, globs, router functions): see embedq/routing.py.
    "task_routes": None,
    #: Priority of tasks that set none (0..255, higher runs sooner; None is 0).
    "task_default_priority": None,
    #: Report STARTED when a pool process begins a task (costs one message per task).
    "task_track_started": False,
    #: A task whose worker died this many times while running it becomes a dead letter.
    "broker_max_redeliveries": 5,
    #: Pool processes per worker node (default: CPU count).
    "worker_concurrency": None,
    #: Each pool process holds at most this many tasks (one running, the rest prefetched), so a
    #: node holds concurrency * multiplier, as in Celery (whose default is also 4).
    "worker_prefetch_multiplier": 4,
    #: Hard time limit (seconds) of tasks that set none: the pool process running a task past it
    #: is killed and replaced, and the task fails with TimeLimitExceeded. None: no limit.
    "task_time_limit": None,
    #: Soft time limit (seconds) of tasks that set none: SoftTimeLimitExceeded is raised inside
    #: the task so it can clean up. None: no limit.
    "task_soft_time_limit": None,
    #: A pool process is replaced after running this many tasks (None: never), as in Celery.
    "worker_max_tasks_per_child": None,
    #: A pool process whose resident memory exceeds this many KiB after a task is replaced
    #: (the task that crossed the line completes normally). None: no limit.
    "worker_max_memory_per_child": None,
    #: Warm shutdown (first SIGTERM/SIGINT): seconds running tasks get to finish before the
    #: pool is killed and their leases handed back (Celery's name). 0: no time, a cold shutdown
    #: at once; None: wait however long they take (Celery's plain warm shutdown).
    "worker_soft_shutdown_timeout": 10.0,
    #: Autoscale (``--autoscale max,min``): seconds a pool process must have been idle before
    #: it is retired (Celery's AUTOSCALE_KEEPALIVE).
    "worker_autoscale_idle": 30.0,
    #: Schedules and crontab are evaluated in this zone.
    "timezone": "UTC",
    #: Periodic tasks, in Celery's format: {"name": {"task", "schedule", "args", "kwargs",
    #: "options"}} plus embedq's "policy" for missed runs ("skip", "once", "all").
    "beat_schedule": {},
}

_ENVIRONMENT = {
    "EMBEDQ_BROKER_URL": "broker_url",
    "EMBEDQ_DURABILITY": "broker_durability",
    "EMBEDQ_DATA_DIR": "broker_data_dir",
}


class Settings:
    """Attribute and mapping access to settings: ``conf.result_expires``, ``conf["timezone"]``.

    The values live in the instance's ``__dict__``, so ``conf.name`` is a plain attribute read
    (several happen in every ``delay()``) rather than a failed lookup that falls back to
    ``__getattr__``."""

    def __init__(self, **overrides):
        # mutable defaults (beat_schedule) are copied: apps must not share one dict
        self.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in DEFAULTS.items()})
        self.update(overrides)

    @property
    def _values(self):
        return self.__dict__

    @classmethod
    def from_environment(cls, environ=None, **overrides):
        environ = os.environ if environ is None else environ
        found = {key: environ[var] for var, key in _ENVIRONMENT.items() if environ.get(var)}
        found.update(overrides)
        return cls(**found)

    def update(self, mapping=None, **kwargs):
        for key, value in {**(mapping or {}), **kwargs}.items():
            self[key] = value

    def __getattr__(self, name):  # only for names that are not set
        raise AttributeError(f"no setting named {name!r}")

    def __setattr__(self, name, value):
        self[name] = value

    def __getitem__(self, name):
        return self._values[name]

    def __setitem__(self, name, value):
        if name == "broker_durability" and value not in DURABILITY_MODES:
            raise ValueError(f"broker_durability must be one of {DURABILITY_MODES}, not {value!r}")
        if hasattr(Settings, name):  # it would hide a method of this class
            raise ValueError(f"{name!r} cannot be a setting name (it is a method of Settings)")
        self._values[name] = value

    def get(self, name, default=None):
        return self._values.get(name, default)

    def as_dict(self):
        return dict(self._values)

    def unused(self):
        return sorted(set(self._values) - set(DEFAULTS))

    def __repr__(self):
        return f"Settings({self._values!r})"


def default_data_dir(app_name):
    """Per-app directory under ``$XDG_DATA_HOME`` so a restarted script finds its unfinished tasks."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return str(Path(base) / "embedq" / (app_name or "default"))


def default_concurrency():
    return os.cpu_count() or 1
