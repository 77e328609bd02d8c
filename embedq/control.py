"""Remote control of the broker: ``CONTROL {"req", "op", ...}`` from ``app.control``.

Operations (each answered with ``ACK {"req", ...}`` after the commit):

``revoke`` ``{"ids", "terminate", "signal"}``
    A queued or scheduled task ends REVOKED now and never runs. A leased one is marked: the pool
    process holding it drops it if it has not started; with ``terminate`` its node kills the
    process running it (the task then ends REVOKED); without, a task already running finishes
    and keeps its result, as in Celery. An id the broker has never seen is stored REVOKED, so a
    later submit with that id is refused: revocations outlive restarts because they are results.
``dead_letters`` ``{"limit"}``
    Tasks that kept killing their workers: ``{"dead": [{"id", "task", "reason", ...}]}``.
``requeue_dead`` ``{"ids"}``
    Put dead letters back in their queues with a fresh redelivery count (their FAILURE result is
    dropped, so the same id runs again): ``{"ok": n}``.
``stats``
    Queue lengths, scheduled and leased counts, and the worker nodes with their pool processes.
"""

import signal as signal_module

from . import protocol as P
from .errors import ProtocolError

#: Most dead letters one ``dead_letters`` reply lists.
MAX_LISTED = 10_000


class Control:
    def __init__(self, settlement, leasing, store):
        self.settlement = settlement
        self.leasing = leasing
        self.store = store
        self.operations = {"revoke": self.revoke, "dead_letters": self.dead_letters,
                           "requeue_dead": self.requeue_dead, "stats": self.stats}

    def handle(self, batch, it, identity, body, now):
        request = P.decode(body[0]) if body else {}
        operation = self.operations.get(request.get("op"))
        if operation is None:
            raise ProtocolError(f"unknown control operation {str(request.get('op'))[:40]!r}")
        reply = operation(batch, it, request, now)
        it.send(identity, P.ACK, P.encode({"req": request.get("req"), **reply}))

    # -- operations ----------------------------------------------------------------------------
    def revoke(self, batch, it, request, now):
        terminate = bool(request.get("terminate"))
        sig = request.get("signal") or "SIGTERM"
        if not isinstance(sig, str) or not isinstance(getattr(signal_module, sig, None), signal_module.Signals):
            raise ProtocolError(f"unknown signal {str(sig)[:20]!r}")
        counts = {"revoked": 0, "running": 0, "done": 0}
        for task_id in P.check_ids(request):
            if batch.result(task_id) is not None:
                counts["done"] += 1  # already final: nothing to stop
                continue
            lease = batch.get_lease(task_id)
            if lease is None:  # queued, scheduled, or not submitted yet
                record = batch.task(task_id)
                name = P.decode(record[1]).get("task") if record is not None else None
                self.settlement.revoke_waiting(batch, it, task_id, "revoked", name)
                counts["revoked"] += 1
                continue
            batch.mark_revoked(task_id, {"reason": "revoked" + (" and terminated" if terminate else ""),
                                         "at": now})
            counts["running"] += 1
            slot = self.leasing.workers.slot_by_key(lease.node)
            if slot is None:
                continue  # its holder is gone; the lease comes back and ends REVOKED
            if terminate:
                it.send(slot.node.identity, P.REVOKE, P.encode({"tokens": [lease.token], "signal": sig}))
            else:
                it.send(slot.identity, P.REVOKE, P.encode({"tokens": [lease.token]}))
        return counts

    def dead_letters(self, batch, it, request, now):
        limit = request.get("limit")
        limit = limit if isinstance(limit, int) and 0 < limit <= MAX_LISTED else MAX_LISTED
        found = []
        for task_id, reason, raw_header in batch.dead_letters(limit):
            header = P.decode(raw_header)
            found.append({"id": task_id, "task": header.get("task"), "queue": header.get("queue"),
                          **reason})
        return {"dead": found}

    def requeue_dead(self, batch, it, request, now):
        requeued = 0
        for task_id in P.check_ids(request):
            found = batch.exhume(task_id)
            if found is None:
                continue
            raw_header, payload = found
            fields = P.decode(raw_header)
            fields.pop("redelivered", None)
            fields.pop("eta", None)
            raw_header = P.encode(fields)
            batch.forget(task_id)  # its FAILURE result, so the id is accepted again
            if batch.add_task(P.TaskHeader.parse(raw_header), raw_header, payload, now):
                requeued += 1
        return {"ok": requeued}

    def stats(self, batch, it, request, now):
        workers = self.leasing.workers
        return {
            "queues": {q: n for q, n in self.store.ready_counts.items() if n},
            "scheduled": batch.txn.stat(self.store.db["scheduled"])["entries"],
            "leased": batch.txn.stat(self.store.db["leases"])["entries"],
            "dead": batch.txn.stat(self.store.db["dead"])["entries"],
            "workers": [{"node": node.node_id, "queues": list(node.queues), "host": node.info.get("host"),
                         "pid": node.info.get("pid"), "running": len(node.running),
                         "processes": [{"index": s.index, "held": len(s.leases)} for s in node.slots.values()]}
                        for node in workers.nodes.values()],
        }
