"""``task_routes``: which queue (and priority) a task goes to when the call does not say.

Accepted forms, as Celery's:

- a dict ``{"tasks.add": {"queue": "math"}, "media.*": "media", re.compile(r"^img\\."): {...}}``:
  exact names first, then glob patterns and compiled regular expressions in order; a string
  value is a queue name;
- a router function ``router(name, args, kwargs, options, task=None, **kw)`` returning a dict, a
  queue name or None (next router);
- a list or tuple of any of these (or of dotted paths to router functions), tried in order.

Precedence for the queue is Celery's: ``apply_async(queue=...)``, then the task's own ``queue``
attribute, then the first matching route, then ``task_default_queue``.
"""

import fnmatch
import importlib
import re


def _load(path):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class MapRoute:
    """A dict of exact names, globs and regexes."""

    def __init__(self, mapping):
        self.exact = {}
        self.patterns = []
        for key, route in mapping.items():
            if isinstance(key, re.Pattern):
                self.patterns.append((key, route))
            elif any(ch in key for ch in "*?["):
                self.patterns.append((re.compile(fnmatch.translate(key)), route))
            else:
                self.exact[key] = route

    def __call__(self, name, *args, **kwargs):
        if name in self.exact:
            return self.exact[name]
        for pattern, route in self.patterns:
            if pattern.match(name):
                return route
        return None


class Router:
    def __init__(self, routes):
        if routes is None:
            routes = ()
        elif isinstance(routes, dict) or callable(routes) or isinstance(routes, str):
            routes = (routes,)
        self.routers = [self._prepare(route) for route in routes]
        #: routes depend on the task name only (no router functions, which see the arguments)
        self.static = all(isinstance(router, MapRoute) for router in self.routers)

    @staticmethod
    def _prepare(route):
        if isinstance(route, dict):
            return MapRoute(route)
        if isinstance(route, str):
            return _load(route)
        if callable(route):
            return route
        raise TypeError(f"task_routes entries must be dicts, router functions or their dotted "
                        f"paths, not {route!r}")

    def route(self, name, args, kwargs, options, task=None):
        """``{"queue": ..., "priority": ...}`` from the first router that answers, else {}."""
        for router in self.routers:
            found = router(name, args, kwargs, options, task=task)
            if found is None:
                continue
            if isinstance(found, str):
                return {"queue": found}
            if isinstance(found, dict):
                return found
            raise TypeError(f"router {router!r} returned {found!r}: expected a dict, a queue name or None")
        return {}
