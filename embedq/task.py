"""Task: a named function plus default options, callable locally or sent to the broker.

Mirrors ``celery.Task``: ``@app.task`` builds a subclass whose ``run`` is the function, so
``base=`` and class-based tasks work as in Celery. A task is sent by *name*; the worker looks the
name up in its own app, which is why the worker must import the module that defines the task.
"""

import math
import threading
import time
import uuid

from . import protocol as P
from . import serialize


class Request:
    """What a running task knows about its own delivery (``self.request`` in bound tasks)."""

    def __init__(self, header=None, args=(), kwargs=None):
        header = header or {}
        self.id = header.get("id")
        self.task = header.get("task")
        self.args = args
        self.kwargs = kwargs or {}
        self.retries = header.get("retries", 0)
        self.eta = header.get("eta")
        self.expires = header.get("expires")
        self.priority = header.get("priority", 0)
        self.delivery_info = {"queue": header.get("queue"), "priority": self.priority}
        self.called_directly = not header

    def __repr__(self):
        return f"<Request {self.task}[{self.id}]>"


class Task:
    """Base class for tasks. Class attributes are the defaults for every call."""

    name = None
    app = None
    #: Celery's: pass the task instance as ``self`` to the function.
    bind = False
    queue = None
    priority = None
    #: Do not push the result to the caller (it is still stored).
    ignore_result = False
    #: Seconds from submit after which the task is not run (Celery's ``expires``).
    expires = None
    #: Hard limit, seconds of run time: the pool process is killed and the task fails with
    #: TimeLimitExceeded. None: the worker's default (``--time-limit``, ``task_time_limit``).
    time_limit = None
    #: Soft limit, seconds: SoftTimeLimitExceeded is raised inside the task. None: the worker's
    #: default (``--soft-time-limit``, ``task_soft_time_limit``).
    soft_time_limit = None

    _fun = None

    def __init__(self):
        self._local = threading.local()

    # -- running -------------------------------------------------------------------------------
    def run(self, *args, **kwargs):
        if self._fun is None:
            raise NotImplementedError("Task subclasses must define run()")
        return self._fun(self, *args, **kwargs) if self.bind else self._fun(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        """Run in this process, now (as Celery does); no broker involved."""
        return self.run(*args, **kwargs)

    @property
    def request(self):
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else Request()

    def run_with_request(self, header, args, kwargs):
        """Used by pool processes: run with ``self.request`` describing this delivery."""
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(Request(header, args, kwargs))
        try:
            return self.run(*args, **kwargs)
        finally:
            stack.pop()

    # -- sending -------------------------------------------------------------------------------
    def delay(self, *args, **kwargs):
        """``apply_async(args, kwargs)``: returns once the broker has committed the task."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args=None, kwargs=None, task_id=None, *, countdown=None, eta=None,
                    expires=None, queue=None, priority=None, ignore_result=None, time_limit=None,
                    soft_time_limit=None, **options):
        message = self.build_message(
            args, kwargs, task_id=task_id, countdown=countdown, eta=eta, expires=expires,
            queue=queue, priority=priority, ignore_result=ignore_result, time_limit=time_limit,
            soft_time_limit=soft_time_limit, **options)
        return self.app.send_messages([message])[0]

    def build_message(self, args=None, kwargs=None, task_id=None, *, countdown=None, eta=None,
                      expires=None, queue=None, priority=None, ignore_result=None, time_limit=None,
                      soft_time_limit=None, **options):
        """(task id, header JSON, payload) for one call, with Celery's option names and meanings."""
        now = time.time()
        if countdown is not None:
            eta = now + countdown
        elif eta is not None and hasattr(eta, "timestamp"):
            eta = eta.timestamp()
        expires = self.expires if expires is None else expires
        if expires is not None:
            expires = expires.timestamp() if hasattr(expires, "timestamp") else now + expires
        payload, codec = serialize.dumps((tuple(args or ()), dict(kwargs or {})))
        if ignore_result is None:
            ignore_result = self.ignore_result
        task_id = task_id or str(uuid.uuid4())
        header = {
            "id": task_id,
            "task": self.name,
            "queue": queue or self.queue or self.app.conf.task_default_queue,
            "priority": self.priority if priority is None else priority,
            "eta": eta,
            "expires": expires,
            "notify": not ignore_result,
            "codec": codec,
            # per call, else per task; absent: the worker applies its own default
            "time_limit": check_time_limit(self.time_limit if time_limit is None else time_limit,
                                           "time_limit"),
            "soft_time_limit": check_time_limit(
                self.soft_time_limit if soft_time_limit is None else soft_time_limit, "soft_time_limit"),
        }
        if codec == serialize.CLOUDPICKLE:
            header["py"] = serialize.PYTHON_VERSION
        if options:
            header["options"] = options
        return task_id, P.encode({k: v for k, v in header.items() if v is not None}), payload

    def AsyncResult(self, task_id):  # noqa: N802 - Celery's name
        return self.app.AsyncResult(task_id)

    def __reduce__(self):
        return (_task_by_name, (self.app, self.name))

    def __repr__(self):
        return f"<@task: {self.name}>"


def check_time_limit(value, field):
    """None, or a positive finite number of seconds (ValueError otherwise, at the call site)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{field} must be a positive number of seconds, not {value!r}")
    return value


def _task_by_name(app, name):
    return app.tasks[name]
