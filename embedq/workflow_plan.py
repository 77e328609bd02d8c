"""Compiling a canvas into the messages of one SUBMIT (the client half of workflow.py).

``Plan.compile(node)`` walks the canvas and gives every task a message with a fixed id. Each
compiled node is ``(roots, tails, result)``: the tasks that start it, the single tasks whose
results are its result, and the handle the caller gets. Chains attach a node's tail to the next
node's roots (``links``); groups that anything follows become chords first (``_then``), so a
link always leaves exactly one tail.
"""

from .arguments import COLLECT_TASK
from .canvas import Signature, as_list, with_args, chain, chord, chunks, group
from .result import AsyncResult, GroupResult
from . import protocol as P


class _Compiled:
    __slots__ = ("roots", "tails", "result")

    def __init__(self, roots, tails, result):
        self.roots, self.tails, self.result = roots, tails, result


class _Sequence:
    """A normalised chain: every element but the last has exactly one tail."""

    def __init__(self, items):
        self.items = items


def _then(node, following):
    """``node`` followed by ``following``, with groups upgraded to chords (as Celery does)."""
    if isinstance(node, group):
        return chord(node, following)
    if isinstance(node, chord):
        return chord(node.header, _then(node.body, following))
    if isinstance(node, _Sequence):
        last = _then(node.items[-1], following)
        items = node.items[:-1] + (last.items if isinstance(last, _Sequence) else [last])
        return _Sequence(items)
    return _Sequence([node, following])


class Plan:
    def __init__(self, app):
        self.app = app
        self.messages = []   # [task id, header dict, payload]
        self.chords = []
        self.results = []    # every AsyncResult handed out (told which socket subscribed them)

    def encoded(self):
        return [(task_id, P.encode(header), payload) for task_id, header, payload in self.messages]

    # -- compile ---------------------------------------------------------------------------------
    def compile(self, node, waiting=False):
        start = len(self.messages)
        if isinstance(node, chunks):
            node = node.group()
        if isinstance(node, Signature):
            compiled = self._signature(node, waiting)
        elif isinstance(node, chain):
            compiled = self._sequence(self._normalise(node), waiting)
        elif isinstance(node, _Sequence):
            compiled = self._sequence(node, waiting)
        elif isinstance(node, chord):
            compiled = self._chord(node, waiting)
        elif isinstance(node, group):
            compiled = self._group(node, waiting)
        else:
            raise TypeError(f"not a signature or canvas: {node!r}")
        own = self.messages[start:]
        for callback in getattr(node, "_links", ()):
            self._attach(compiled, self.compile(callback, waiting=True), "links")
        for errback in getattr(node, "_errbacks", ()):
            # As Celery: every task of the canvas reports to it. It runs once, for the first
            # task that fails (activation is by id); the failures that follow are that one's.
            target = self.compile(errback, waiting=True)
            for message in own:
                message[1].setdefault("link_error", []).extend(m[0] for m in target.roots)
        return compiled

    def _normalise(self, node):
        tasks = node.tasks
        if not tasks:
            raise ValueError("an empty chain has nothing to run")
        acc = tasks[0]
        for task in tasks[1:]:
            acc = _then(acc, task)
        return acc if isinstance(acc, _Sequence) else _Sequence([acc])

    def _signature(self, sig, waiting):
        options = dict(sig.options)
        links, errbacks = options.pop("link", []), options.pop("link_error", [])
        task = self.app.task_by_name(sig.name)
        task_id, header, payload = task.build_header(sig.args, sig.kwargs, **options)
        if waiting:
            header["waiting"] = True
        if sig.immutable:
            header["immutable"] = True
        message = [task_id, header, payload]
        self.messages.append(message)
        compiled = _Compiled([message], [message], AsyncResult(task_id, self.app))
        self.results.append(compiled.result)
        for callback in as_list(links):
            self._attach(compiled, self.compile(callback, waiting=True), "links")
        for errback in as_list(errbacks):
            self._attach(compiled, self.compile(errback, waiting=True), "link_error")
        return compiled

    def _sequence(self, sequence, waiting):
        first = previous = self.compile(sequence.items[0], waiting)
        for item in sequence.items[1:]:
            following = self.compile(item, waiting=True)
            self._attach(previous, following, "links")
            following.result.parent = previous.result
            previous = following
        return _Compiled(first.roots, previous.tails, previous.result)

    def _group(self, node, waiting):
        members = [self.compile(task, waiting) for task in node.tasks]
        result = GroupResult(node.id or P.new_task_id(), [m.result for m in members], self.app)
        return _Compiled([r for m in members for r in m.roots], [t for m in members for t in m.tails], result)

    def _chord(self, node, waiting):
        elements = []
        for task in node.header.tasks:  # a nested group is collected into one list by a body
            if isinstance(task, (group, chunks)):
                task = chord(task if isinstance(task, group) else task.group(), Signature(COLLECT_TASK, app=self.app))
            elements.append(self.compile(task, waiting))
        header_result = GroupResult(P.new_task_id(), [e.result for e in elements], self.app)
        if not elements:  # Celery: an empty header calls the body at once with []
            body = self.compile(with_args(node.body, ([],), {}), waiting)
            body.result.parent = header_result
            return body
        body = self.compile(node.body, waiting=True)
        chord_id = P.new_task_id()
        members = []
        for element in elements:
            if len(element.tails) != 1:
                raise ValueError("a chord header element must end in one task")
            tail = element.tails[0]
            tail[1]["chord"] = chord_id
            members.append(tail[0])
        self.chords.append({"id": chord_id, "members": members, "body": [m[0] for m in body.roots]})
        body.result.parent = header_result
        return _Compiled([r for e in elements for r in e.roots], body.tails, body.result)

    # -- helpers -----------------------------------------------------------------------------
    def _attach(self, previous, following, kind):
        if kind == "links" and len(previous.tails) != 1:  # _then turns groups into chords first
            raise ValueError(f"cannot link a callback after {len(previous.tails)} parallel tasks")
        for tail in previous.tails:
            tail[1].setdefault(kind, []).extend(m[0] for m in following.roots)
        if kind == "links":
            if isinstance(previous.result, AsyncResult):
                previous.result.children = [*(previous.result._children or []), following.result]
