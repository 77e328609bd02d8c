"""App: the task registry, the settings and this process's connection to the broker.

Like ``celery.Celery``, but constructed explicitly: no current-app proxies, no import-time side
effects. Worker processes find the same App by importing the module that defines it; an App
pickles as a reference (its ``main`` name and defining module), never by value.
"""

import importlib
import inspect
import os
import sys
import threading
import weakref

from .client import Client
from .config import Settings
from .errors import ConfigurationError
from .periodic import PeriodicTasks
from .result import AsyncResult
from .routing import Router
from .task import Task

#: Apps alive in this process by main name, so a pool child can find "the same" app.
_apps = weakref.WeakValueDictionary()
_default = []
_MAIN_MODULES = ("__main__", "__mp_main__")


class App:
    Task = Task

    def __init__(self, main=None, broker=None, *, include=(), **settings):
        self.main = main
        self.conf = Settings.from_environment(**settings)
        if broker:
            self.conf.broker_url = broker
        caller = inspect.currentframe().f_back
        module = caller.f_globals.get("__name__") if caller else None
        #: the module that created this app, imported by worker processes to find it again
        self.module = "__main__" if module in _MAIN_MODULES else module
        self.include = list(include)
        self.tasks = {}
        self._client = None
        self._client_lock = threading.Lock()
        self._router = (object(), None)  # (the task_routes value it was built from, router)
        self.control = Control(self)
        #: periodic entries: add, sync with the broker, list, pause, resume, remove
        self.beat = PeriodicTasks(self)
        _apps[self.main or ""] = self

    def __repr__(self):
        return f"<embedq.App {self.main or '__main__'}>"

    def __reduce__(self):
        return (_find_app, (self.main, self.module, self.include, _picklable(self.conf.as_dict())))

    # -- tasks -------------------------------------------------------------------------------
    def task(self, *args, **options):
        """``@app.task`` or ``@app.task(name=..., bind=True, base=..., queue=..., ...)``."""
        if len(args) == 1 and callable(args[0]) and not options:
            return self._create_task(args[0])
        if args:
            raise TypeError("app.task takes a function or only keyword options")
        return lambda fun: self._create_task(fun, **options)

    def _create_task(self, fun, name=None, base=None, **options):
        name = name or self.gen_task_name(fun.__name__, fun.__module__)
        attributes = {"name": name, "app": self, "_fun": staticmethod(fun), "__doc__": fun.__doc__,
                      "__module__": fun.__module__, "__wrapped__": staticmethod(fun), **options}
        task = type(fun.__name__, (base or self.Task,), attributes)()
        self.tasks[name] = task
        return task

    def gen_task_name(self, name, module):
        """``module.function``; for a script (``__main__``), ``main.function`` as Celery does,
        so the name is the same in the script and in the worker processes it spawns."""
        if module in _MAIN_MODULES:
            module = self.main or "__main__"
        return f"{module}.{name}"

    def task_by_name(self, name):
        """The registered task, or a stand-in that sends by name (the caller need not import
        the task's code; the worker must)."""
        task = self.tasks.get(name)
        if task is None:
            task = type(name.rpartition(".")[2] or "task", (self.Task,), {"name": name, "app": self})()
        return task

    def register_task(self, task):
        if isinstance(task, type):
            task = task()
        task.app = self
        task.name = task.name or self.gen_task_name(type(task).__name__, type(task).__module__)
        self.tasks[task.name] = task
        return task

    # -- periodic tasks ----------------------------------------------------------------------
    def add_periodic_task(self, schedule, sig, args=None, kwargs=None, name=None, policy=None,
                          **options):
        """Celery's: run ``sig`` (a Task, or a signature-like object) on ``schedule`` (seconds,
        timedelta, crontab). ``policy`` says what to do about runs missed while the broker was
        down: "skip" (default), "once" or "all". Returns the entry name."""
        return self.beat.add(schedule, sig, args, kwargs, name=name, policy=policy, **options)

    def periodic_task(self, schedule, *, args=None, kwargs=None, policy=None, options=None,
                      **task_options):
        """Decorator: ``@app.periodic_task(10.0)`` defines a task (``task_options`` as for
        ``@app.task``) and schedules it as an entry named after the task."""
        def decorate(fun):
            task = self.task(**task_options)(fun) if task_options else self.task(fun)
            self.add_periodic_task(schedule, task, args, kwargs, name=task.name,
                                   policy=policy, **(options or {}))
            return task
        return decorate

    # -- sending -----------------------------------------------------------------------------
    def send_task(self, name, args=None, kwargs=None, **options):
        """Submit a task by name (the client need not import its code)."""
        return self.task_by_name(name).apply_async(args, kwargs, **options)

    def send_messages(self, messages):
        """Submit prepared (task id, header, payload) triples in one round trip (one commit)."""
        conn, _ = self.client.submit(messages)
        return [AsyncResult(task_id, self, submitted_on=conn) for task_id, _, _ in messages]

    def AsyncResult(self, task_id):  # noqa: N802 - Celery's name
        return AsyncResult(task_id, self)

    @property
    def router(self):
        """The ``task_routes`` router, rebuilt when the setting is replaced."""
        routes = self.conf.task_routes
        if self._router[0] is not routes:
            self._router = (routes, Router(routes))
        return self._router[1]

    # -- connection --------------------------------------------------------------------------
    @property
    def client(self):
        """This process's client, made on first use (and again after a fork or a new URL)."""
        client = self._client
        url = self.conf.broker_url
        if client is not None and client.pid == os.getpid() and client.url == url:
            return client
        if not url:
            raise ConfigurationError(
                "no broker to send to: run the tasks inside `with embedq.start(app):`, or set "
                "app.conf.broker_url = 'tcp://HOST:PORT' (the address of `python -m embedq.broker`)")
        with self._client_lock:
            if self._client is None or self._client.pid != os.getpid() or self._client.url != url:
                if self._client is not None and self._client.pid == os.getpid():
                    self._client.close()
                self._client = Client(url, self.conf)
            return self._client

    def close(self):
        if self._client is not None and self._client.pid == os.getpid():
            self._client.close()
        self._client = None

    def config_from_object(self, obj):
        if isinstance(obj, str):
            obj = importlib.import_module(obj)
        items = obj.items() if isinstance(obj, dict) else vars(obj).items()
        self.conf.update({k: v for k, v in items if not k.startswith("_") and k.islower()})


