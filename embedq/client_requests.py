"""The broker's answers to clients: SUBMIT, WAIT, STATUS, FORGET (see docs/protocol.md).

Each handler runs inside the loop's transaction (``batch``) and queues its replies on ``it``;
they leave only after the commit, so an ACK always means "stored".
"""

from . import protocol as P
from . import states
from .errors import ProtocolError


class ClientRequests:
    def __init__(self, settlement, workflow, track):
        self.waiters = settlement.waiters   # task id -> client identities owed its result
        self.workflow = workflow
        #: called with the TaskHeader of every task queued now (the loop watches eta/expires)
        self.track = track

    def submit(self, batch, it, identity, body, now, refuse_submits):
        if not body:
            raise ProtocolError("SUBMIT without a control frame")
        control = P.decode(body[0])
        tasks = [(P.TaskHeader.parse(h), h, p) for h, p in P.pairs(body[1:])]
        owners = _owners(control, len(tasks))
        reply = {"req": control.get("req"), "ok": 0, "dup": []}
        if refuse_submits:  # (the reason, for the client's StorageFull)
            reply = P.storage_full_ack(reply["req"], refuse_submits)
        else:
            if "chords" in control:
                self.workflow.accept(batch, control)
            for index, (header, raw, payload) in enumerate(tasks):
                if header.waiting:
                    added = batch.add_waiting(header.id, raw, payload)
                elif batch.add_task(header, raw, payload, now):
                    added = True
                    self.track(header)
                else:
                    added = False
                # whose result it is: reply_to, else the thread it was sent for, else the sender
                owner = (header.reply_to.encode() if header.reply_to
                         else (owners and owners[index]) or identity)
                settled = False
                if added:
                    reply["ok"] += 1
                else:
                    reply["dup"].append(header.id)
                    # a resent or re-submitted id: its owner may be owed the result now
                    settled = self.reply_if_settled(batch, it, owner, header.id)
                if header.notify and not settled:  # (a waiter of a settled task would stay)
                    self.waiters[header.id].add(owner)
        if reply["dup"] or "error" in reply or not isinstance(reply["req"], int):
            it.send(identity, P.ACK, P.encode(reply))
        else:  # the common answer, without the JSON encoder
            it.send(identity, P.ACK, b'{"req":%d,"ok":%d,"dup":[]}' % (reply["req"], reply["ok"]))

    def wait(self, batch, it, identity, body, now, refuse_submits):
        waiters = self.waiters
        for task_id in P.check_ids(P.decode(body[0]) if body else {}):
            if identity in waiters.get(task_id, ()):
                # Subscribed already (a waiter's task is unsettled, or settled in this very
                # iteration with its RESULT on the way): a bulk WAIT from a socket that asked
                # before costs a set lookup per id, not LMDB reads.
                continue
            if not self.reply_if_settled(batch, it, identity, task_id):
                if batch.is_known(task_id):
                    waiters[task_id].add(identity)
                else:
                    it.add(identity, P.STATE, P.encode({"id": task_id, "state": states.UNKNOWN}))

    def reply_if_settled(self, batch, it, identity, task_id):
        found = batch.result(task_id)
        if found is None:
            return False
        it.add(identity, P.RESULT, *found)
        return True

    def status(self, batch, it, identity, body, now, refuse_submits):
        control = P.decode(body[0]) if body else {}
        found = {}
        for task_id in P.check_ids(control):
            result = batch.result(task_id)
            if result is not None:
                info = P.decode(result[0])
            elif (progress := batch.progress(task_id)) is not None:
                info = progress  # STARTED, RETRY or a custom state from update_state
            elif batch.has_lease(task_id):
                info = {"state": states.RECEIVED}
            elif batch.is_known(task_id):  # queued, scheduled, or a workflow step not yet due
                info = {"state": states.PENDING}
            else:
                info = {"state": states.UNKNOWN}
            found[task_id] = info
        it.send(identity, P.STATE, P.encode({"req": control.get("req"), "states": found}))

    def forget(self, batch, it, identity, body, now, refuse_submits):
        control = P.decode(body[0]) if body else {}
        for task_id in P.check_ids(control):
            batch.forget(task_id)
        it.send(identity, P.ACK, P.encode({"req": control.get("req"), "ok": len(control["ids"])}))


def _owners(control, count):
    """The SUBMIT's ``owners``: per task, the routing id of the client socket its result goes to
    (a client that sends the tasks of several threads in one SUBMIT), or None for the sender."""
    owners = control.get("owners")
    if owners is None:
        return None
    if not isinstance(owners, list) or len(owners) != count:
        raise ProtocolError("owners must be a list with one routing id (or null) per task")
    return [P.check_name(o, "owner").encode() if o is not None else None for o in owners]
