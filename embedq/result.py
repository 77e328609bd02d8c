"""AsyncResult: a handle on one task's outcome, as in ``celery.result.AsyncResult``.

A final result is fetched once and cached on the handle (results never change once settled).
Until then ``state`` asks the broker each time, and ``get()`` blocks on the result the broker
pushes when the task settles; nothing polls.
"""

import base64

from . import serialize, states


class AsyncResult:
    def __init__(self, id, app=None, *, submitted_on=None):  # noqa: A002 - Celery's name
        if app is None:
            from .app import default_app  # local: the app module imports this one
            app = default_app()
        self.id = id
        self.app = app
        self._submitted_on = submitted_on
        self._header = None      # the result header once final
        self._payload = None
        self._parent = None      # set by canvas for the handles it returns, else from the result
        self._children = None

    task_id = property(lambda self: self.id)

    def __repr__(self):
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other):
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __reduce__(self):
        return (AsyncResult, (self.id, self.app))

    # -- workflow ----------------------------------------------------------------------------
    @property
    def parent(self):
        """The result before this one in a workflow (a chain's previous step), or None."""
        if self._parent is None:
            parent_id = self._meta().get("parent_id")
            if parent_id:
                self._parent = AsyncResult(parent_id, self.app)
        return self._parent

    @parent.setter
    def parent(self, value):
        self._parent = value

    @property
    def children(self):
        """Results of the tasks this one started (a chain's next step, ``link`` callbacks)."""
        if self._children is None:
            ids = self._meta().get("children") or []
            if not ids and not self.ready():
                return []  # not known until it finishes
            self._children = [AsyncResult(i, self.app) for i in ids]
        return self._children

    @children.setter
    def children(self, value):
        self._children = list(value)

    # -- state -----------------------------------------------------------------------------
    def _meta(self):
        if self._header is not None:
            return self._header
        info = self.app.client.status([self.id])[self.id]
        if info.get("state") in states.READY_STATES:
            self._header = info
        return info

    @property
    def state(self):
        return self._meta()["state"]

    status = state

    def ready(self):
        return self.state in states.READY_STATES

    def successful(self):
        return self.state == states.SUCCESS

    def failed(self):
        return self.state == states.FAILURE

    @property
    def traceback(self):
        return self._meta().get("traceback")

    @property
    def date_done(self):
        return self._meta().get("date_done")

    @property
    def result(self):
        """The return value, or the exception for a failed task; while unfinished, the ``meta``
        of a custom state (``update_state``) or the exception of a pending RETRY, else None."""
        if self._header is None:
            info = self._meta()
            if info["state"] not in states.READY_STATES:
                if info["state"] == states.RETRY:
                    return serialize.loads_exception(base64.b64decode(info.get("exc_pickle", "")), info)
                return info.get("meta")
        return self.get(propagate=False)

    info = result

    def revoke(self, terminate=False, signal="SIGTERM"):
        """Stop this task from running (``terminate=True``: kill it if it is running)."""
        self.app.control.revoke(self.id, terminate=terminate, signal=signal)

    # -- waiting ---------------------------------------------------------------------------
    def get(self, timeout=None, propagate=True, interval=None, disable_sync_subtasks=True):
        """Wait for the task to finish and return its value (``interval`` is accepted for
        compatibility: results are pushed, not polled)."""
        if self._header is None or self._payload is None:
            client = self.app.client
            self._header, self._payload = client.wait(self.id, timeout, subscribed=self._submitted_on)
        return self._decode(propagate)

    wait = get

    def _decode(self, propagate):
        header = self._header
        if header["state"] == states.SUCCESS:
            return serialize.loads(self._payload, header.get("codec"), header.get("py"))
        exc = serialize.loads_exception(self._payload, header)
        if propagate:
            raise exc
        return exc

    def forget(self):
        """Remove the stored result from the broker (the id becomes UNKNOWN)."""
        self.app.client.forget([self.id])
        self._header = self._payload = None


class GroupResult:
    """The results of a group, in order (``celery.result.GroupResult``)."""

    def __init__(self, id=None, results=None, app=None):  # noqa: A002 - Celery's name
        self.id = id
        self.results = list(results or [])
        self.app = app
        self.parent = None

    children = property(lambda self: self.results)

    def __repr__(self):
        return f"<GroupResult: {self.id} [{', '.join(r.id or '?' for r in self.results)}]>"

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)

    def __getitem__(self, index):
        return self.results[index]

    def leaves(self):
        """Every AsyncResult in the group, nested groups flattened."""
        for result in self.results:
            if isinstance(result, GroupResult):
                yield from result.leaves()
            else:
                yield result

    def get(self, timeout=None, propagate=True, interval=None, disable_sync_subtasks=True):
        """Wait for every member; their values in order (the first failure raises, by default)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(result.get(timeout=remaining, propagate=propagate))
        return values

    join = get

    def _states(self):
        leaves = list(self.leaves())
        known = {r.id: r._header["state"] for r in leaves if r._header is not None}
        missing = [r.id for r in leaves if r.id not in known]
        if missing:
            app = self.app or leaves[0].app
            for task_id, info in app.client.status(missing).items():
                known[task_id] = info.get("state")
        return [known[r.id] for r in leaves]

    def completed_count(self):
        return sum(1 for state in self._states() if state == states.SUCCESS)

    def ready(self):
        return all(state in states.READY_STATES for state in self._states())

    def successful(self):
        return all(state == states.SUCCESS for state in self._states())

    def failed(self):
        return any(state == states.FAILURE for state in self._states())

    def waiting(self):
        return not self.ready()

    def revoke(self, terminate=False, signal="SIGTERM"):
        leaves = list(self.leaves())
        if leaves:
            (self.app or leaves[0].app).control.revoke([r.id for r in leaves], terminate=terminate,
                                                      signal=signal)
