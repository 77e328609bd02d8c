"""The broker's worker side: registration, liveness, leases and redelivery (dispatch.py sends).

Every delivery is a *lease*: a row in the store's ``leases`` database naming the task, the pool
process holding it (``node id/index``) and a delivery *token*. A lease ends in exactly one way:

- settled: the holder's RESULT carries the lease's token (any other token is a late result from a
  holder that lost the lease, and is discarded);
- requeued: its node fell silent (evicted), said the process died (LOST), left (DISCONNECT), or
  re-joined without it (the delivery was lost in transit); the task goes back to the front of its
  queue in the same transaction.

All methods take the loop's open ``batch`` (store transaction) and ``it`` (the replies and
in-memory changes that happen only after it commits).
"""

import logging

from . import protocol as P
from .errors import ProtocolError
from .peers import DeferredSettles, WorkerTable
from .store import Lease
from .transport import RECONNECT_IVL_MAX_MS

log = logging.getLogger(__name__)


class Leasing:
    def __init__(self, store, heartbeat, liveness, monotonic, settlement, instance, on_due):
        self.store = store
        self.heartbeat = heartbeat
        self.workers = WorkerTable(heartbeat, liveness)
        #: SETTLED confirmations waiting to ride along with the next TASK (peers.py)
        self.settles = DeferredSettles(self.workers)
        #: how long a lease without a live holder waits for its process to re-join: a node must
        #: notice the silence (one liveness timeout), reconnect (ZeroMQ backs off up to
        #: RECONNECT_IVL_MAX) and register, with the same again as margin
        self.orphan_grace = 2 * self.workers.timeout + 2 * RECONNECT_IVL_MAX_MS / 1000
        self.settlement = settlement
        #: called with the due time of a task rescheduled for a retry
        self.on_due = on_due
        self.instance = instance
        # Leases found in the store at startup belong to pool processes that must re-join (and
        # say what they still hold) within one liveness timeout, or the tasks are redelivered.
        self.orphans = {lease.task_id: lease for lease in store.leases()}
        self.orphan_deadline = monotonic() + self.orphan_grace
        self.unreachable_slots = set()
        #: monotonic time of the next liveness pass: evictions and heartbeats owed. Peers' last
        #: seen/sent times only grow, so nothing falls due before it (an unreachable peer resets it)
        self.next_liveness = 0.0
        self.handlers = {P.READY: self._on_ready, P.JOIN: self._on_join, P.HEARTBEAT: self._on_heartbeat,
                         P.RESULT: self._on_result, P.LOST: self._on_lost_report,
                         P.RELEASE: self._on_release, P.DISCONNECT: self._on_disconnect,
                         P.PROGRESS: self._on_progress}

    def handle(self, batch, it, identity, command, body, now, mono):
        """Handle a worker-side command; False if ``command`` is not one."""
        handler = self.handlers.get(command)
        if handler is None:
            return False
        node = self.workers.node(identity)
        if node is not None:
            node.last_seen = mono
        handler(batch, it, identity, body, now, mono)
        return True

    def _unknown(self, it, identity, body):
        it.send(identity, P.DISCONNECT, P.encode({"reason": "unknown peer: register again"}))

    # -- nodes -----------------------------------------------------------------------------
    def _on_ready(self, batch, it, identity, body, now, mono):
        info = P.decode(body[0]) if body else {}
        node_id = P.check_name(info.get("node"), "node id")
        queues = info.get("queues")
        if not isinstance(queues, list) or not queues:
            raise ProtocolError("READY needs a non-empty queue list")
        for queue in queues:
            P.check_name(queue, "queue")
        same_socket = self.workers.node(identity)
        if same_socket is not None and same_socket.node_id != node_id:  # renamed: the old one left
            self._leave(batch, it, same_socket)
        node, previous = self.workers.register(identity, node_id, queues, mono, info)
        node.running = _tokens(info.get("running"))
        if previous is not None:  # the node re-registered: its processes will re-join
            for slot in previous.slots.values():
                for token, task_id in slot.leases.items():
                    self.orphans[task_id] = Lease(task_id, token, now, slot.key)
            self.orphan_deadline = max(self.orphan_deadline, mono + self.orphan_grace)
        log.info("worker node %s ready: queues %s", node_id, ",".join(queues))
        it.send(identity, P.WELCOME, P.encode({"broker": self.instance, "heartbeat": self.heartbeat}))

    def _on_disconnect(self, batch, it, identity, body, now, mono):
        node = self.workers.node(identity)
        slot = self.workers.slot(identity)
        if node is not None:
            log.info("worker node %s left; %d task(s) handed back", node.node_id, len(node.leases()))
            self._leave(batch, it, node)
        elif slot is not None:
            slot.leaving = True
            self._release(batch, it, slot, slot.leases.items(), maybe_started=True)
            it.after_commit.append(lambda: self.workers.remove_slot(slot))

    def _leave(self, batch, it, node, crashed=False):
        """Requeue everything a node's processes hold and forget the node (after commit).
        ``crashed``: the node died, so what it reported running counts as a crash delivery."""
        node.leaving = True  # no dispatch to it from here on, even in this iteration
        started = node.running if crashed else frozenset()
        for slot in node.slots.values():
            self._release(batch, it, slot, slot.leases.items(), started=started, maybe_started=True)
        it.after_commit.append(lambda: self.workers.remove(node))

    def _on_lost(self, batch, it, identity, body, now, mono):
        """A node reports that one of its pool processes died: its deliveries go elsewhere now."""
        node = self.workers.node(identity)
        if node is None:
            return self._unknown(it, identity, body)
        info = P.decode(body[0]) if body else {}
        index = P.check_int(info.get("index"), "index")
        running = info.get("running")
        started = {running} if isinstance(running, int) else set()
        key = f"{node.node_id}/{index}"
        for lease in [lease for lease in self.orphans.values() if lease.node == key]:
            # it died before re-joining
            self.settlement.requeue(batch, it, lease.task_id, lease.token, lease.token in started)
            del self.orphans[lease.task_id]
        slot = node.slots.get(index)
        if slot is not None:
            slot.leaving = True  # not a dispatch target any more, even in this iteration
            crashed = info.get("kind", P.LOST_CRASH) == P.LOST_CRASH
            log.log(logging.WARNING if crashed else logging.INFO,
                    "pool process %s ended (%s): the %d delivery(ies) it held are settled or go back "
                    "to the queue", slot.key, info.get("reason", "?"), len(slot.leases))
            self._release(batch, it, slot, slot.leases.items(), started=started)
            it.after_commit.append(lambda: self.workers.remove_slot(slot))

    def _on_lost_report(self, batch, it, identity, body, now, mono):
        """LOST, first settling a ready-made result when the process was killed at a hard time
        limit (kind "time-limit": the task fails with TimeLimitExceeded instead of being
        redelivered); then as any LOST: the process's other deliveries are requeued."""
        node = self.workers.node(identity)
        info = P.decode(body[0]) if body else {}
        if node is not None and info.get("kind") == P.LOST_TIME_LIMIT and len(body) > 1:
            index = P.check_int(info.get("index"), "index")
            key = f"{node.node_id}/{index}"
            slot = node.slots.get(index)
            for raw, payload in P.pairs(body[1:]):
                header = P.ResultHeader.parse(raw)
                lease = batch.get_lease(header.id)
                held = (header.token in slot.leases if slot is not None
                        else lease is not None and lease.node == key)
                if lease is None or lease.token != header.token or not held:
                    log.info("discarded the time-limit result of %s (delivery %d is no longer its "
                             "lease)", header.id, header.token)
                    continue
                log.warning("task %s exceeded its time limit in %s: settled as %s",
                            header.id, key, header.state)
                self.orphans.pop(header.id, None)
                self.settlement.store_result(batch, it, header.id, raw, payload)
        self._on_lost(batch, it, identity, body[:1], now, mono)

    def _on_release(self, batch, it, identity, body, now, mono):
        """A pool process will not run these deliveries (it is recycled or shutting down):
        requeue them at once; if it is ``leaving``, send it no more work."""
        slot = self.workers.slot(identity)
        if slot is None:
            return self._unknown(it, identity, body)
        info = P.decode(body[0]) if body else {}
        if info.get("leaving"):
            slot.leaving = True
        tokens = set(P.int_list(info.get("tokens")))
        released = [(t, tid) for t, tid in slot.leases.items() if t in tokens]
        if released:
            log.info("pool process %s handed back %d delivery(ies)", slot.key, len(released))
            self._release(batch, it, slot, released)

    def evict_silent(self, batch, it, mono):
        for node in self.workers.expired(mono):
            log.warning("worker node %s silent for %.1fs: evicted, %d task(s) redelivered",
                        node.node_id, mono - node.last_seen, len(node.leases()))
            self._leave(batch, it, node, crashed=True)
        for slot in self.unreachable_slots:
            slot.leaving = True
            self._release(batch, it, slot, slot.leases.items(), maybe_started=True)
            it.after_commit.append(lambda slot=slot: self.workers.remove_slot(slot))
        self.unreachable_slots = set()
        if self.orphans and mono >= self.orphan_deadline:
            # A lease whose process has not re-joined yet is kept while its node reports it as
            # running (the process re-joins when the task ends); the rest are redelivered.
            running = set().union(*(node.running for node in self.workers.nodes.values()))
            expired = [lease for lease in self.orphans.values() if lease.token not in running]
            for lease in expired:
                self.settlement.requeue(batch, it, lease.task_id, lease.token, None)
                del self.orphans[lease.task_id]
            if expired:
                log.info("%d lease(s) of processes that did not come back were requeued", len(expired))
            self.orphan_deadline = mono + self.heartbeat

    # -- pool processes ----------------------------------------------------------------------
    def _on_join(self, batch, it, identity, body, now, mono):
        info = P.decode(body[0]) if body else {}
        node = self.workers.node_by_id(P.check_name(info.get("node"), "node id"))
        index, capacity, held = info.get("index"), info.get("capacity"), info.get("held", [])
        if not (P.check_int(index, "index") >= 0 and P.check_int(capacity, "capacity") > 0
                and isinstance(held, list)):
            raise ProtocolError("JOIN needs a pool index >= 0, a capacity > 0 and a held list")
        if node is None or node.leaving:
            return self._unknown(it, identity, body)
        slot, previous = self.workers.join(identity, node, index, capacity)
        # What the process says it holds is adopted; what we thought it held but it does not is
        # requeued; what it holds but is no longer its own (given away meanwhile) it must drop.
        candidates = dict(previous.leases) if previous is not None else {}
        for lease in [lease for lease in self.orphans.values() if lease.node == slot.key]:
            candidates[lease.token] = lease.task_id
            del self.orphans[lease.task_id]
        held_tokens = set(P.int_list(held))
        adopted = {t: tid for t, tid in candidates.items() if t in held_tokens}
        slot.leases.update(adopted)
        self._release(batch, it, slot, [(t, tid) for t, tid in candidates.items() if t not in adopted],
                      forget=False)
        drop = sorted(held_tokens - set(adopted))
        if adopted or drop:
            log.info("pool process %s joined: %d lease(s) adopted, %d dropped",
                     slot.key, len(adopted), len(drop))
        it.send(identity, P.WELCOME, P.encode({"broker": self.instance, "drop": drop}))

    def _on_heartbeat(self, batch, it, identity, body, now, mono):
        node = self.workers.node(identity)
        if node is not None:
            node.running = _tokens((P.decode(body[0]) if body else {}).get("running"))
            return
        slot = self.workers.slot(identity)
        if slot is None:
            return self._unknown(it, identity, body)
        info = P.decode(body[0]) if body else {}
        held, seen = info.get("held"), info.get("seen")
        if isinstance(held, list) and isinstance(seen, int):
            # A delivery the process has seen past but does not hold was lost on the way (a
            # dropped connection): give it to someone else rather than wait forever.
            held = set(P.int_list(held))
            lost = [(t, tid) for t, tid in slot.leases.items() if t <= seen and t not in held]
            if lost:
                log.warning("pool process %s lost %d delivery(ies) in transit; requeued", slot.key, len(lost))
                self._release(batch, it, slot, lost)

    def _on_result(self, batch, it, identity, body, now, mono):
        slot = self.workers.slot(identity)
        if slot is None:
            return self._unknown(it, identity, body)
        settled = []
        runtime = None  # the longest task among these results (for the prefetch window)
        for raw, payload in P.pairs(body):
            header = P.ResultHeader.parse(raw)
            settled.append(str(header.token).encode())
            lease = batch.get_lease(header.id)
            if lease is None or lease.token != header.token or header.token not in slot.leases:
                log.info("discarded a late result for %s from %s (delivery %d is no longer its lease)",
                         header.id, slot.key, header.token)
                continue
            it.after_commit.append(lambda t=header.token: slot.leases.pop(t, None))
            it.credit[slot] += 1  # the slot can take another task in this very iteration
            if header.runtime is not None:
                runtime = header.runtime if runtime is None else max(runtime, header.runtime)
            if header.state == P.RETRY_STATE:
                self.on_due(self.settlement.retry(batch, header, raw, payload))
            else:
                self.settlement.store_result(batch, it, header.id, raw, payload)
        it.settled[slot] += settled  # confirmed after the commit (see DeferredSettles)
        if runtime is not None:
            slot.observe(runtime)

    def _on_progress(self, batch, it, identity, body, now, mono):
        """A running task's STARTED or custom state (``update_state``): shown until it settles."""
        slot = self.workers.slot(identity)
        if slot is None:
            return self._unknown(it, identity, body)
        info = P.decode(body[0]) if body else {}
        task_id = P.check_name(info.get("id"), "task id")
        token = P.check_int(info.get("token"), "token")
        state = P.check_name(info.get("state"), "state")
        if state in P.FINAL_STATES or state == P.RETRY_STATE:
            raise ProtocolError(f"PROGRESS cannot set the state {state}: send a RESULT")
        lease = batch.get_lease(task_id)
        if lease is not None and lease.token == token and token in slot.leases:
            batch.set_progress(task_id, {"state": state, "meta": info.get("meta")})

    # -- leases ------------------------------------------------------------------------------
    def _release(self, batch, it, slot, leases, forget=True, started=frozenset(), maybe_started=False):
        """Requeue the given (token, task id) leases; drop them from the slot after commit.
        Tokens in ``started`` were running when their worker died (crash deliveries); with
        ``maybe_started`` the others may have started too (they count for at-most-once tasks)."""
        leases = list(leases)
        for token, task_id in leases:
            crashed = True if token in started else (None if maybe_started else False)
            self.settlement.requeue(batch, it, task_id, token, crashed)
        if forget and leases:
            tokens = [token for token, _ in leases]
            it.after_commit.append(lambda: [slot.leases.pop(t, None) for t in tokens])
            it.credit[slot] += len(tokens)

    # -- liveness ------------------------------------------------------------------------------
    def unreachable(self, identity, error=None):
        """A send to ``identity`` failed (ROUTER_MANDATORY: the peer is gone). Its leases are
        requeued next iteration: a node's by eviction, a pool process's on its own."""
        node = self.workers.node(identity)
        if node is not None:
            log.warning("cannot reach worker node %s (%s): evicting", node.node_id, error)
            node.last_seen = float("-inf")
            self.next_liveness = 0.0
            return True
        slot = self.workers.slot(identity)
        if slot is not None:
            log.warning("cannot reach pool process %s (%s): its deliveries will be redelivered",
                        slot.key, error)
            self.unreachable_slots.add(slot)
            self.next_liveness = 0.0
            return True
        return False

    def heartbeat_due(self, mono):
        return self.workers.heartbeat_due(mono)

    def schedule_liveness(self, mono):
        """After a liveness pass (and its heartbeats): the next is due when a node is first
        owed a heartbeat or may have been silent too long, when orphaned leases expire, or at
        once while a pool process found unreachable has not been dealt with."""
        deadline = 0.0 if self.unreachable_slots else self.workers.next_deadline(mono)
        if self.orphans:
            deadline = min(deadline, max(0.0, self.orphan_deadline - mono))
        self.next_liveness = mono + deadline


def _tokens(value):
    return set(P.int_list(value))
