"""The arguments a pool process calls a task with, and embedq's built-in tasks.

Most tasks are called with the ``(args, kwargs)`` pickled at submit. Workflow steps get more,
put in front by the broker as opaque parts (``protocol.pack_parts``, header ``prepend``):

- ``result``: the parent's return value becomes the first argument (a chain's next step, a
  ``link=`` callback), as Celery's partial application;
- ``results``: a chord body gets the list of its members' return values, in header order;
- ``errback``: a ``link_error`` callback gets ``(request, exc, traceback)`` if its function takes
  more than one argument besides the ones in its signature (Celery's new style), else the
  failed task's id (the old style).
"""

import inspect

from . import protocol as P
from . import serialize
from .task import Request

#: Built-in task names (the worker needs no registration for them).
MAP_TASK = "embedq.map"
STARMAP_TASK = "embedq.starmap"
COLLECT_TASK = "embedq.collect"


def task_arguments(app, header, payload):
    kind = header.get("prepend")
    if kind is None:
        return serialize.loads(payload, header.get("codec"), header.get("py"))
    parts, own = P.unpack_parts(payload)
    args, kwargs = serialize.loads(own, header.get("codec"), header.get("py"))
    if kind == P.PREPEND_RESULT:
        return (_value(parts[0]), *args), kwargs
    if kind == P.PREPEND_RESULTS:
        return ([_value(part) for part in parts], *args), kwargs
    if kind == P.PREPEND_ERRBACK:
        info = header.get("errback") or {}
        exc = serialize.loads_exception(parts[0], info)
        task = app.tasks.get(header["task"])
        if task is not None and _positional_count(task) - len(args) > 1:
            request = Request({"id": info.get("id"), "task": None})
            return (request, exc, info.get("traceback"), *args), kwargs
        return (info.get("id"), *args), kwargs
    raise ValueError(f"unknown argument kind {kind!r} in the task header")


def _value(part):
    return serialize.loads(part) if part else None


def _positional_count(task):
    try:
        parameters = inspect.signature(task._fun).parameters.values()
    except (TypeError, ValueError):
        return 1
    count = sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return 3
    return count - 1 if task.bind else count


def run_builtin(app, name, args, kwargs):
    """Run a built-in task, or return NotImplemented if ``name`` is not one."""
    if name == MAP_TASK:
        task_name, items = args
        return [app.tasks[task_name](item) for item in items]
    if name == STARMAP_TASK:
        task_name, items = args
        return [app.tasks[task_name](*item) for item in items]
    if name == COLLECT_TASK:
        return args[0]
    return NotImplemented
