"""How a task's delivery ends, decided by the broker inside the loop's transaction.

Every way a delivery can end goes through here, so each rule lives in one place and is committed
atomically with the change that caused it:

- a worker's final result is stored and pushed to waiting clients (``store_result``);
- a RETRY result puts the task back in ``scheduled`` with its new retry count (``retry``);
- a delivery that came back unfinished (``requeue``) is, in order of precedence:
  REVOKED if it was revoked meanwhile; FAILED with ``WorkerLostError`` if its worker died and the
  task forbids redelivery (``acks_late=False`` or ``reject_on_worker_lost=False``); a dead letter
  (FAILED, kept for ``requeue_dead``) once its worker has died ``max_redeliveries`` times; else
  back at the head of its queue;
- the broker itself ends tasks that never reach a worker: revoked or expired ones (``conclude``).

Results the broker makes itself carry no pickle (the broker never pickles or unpickles): their
header names an ``embedq.errors`` class that clients rebuild from the name.
"""

import base64
from collections import defaultdict

from . import protocol as P
from . import states
from .workflow import has_followers

#: Deliveries ending with the worker dying before a task becomes a dead letter.
DEFAULT_MAX_REDELIVERIES = 5


class Settlement:
    def __init__(self, clock, result_expires, max_redeliveries=DEFAULT_MAX_REDELIVERIES,
                 on_settled=None):
        self.clock = clock
        self.result_expires = result_expires
        self.max_redeliveries = max_redeliveries
        #: task id -> client identities to push its result to
        self.waiters = defaultdict(set)
        #: called with the task id of every settled task (the rate limiter forgets it)
        self.on_settled = on_settled or (lambda task_id: None)
        #: what follows a task in a chain, chord or callback (set by the broker)
        self.workflow = None

    # -- final results ------------------------------------------------------------------------
    def store_result(self, batch, it, task_id, raw, payload):
        """Store a final result and (after the commit) push it to every waiting client; then
        whatever follows the task in a workflow happens in this same transaction."""
        record = batch.task(task_id)
        task_header = record[1] if record is not None else None
        if task_header is None and (waiting := batch.take_waiting(task_id)) is not None:
            task_header = waiting[0]  # a workflow step that ends before it ever ran
        followers = task_header is not None and self.workflow is not None and has_followers(task_header)
        if followers and b'"links"' in task_header:  # AsyncResult.children of a fresh handle
            info = P.decode(raw)
            info["children"] = P.decode(task_header).get("links", [])
            raw = P.encode(info)
        expires = None if self.result_expires is None else self.clock() + self.result_expires
        batch.settle(task_id, raw, payload, expires)
        for client in self.waiters.get(task_id, ()):
            it.add(client, P.RESULT, raw, payload)
        it.after_commit.append(lambda: self.waiters.pop(task_id, None))
        self.on_settled(task_id)
        if followers:
            self.workflow.on_final(batch, it, task_id, P.decode(task_header), raw, payload,
                                   P.decode(raw).get("state"), self.clock())

    def conclude(self, batch, it, task_id, state, error, message, task_name=None):
        """End a task with a result the broker writes itself (REVOKED, WorkerLostError...)."""
        header = P.error_result(task_id, state, error, message, self.clock(), task_name)
        self.store_result(batch, it, task_id, P.encode(header), b"")

    def revoke_waiting(self, batch, it, task_id, reason, task_name=None):
        """A queued or scheduled task is revoked: it ends now (its index entries go stale)."""
        self.conclude(batch, it, task_id, states.REVOKED, "TaskRevokedError", reason, task_name)

    # -- retries ---------------------------------------------------------------------------------
    def retry(self, batch, result, raw, payload):
        """The task asked to run again at ``result.eta`` (with new arguments if the result says
        ``new_args``: then ``payload`` holds them): reschedule it, show RETRY meanwhile.
        Returns the due time."""
        record = batch.task(result.id)
        if record is None:
            return None
        info = P.decode(raw)
        header = P.decode(record[1])
        shown = {k: info[k] for k in ("exc_type", "exc_message", "traceback") if k in info}
        header["retries"] = result.retries
        header["eta"] = result.eta
        new_payload = None
        if info.get("new_args"):  # plain arguments now: a parent's result is no longer put in front
            new_payload = payload
            header["codec"] = info.get("codec", header.get("codec"))
            header.pop("prepend", None)
            header.pop("errback", None)
        else:  # the pickled exception, for AsyncResult.info (opaque here, as every payload)
            shown["exc_pickle"] = base64.b64encode(payload).decode()
        batch.drop_lease(result.id)
        seq = batch.rewrite_header(result.id, P.encode(header), new_payload)
        batch.schedule(result.id.encode(), seq, result.eta)
        batch.set_progress(result.id, {"state": states.RETRY, "eta": result.eta,
                                       "retries": result.retries, **shown})
        return result.eta

    # -- deliveries that came back unfinished -----------------------------------------------------
    def requeue(self, batch, it, task_id, token, crashed):
        """A delivery ended without a result. ``crashed``: its worker died while it may have
        been running (counts towards the dead-letter cap)."""
        lease = batch.get_lease(task_id)
        if lease is None or lease.token != token:
            return  # settled, or delivered again since
        revoked = batch.revoked(task_id)
        if revoked is not None:
            self.revoke_waiting(batch, it, task_id, revoked.get("reason", "revoked"))
            return
        if not crashed:
            batch.requeue(task_id)
            return
        record = batch.task(task_id)
        if record is None:
            batch.drop_lease(task_id)
            return
        raw_header = record[1]
        header = P.TaskHeader.parse(raw_header)
        if not header.acks_late or not header.reject_on_worker_lost:
            option = "acks_late=False" if not header.acks_late else "reject_on_worker_lost=False"
            self.conclude(batch, it, task_id, states.FAILURE, "WorkerLostError",
                          f"the worker died while running this task; {option}: not redelivered",
                          header.task)
            return
        crashes = header.redelivered + 1
        if self.max_redeliveries and crashes >= self.max_redeliveries:
            reason = {"reason": f"its worker died {crashes} times while running it",
                      "at": self.clock(), "deliveries": crashes, "task": header.task,
                      "queue": header.queue}
            batch.bury(task_id, reason)
            self.conclude(batch, it, task_id, states.FAILURE, "WorkerLostError",
                          f"dead letter: {reason['reason']} (requeue it with "
                          "app.control.requeue_dead_letter)", header.task)
            return
        fields = P.decode(raw_header)
        fields["redelivered"] = crashes
        batch.requeue(task_id, P.encode(fields))