Celery = App


class Control:
    """``app.control``: ask the broker to revoke tasks, list and requeue dead letters, report."""

    def __init__(self, app):
        self.app = app

    def revoke(self, task_id, terminate=False, signal="SIGTERM"):
        """Revoke one id or a list of ids. Queued and scheduled tasks never run; a running one is
        killed only with ``terminate=True``. Returns the broker's counts."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        return self.app.client.control("revoke", ids=ids, terminate=terminate, signal=signal)

    def dead_letters(self, limit=None):
        """Tasks that kept killing their workers: a list of dicts (id, task, reason, ...)."""
        return self.app.client.control("dead_letters", limit=limit)["dead"]

    def requeue_dead_letter(self, task_id):
        """Put dead letters (an id or a list) back in their queues; returns how many."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        return self.app.client.control("requeue_dead", ids=ids)["ok"]

    def stats(self):
        """Queue lengths, scheduled/leased/dead counts and the connected worker nodes."""
        return self.app.client.control("stats")


def _picklable(settings):
    return {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _find_app(main, module, include, settings):
    """Rebuild an App reference in another process: import its module and find it by name."""
    for name in [module, *include]:
        if name and name not in _MAIN_MODULES and name not in sys.modules:
            importlib.import_module(name)
    app = _apps.get(main or "")
    if app is None:
        app = App(main)
    app.conf.update(settings)
    return app


def app_for_task(name):
    """The app that registered a task of this name, else the default app (for ``signature()``)."""
    for app in list(_apps.values()):
        if name in app.tasks:
            return app
    return default_app()


def default_app():
    """The app used by ``embedq.start()`` without one and by ``AsyncResult(id)`` without ``app``."""
    if not _default:
        _default.append(App("embedq"))
    return _default[0]
