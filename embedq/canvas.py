"""Celery's canvas: signatures, chain, group, chord, chunks; compiled into one SUBMIT.

A workflow is submitted whole, in one message and one commit: the tasks that can run now, every
later step as a *waiting* task (its own id, arguments and options, fixed now), and the chord
counters. The broker then runs it (workflow.py): each step is activated in the transaction that
stores its parent's result, so nothing of a workflow lives in a client or a worker and a crash
of either loses nothing. Compilation rules:

- a chain links each step's single final task to the next step's first tasks (``links``);
- a group followed by anything becomes a chord (as in Celery): its members' final tasks count
  down a chord whose body is what follows; a group nested in a chord header is collected by a
  built-in ``embedq.collect`` body, so its result is the list of its members' results;
- ``link``/``link_error`` options become waiting callbacks of the task's final task(s).
"""

import itertools

from . import protocol as P
from .result import AsyncResult, GroupResult


def _app_of(sig, app=None):
    if app is not None:
        return app
    from .app import app_for_task  # local: the app module imports this one indirectly

    return app_for_task(getattr(sig, "name", ""))


class Signature:
    """A task with (partial) arguments and options: ``add.s(2)``, ``signature("tasks.add")``."""

    def __init__(self, task, args=(), kwargs=None, options=None, immutable=False, app=None):
        if isinstance(task, str):
            self.name, self.app = task, app
        else:
            self.name, self.app = task.name, app or task.app
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        self.immutable = immutable or bool(self.options.pop("immutable", False))

    task = property(lambda self: self.name)

    @property
    def type(self):
        return _app_of(self, self.app).task_by_name(self.name)

    @property
    def id(self):
        return self.options.get("task_id")

    def clone(self, args=None, kwargs=None, **options):
        """A copy with ``args`` put in front (unless immutable), ``kwargs`` and options merged."""
        sig = Signature(self.name, self.args, self.kwargs, dict(self.options), self.immutable, self.app)
        for key in ("link", "link_error"):
            if key in sig.options:
                sig.options[key] = list(sig.options[key])
        if args and not self.immutable:
            sig.args = tuple(args) + sig.args
        if kwargs and not self.immutable:
            sig.kwargs.update(kwargs)
        sig.options.update({k: v for k, v in options.items() if v is not None})
        return sig

    def set(self, immutable=None, **options):
        if immutable is not None:
            self.immutable = immutable
        self.options.update(options)
        return self

    def set_immutable(self, immutable):
        self.immutable = immutable

    def link(self, callback):
        self.options.setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback):
        self.options.setdefault("link_error", []).append(errback)
        return errback

    def on_error(self, errback):
        self.link_error(errback)
        return self

    def freeze(self, _id=None):
        """Fix the task id now and return its result handle."""
        self.options.setdefault("task_id", _id or P.new_task_id())
        return AsyncResult(self.options["task_id"], _app_of(self, self.app))

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def apply_async(self, args=None, kwargs=None, **options):
        node = self.clone(args, kwargs, **options) if (args or kwargs or options) else self
        return submit(node, _app_of(self, self.app))

    def __call__(self, *args, **kwargs):
        """Run the task here and now, as Celery does (no broker)."""
        sig = self.clone(args, kwargs)
        return self.type(*sig.args, **sig.kwargs)

    def __or__(self, other):
        return chain(self, other)

    def __repr__(self):
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{'%' if self.immutable else ''}{self.name}({', '.join(parts)})"


def signature(varies, args=(), kwargs=None, app=None, **options):
    """``signature("tasks.add", (2, 2))`` or a copy of a signature."""
    if isinstance(varies, Signature):
        return varies.clone()
    return Signature(varies, args, kwargs, options, app=app)


subtask = signature


