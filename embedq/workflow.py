"""Workflows (chains, callbacks, chords), run by the broker in the result's own transaction.

A client submits a whole workflow in one SUBMIT (canvas.py compiles it): the tasks that can run
now, plus every later step as a *waiting* task with its own id, arguments and options, and the
chords' member and body lists. Task headers say what follows them:

- ``links``: waiting tasks to activate when this one succeeds, with its result as their first
  argument (a chain's next step, ``link=`` callbacks, a group following a task);
- ``link_error``: waiting tasks to activate when it fails, with its exception (``link_error=``);
- ``chord``: the chord this task is a member of. Each member's final result counts down the
  chord's counter; the last success activates the chord body with every member's result, in
  order; the first failure fails the body instead.

All of it happens in the transaction that stores the result that triggers it, so a crash either
loses both (the result is resent, the step fires then) or keeps both: a chord body fires exactly
once, and activation is a put-if-absent on an id chosen at submit, which makes it idempotent too.

A failed (or revoked) task fails its ``links`` with the same error, recursively, so the last
result of a chain raises the first error; a failed chord member fails the body the same way.
The broker never unpickles: a parent's result payload is put in front of the child's own
arguments as an opaque part (``protocol.pack_parts``) and the pool process combines them.
"""

from . import protocol as P
from . import states


def has_followers(raw_header):
    """Cheap test before parsing: does this task header take part in a workflow? (Three
    ``in`` tests, not ``any()`` over a generator: this runs for every settled task.)"""
    return b'"links"' in raw_header or b'"link_error"' in raw_header or b'"chord"' in raw_header


class Workflow:
    def __init__(self, settlement, on_added):
        self.settlement = settlement
        #: called with the TaskHeader of every activated task (the loop's timers watch eta/expires)
        self.on_added = on_added
        self._queue = []
        self._draining = False

    # -- submit --------------------------------------------------------------------------------
    def accept(self, batch, control):
        """Record the chords of a SUBMIT (before its tasks are added)."""
        chords = control.get("chords") or []
        if not isinstance(chords, list):
            raise P.ProtocolError("chords must be a list")
        checked = []  # all of them first: an invalid SUBMIT changes nothing
        for chord in chords:
            if not isinstance(chord, dict):
                raise P.ProtocolError("each chord must be an object")
            checked.append((P.check_name(chord.get("id"), "chord id"), P.check_ids(chord, "members"),
                            P.check_ids(chord, "body")))
        for chord_id, members, body in checked:
            batch.add_chord(chord_id, members, body)

    # -- results -------------------------------------------------------------------------------
    def on_final(self, batch, it, task_id, task_header, result_raw, payload, state, now):
        """A task with followers reached a final state. Iterative: a failure that propagates
        down a 10,000-step chain must not recurse 10,000 frames deep."""
        self._queue.append((task_id, task_header, result_raw, payload, state))
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                self._follow(batch, it, *self._queue.pop(), now)
        finally:
            self._draining = False

    def _follow(self, batch, it, task_id, header, result_raw, payload, state, now):
        succeeded = state == states.SUCCESS
        if succeeded:
            for child in header.get("links", ()):
                self._activate(batch, child, [payload], P.PREPEND_RESULT, now, parent=task_id)
        else:
            for child in header.get("links", ()):
                self._fail(batch, it, child, result_raw, payload)
            info = P.decode(result_raw)
            errback = {"id": task_id, **{k: info.get(k) for k in ("exc_type", "exc_message", "traceback")}}
            for child in header.get("link_error", ()):
                self._activate(batch, child, [payload], P.PREPEND_ERRBACK, now, errback, parent=task_id)
        chord_id = header.get("chord")
        if chord_id:
            outcome = batch.chord_member_done(chord_id, failed=not succeeded)
            if outcome == "complete":
                members, body = batch.chord(chord_id)
                parts = []
                for member in members:
                    found = batch.result(member)
                    parts.append(found[1] if found is not None else b"")
                for root in body:
                    self._activate(batch, root, parts, P.PREPEND_RESULTS, now)
                batch.drop_chord(chord_id)
            elif outcome == "failed":
                for root in batch.chord(chord_id)[1]:
                    self._fail(batch, it, root, result_raw, payload)

    def _activate(self, batch, task_id, parts, kind, now, errback=None, parent=None):
        found = batch.take_waiting(task_id)
        if found is None:
            return  # activated before (a resent result), or ended meanwhile (revoked)
        raw_header, own = found
        header = P.decode(raw_header)
        header.pop("waiting", None)
        if parent is not None:
            header["parent_id"] = parent  # copied into its result: AsyncResult.parent
        if not header.get("immutable"):
            header["prepend"] = kind
            if errback is not None:
                header["errback"] = errback
            own = P.pack_parts(parts, own)
        raw_header = P.encode(header)
        parsed = P.TaskHeader.parse(raw_header)
        if batch.add_task(parsed, raw_header, own, now):
            self.on_added(parsed)

    def _fail(self, batch, it, task_id, result_raw, payload):
        """End a waiting task with its parent's error (then its own followers, via on_final)."""
        found = batch.waiting(task_id)
        if found is None:
            return
        header = P.decode(result_raw)
        parent = header.get("id")
        header.pop("token", None)
        header.pop("children", None)
        header.update(id=task_id, task=P.decode(found[0]).get("task"), parent_id=parent)
        self.settlement.store_result(batch, it, task_id, P.encode(header), payload)
