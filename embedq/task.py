"""Task: a named function plus default options, callable locally or sent to the broker.

Mirrors ``celery.Task``: ``@app.task`` builds a subclass whose ``run`` is the function, so
``base=`` and class-based tasks work as in Celery. A task is sent by *name*; the worker looks the
name up in its own app, which is why the worker must import the module that defines the task.
"""

import json
import math
import threading
import time

from . import protocol as P
from . import serialize
from .errors import Retry
from .ratelimit import parse_rate
from .retries import autoretry_countdown, retry_signal, wants_autoretry


class Request:
    """What a running task knows about its own delivery (``self.request`` in bound tasks)."""

    def __init__(self, header=None, args=(), kwargs=None, report=None):
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
        #: sends a non-final state of this delivery to the broker (set by the pool process)
        self.report = report

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
    #: (settings, header JSON after the id) of the last call without options (_plain_message)
    _header_cache = None
    #: Soft limit, seconds: SoftTimeLimitExceeded is raised inside the task. None: the worker's
    #: default (``--soft-time-limit``, ``task_soft_time_limit``).
    soft_time_limit = None
    #: Retries: as Celery's (see retries.py).
    max_retries = 3
    default_retry_delay = 180
    autoretry_for = ()
    dont_autoretry_for = ()
    retry_kwargs = {}
    retry_backoff = False
    retry_backoff_max = 600
    retry_jitter = True
    #: ``"100/s" | "10/m" | "5/h"``: enforced by the broker across all workers (not per worker).
    rate_limit = None
    #: True (default): ack after the run, redeliver if the worker dies. False: at most once.
    acks_late = True
    #: None/True: a task whose worker died is redelivered (embedq's default, dead-lettered after
    #: ``broker_max_redeliveries``); False: it fails with WorkerLostError instead.
    reject_on_worker_lost = None
    #: Report STARTED when a pool process begins the task (None: ``task_track_started``).
    track_started = None

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
        if not stack:
            return Request()
        if type(stack[-1]) is tuple:  # built on first use: most tasks never look
            stack[-1] = Request(*stack[-1])
        return stack[-1]

    def run_with_request(self, header, args, kwargs, report=None):
        """Used by pool processes: run with ``self.request`` describing this delivery."""
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append((header, args, kwargs, report))  # a Request once asked for (see request)
        try:
            return self.run(*args, **kwargs)
        except Retry:
            raise
        except Exception as exc:
            if not wants_autoretry(self, exc):
                raise
            options = {"countdown": autoretry_countdown(self, self.request.retries), **self.retry_kwargs}
            raise self.retry(exc=exc, **options) from exc
        finally:
            stack.pop()

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None,
              max_retries=None, **options):
        """End this run and have the broker run the task again later (Celery's ``retry``).

        Raises :class:`Retry` (``throw=False`` returns it), or, with no retries left, ``exc``
        (else ``MaxRetriesExceededError``) so that the task fails with it."""
        request = self.request
        if request.called_directly:
            raise exc if exc is not None else RuntimeError("retry() outside a worker: the task was called directly")
        signal = retry_signal(request, exc, countdown, eta,
                              self.max_retries if max_retries is None else max_retries,
                              self.default_retry_delay, time.time())
        if isinstance(signal, Retry) and (args is not None or kwargs is not None):
            signal.new_args = (tuple(request.args if args is None else args),
                               dict(request.kwargs if kwargs is None else kwargs))
        if not throw and isinstance(signal, Retry):
            return signal
        raise signal

    def update_state(self, task_id=None, state=None, meta=None):
        """Show a custom state (e.g. ``"PROGRESS"``) with JSON ``meta`` while this task runs."""
        request = self.request
        if task_id not in (None, request.id) or request.report is None:
            raise ValueError("update_state works for the running task's own id, inside a worker")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"update_state meta must be JSON-serialisable: {exc}") from None
        request.report(state, meta)

    # -- sending -------------------------------------------------------------------------------
    def delay(self, *args, **kwargs):
        """``apply_async(args, kwargs)``: returns once the broker has committed the task."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args=None, kwargs=None, task_id=None, *, countdown=None, eta=None,
                    expires=None, queue=None, priority=None, ignore_result=None, **options):
        """Submit one call. Options as Celery's, including ``time_limit`` and ``soft_time_limit``
        (seconds; they override the task's own)."""
        if options.get("link") is not None or options.get("link_error") is not None:
            return self.signature(args, kwargs, task_id=task_id, countdown=countdown, eta=eta,
                                  expires=expires, queue=queue, priority=priority,
                                  ignore_result=ignore_result, **options).apply_async()
        if (countdown is None and eta is None and expires is None and queue is None and priority is None
                and ignore_result is None and not options and self.expires is None):
            message = self._plain_message(args, kwargs, task_id)  # delay()
        else:
            message = self.build_message(
                args, kwargs, task_id=task_id, countdown=countdown, eta=eta, expires=expires,
                queue=queue, priority=priority, ignore_result=ignore_result, **options)
        return self.app.send_messages([message])[0]

    def build_message(self, *args, **options):
        """(task id, header JSON, payload) for one call, with Celery's option names and meanings."""
        task_id, header, payload = self.build_header(*args, **options)
        return task_id, P.encode(header), payload

    def _plain_message(self, args, kwargs, task_id):
        """``build_message`` of a call without options (``delay``). Its header, but for
        the id, is the same for every such call while the task's settings are: that JSON is
        cached, keyed on everything ``build_header`` makes it from (a router function, which may
        look at the arguments, is asked every time; like the router, the cache sees a replaced
        ``task_routes``, not one edited in place)."""
        payload, codec = serialize.dumps((tuple(args or ()), dict(kwargs or {})))
        app = self.app
        router, conf = app.router, app.conf
        key = (codec, router, conf.task_default_queue, conf.task_default_priority, self.name,
               self.queue, self.priority, self.ignore_result, self.time_limit,
               self.soft_time_limit, self.rate_limit, self.acks_late, self.reject_on_worker_lost)
        cached = self._header_cache
        if cached is not None and cached[0] == key:
            rest = cached[1]
        else:
            _, header, _ = self.build_header(args, kwargs, "-")  # (validates the settings too)
            del header["id"]
            rest = P.encode(header)[1:]  # b'"task":...}'
            if router.static:
                self._header_cache = (key, rest)
        if not task_id:  # (a fresh id needs no JSON escaping)
            task_id = P.new_task_id()
            return task_id, b'{"id":"%s",%s' % (task_id.encode(), rest), payload
        return task_id, b'{"id":%s,%s' % (P.encode(task_id), rest), payload

    def build_header(self, args=None, kwargs=None, task_id=None, *, countdown=None, eta=None,
                     expires=None, queue=None, priority=None, ignore_result=None, time_limit=None,
                     soft_time_limit=None, **options):
        """Like ``build_message``, with the header still a dict (canvas adds workflow fields)."""
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
        task_id = task_id or P.new_task_id()
        route = self.app.router.route(self.name, args, kwargs, options, self) if not (queue and priority) else {}
        if priority is None:
            priority = self.priority if self.priority is not None else route.get("priority")
        priority = priority if priority is not None else self.app.conf.task_default_priority
        if priority is not None and not (isinstance(priority, int) and 0 <= priority <= P.MAX_PRIORITY):
            raise ValueError(f"priority must be an integer 0..{P.MAX_PRIORITY} (higher runs sooner), "
                             f"not {priority!r}")
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)  # a typo fails here, at the call, not in the broker
        header = {
            "id": task_id,
            "task": self.name,
            "queue": queue or self.queue or route.get("queue") or self.app.conf.task_default_queue,
            "priority": priority,
            "eta": eta,
            "expires": expires,
            "notify": not ignore_result,
            "codec": codec,
            # per call, else per task; absent: the worker applies its own default
            "time_limit": check_time_limit(self.time_limit if time_limit is None else time_limit,
                                           "time_limit"),
            "soft_time_limit": check_time_limit(
                self.soft_time_limit if soft_time_limit is None else soft_time_limit, "soft_time_limit"),
            "rate_limit": self.rate_limit,
            "acks_late": False if self.acks_late is False else None,
            "reject_on_worker_lost": False if self.reject_on_worker_lost is False else None,
        }
        if codec == serialize.CLOUDPICKLE:
            header["py"] = serialize.PYTHON_VERSION
        if options:
            header["options"] = options
        return task_id, {k: v for k, v in header.items() if v is not None}, payload

    def AsyncResult(self, task_id):  # noqa: N802 - Celery's name
        return self.app.AsyncResult(task_id)

    # -- canvas (canvas.py) ------------------------------------------------------------------------
    def signature(self, args=None, kwargs=None, **options):
        from .canvas import Signature  # local: canvas builds on this module

        return Signature(self, args or (), kwargs, options)

    subtask = signature

    def s(self, *args, **kwargs):
        """A signature: this task with (partial) arguments, for chains, groups and callbacks."""
        return self.signature(args, kwargs)

    def si(self, *args, **kwargs):
        """An immutable signature: a parent's result is not prepended to its arguments."""
        return self.signature(args, kwargs).set(immutable=True)

    def map(self, iterable):
        """One task applying this task to each item (Celery's ``xmap``)."""
        from .arguments import MAP_TASK
        from .canvas import Signature

        return Signature(MAP_TASK, (self.name, list(iterable)), app=self.app)

    def starmap(self, iterable):
        """One task calling this task with each item's arguments (Celery's ``xstarmap``)."""
        from .arguments import STARMAP_TASK
        from .canvas import Signature

        return Signature(STARMAP_TASK, (self.name, [tuple(item) for item in iterable]), app=self.app)

    def chunks(self, iterable, n):
        """Split the calls into tasks of ``n`` (a group of starmaps)."""
        from .canvas import chunks

        return chunks(self, iterable, n)

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