class _Canvas:
    """Common face of chain, group and chord: calling one submits it (as in Celery)."""

    app = None

    def __init__(self):
        self._links, self._errbacks = [], []

    def link(self, callback):
        self._links.append(callback)
        return callback

    def link_error(self, errback):  # as Celery: every task of the canvas reports to it
        self._errbacks.append(errback)
        return errback

    def _callbacks_to(self, new):
        new._links, new._errbacks = list(self._links), list(self._errbacks)
        return new

    def __call__(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def apply_async(self, args=None, kwargs=None, **options):
        node = self._with_args(args or (), kwargs or {}) if (args or kwargs) else self
        for key in ("link", "link_error"):
            for callback in as_list(options.pop(key, None)):
                getattr(node, key)(callback)
        if options:
            node._set_all(options)
        return submit(node, self._find_app())

    def _find_app(self):
        signatures = self._signatures()
        for sig in signatures:
            if sig.app is not None:
                return sig.app
        return _app_of(signatures[0] if signatures else None)

    def _set_all(self, options):
        for sig in self._signatures():
            sig.options.update(options)

    def __or__(self, other):
        return chain(self, other)


class chain(_Canvas):  # noqa: N801 - Celery's name
    """Run tasks one after the other, each getting the previous one's result first."""

    def __init__(self, *tasks):
        if len(tasks) == 1 and not isinstance(tasks[0], (Signature, _Canvas)):
            tasks = tuple(tasks[0])
        self.tasks = []
        for task in tasks:
            self.tasks.extend(task.tasks if isinstance(task, chain) else [task])
        super().__init__()

    def _with_args(self, args, kwargs):
        return self._callbacks_to(chain(with_args(self.tasks[0], args, kwargs), *self.tasks[1:]))

    def _signatures(self):
        return [s for task in self.tasks for s in _signatures(task)]

    def __repr__(self):
        return " | ".join(map(repr, self.tasks))


class group(_Canvas):  # noqa: N801 - Celery's name
    """Run tasks in parallel; the result is a GroupResult (a list of their results)."""

    def __init__(self, *tasks):
        if len(tasks) == 1 and not isinstance(tasks[0], (Signature, _Canvas)):
            tasks = tuple(tasks[0])
        self.tasks = list(tasks)
        self.id = None
        super().__init__()

    def _with_args(self, args, kwargs):
        return self._callbacks_to(group(*[with_args(task, args, kwargs) for task in self.tasks]))

    def _signatures(self):
        return [s for task in self.tasks for s in _signatures(task)]

    def __len__(self):
        return len(self.tasks)

    def __repr__(self):
        return f"group({', '.join(map(repr, self.tasks))})"


class chord(_Canvas):  # noqa: N801 - Celery's name
    """A group whose results, once all are in, go to ``body`` as one list."""

    def __init__(self, header, body=None):
        self.header = header if isinstance(header, group) else group(header)
        self.body = body
        super().__init__()

    def __call__(self, body=None, *args, **kwargs):
        if body is not None and isinstance(body, (Signature, _Canvas)):
            return chord(self.header, body).apply_async(args, kwargs)
        return self.apply_async((body, *args) if body is not None else args, kwargs)

    def _with_args(self, args, kwargs):
        return self._callbacks_to(chord(self.header._with_args(args, kwargs), self.body))

    def _signatures(self):
        return self.header._signatures() + _signatures(self.body)

    def __repr__(self):
        return f"chord({self.header!r}, {self.body!r})"


class chunks(_Canvas):  # noqa: N801 - Celery's name
    """``task.chunks(items, n)``: a group of tasks each running ``n`` calls (a starmap)."""

    def __init__(self, task, iterable, n):
        super().__init__()
        self.task, self.items, self.n = task, [tuple(i) for i in iterable], n
        if n < 1:
            raise ValueError("chunks: n must be at least 1")

    def group(self):
        it = iter(self.items)
        return group(self.task.starmap(chunk) for chunk in iter(lambda: list(itertools.islice(it, self.n)), []))

    def apply_async(self, args=None, kwargs=None, **options):
        return self.group().apply_async(args, kwargs, **options)

    def _signatures(self):
        return self.group()._signatures()


def as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def with_args(node, args, kwargs):
    return node.clone(args, kwargs) if isinstance(node, Signature) else node._with_args(args, kwargs)


def _signatures(node):
    return [node] if isinstance(node, Signature) else node._signatures()


def submit(node, app):
    """Compile a canvas into messages and chords, submit them in one commit, return its result."""
    from .workflow_plan import Plan  # local: the plan imports this module

    plan = Plan(app)
    result = plan.compile(node).result
    conn, _ = app.client.submit(plan.encoded(), chords=plan.chords)
    for handle in plan.results:  # this thread's socket is subscribed to all of them already
        handle._submitted_on = conn
    return result


__all__ = ["Signature", "signature", "subtask", "chain", "group", "chord", "chunks", "GroupResult"]
