"""The broker: one process, one ROUTER socket, one LMDB store, one loop.

::

    clients (DEALER) --SUBMIT/WAIT/STATUS-->  +-----------------------------+
                     <--ACK/RESULT/STATE----  |  ROUTER  (poll, drain)      |
                                              |    |                        |
    worker nodes     --READY/HEARTBEAT/-----> |  handle every message  ---> one LMDB write txn
    (DEALER)            RESULT                |  evict silent nodes         (group commit)
                     <--WELCOME/TASK/-------- |  promote due tasks          |
                        SETTLED/HEARTBEAT     |  dispatch to nodes w/ credit|
                                              |  commit, then send replies  |
                                              +-----------------------------+

Nothing is acknowledged before the transaction that records it has committed: a SUBMIT's ACK,
a result's SETTLED and every TASK delivery leave the socket only after ``commit()``. A crash at
any point therefore loses only messages that their sender will resend (clients resend unanswered
requests, nodes resend unsettled results, leases without a live holder are requeued).
"""

import logging
import os
import time
import uuid
from collections import defaultdict

import lmdb
import zmq

from . import protocol as P
from . import states
from .errors import ProtocolError
from .peers import WorkerTable
from .store import Store
from .transport import NOBLOCK, send_frames

log = logging.getLogger(__name__)

#: Most messages handled in one loop iteration (one transaction).
MAX_BATCH = 2000
#: Seconds between sweeps of expired results.
CLEANUP_INTERVAL = 1.0
#: Seconds between checks of the store's size (growth, the StorageFull threshold).
SPACE_CHECK_INTERVAL = 0.05
#: Fraction of ``broker_max_store_size`` above which submits are refused with StorageFull.
FULL_THRESHOLD = 0.9
#: Socket send/receive high-water marks (messages); credit keeps worker traffic far below.
HIGH_WATER_MARK = 100_000
#: Milliseconds a closing socket may linger to flush replies.
LINGER_MS = 1000


class Iteration:
    """What one loop iteration will send and change in memory once its transaction commits."""

    def __init__(self):
        self.sends = []                                  # (identity, frames)
        self.batched = defaultdict(list)                 # (identity, command) -> body frames
        self.after_commit = []                           # callables
        self.dispatched = defaultdict(int)               # node -> tasks given this iteration

    def send(self, identity, command, *body):
        self.sends.append((identity, P.message(command, *body)))

    def add(self, identity, command, *frames):
        self.batched[identity, command].extend(frames)


class Broker:
    def __init__(self, data_dir, bind="tcp://127.0.0.1:5555", *, durability="fsync",
                 max_store_size=4 << 30, max_message_size=64 << 20, heartbeat=0.5, liveness=3,
                 result_expires=86400.0, clock=time.time, monotonic=time.monotonic, context=None):
        self.clock, self.monotonic = clock, monotonic
        self.store = Store(data_dir, durability=durability, max_size=max_store_size)
        self.result_expires = result_expires
        self.heartbeat = heartbeat
        self.workers = WorkerTable(heartbeat, liveness)
        self.instance = uuid.uuid4().hex[:12]
        self.waiters = defaultdict(set)                  # task id -> client identities
        # Leases found in the store at startup belong to nodes that must re-register (and say
        # what they still hold) within one liveness timeout, or the tasks are redelivered.
        self.orphans = {lease.task_id: lease for lease in self.store.leases()}
        self.orphan_deadline = monotonic() + self.workers.timeout + heartbeat
        self.next_cleanup = 0.0
        self.next_space_check = 0.0
        self.refuse_submits = False
        self.next_due = None
        self._client_handlers = {P.SUBMIT: self._on_submit, P.WAIT: self._on_wait,
                                 P.STATUS: self._on_status, P.FORGET: self._on_forget}
        self.context = context or zmq.Context()
        self.socket = self._bind(bind, max_message_size)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("broker %s on %s, data dir %s (%s), %d queued, %d leased",
                 self.instance, self.endpoint, data_dir, durability,
                 sum(self.store.ready_counts.values()), len(self.orphans))
        with self.store.env.begin() as txn:  # find the first scheduled task, if any
            cursor = txn.cursor(db=self.store.db["scheduled"])
            self.next_due = 0.0 if cursor.first() else None

    def _bind(self, endpoint, max_message_size):
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an unroutable send raises instead of vanishing
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        sock.setsockopt(zmq.ZAP_DOMAIN, b"embedq")  # refuses raw ZMTP/1.0 garbage connections
        sock.bind(endpoint)
        return sock

    def close(self):
        self.socket.close()
        self.store.close()

    # -- the loop ------------------------------------------------------------------------------
    def serve(self, stop=lambda: False):
        while not stop():
            self.poll_once(max_wait=0.25)

    def poll_once(self, max_wait=0.25):
        """Wait for messages (or the next timer), handle them all in one transaction, reply."""
        wait = min(max_wait, self._next_timer())
        messages = []
        if self.socket.poll(int(wait * 1000)):
            recv = self.socket.recv_multipart
            while len(messages) < MAX_BATCH:
                try:
                    messages.append(recv(NOBLOCK))
                except zmq.Again:
                    break
        self._iterate(messages)

    def _next_timer(self):
        mono = self.monotonic()
        timers = [self.workers.next_deadline(mono), self.next_cleanup - mono]
        if self.orphans:
            timers.append(self.orphan_deadline - mono)
        if self.next_due is not None:
            timers.append(self.next_due - self.clock())
        return max(0.0, min(timers))

    def _iterate(self, messages):
        mono = self.monotonic()
        if mono >= self.next_space_check:  # page counting is too slow for every iteration
            self.next_space_check = mono + SPACE_CHECK_INTERVAL
            self.store.grow_to_fit()
            self.refuse_submits = self._nearly_full()
        refuse_submits = self.refuse_submits
        for _attempt in range(3):
            it = Iteration()
            batch = self.store.begin()
            try:
                self._work(batch, it, messages, refuse_submits)
                batch.commit()
                break
            except lmdb.MapFullError:
                batch.abort()
                if not self.store.grow():
                    log.error("store is at broker_max_store_size; refusing submits")
                    refuse_submits = self.refuse_submits = True
        else:
            log.error("could not commit this iteration (store full); %d messages dropped, "
                      "their senders will resend", len(messages))
            return
        for callback in it.after_commit:
            callback()
        self._flush(it)

    def _work(self, batch, it, messages, refuse_submits):
        now, mono = self.clock(), self.monotonic()
        for frames in messages:
            self._handle(batch, it, frames, now, mono, refuse_submits)
        for node in self.workers.expired(mono):
            log.warning("worker node %s silent for %.1fs: evicted, %d task(s) redelivered",
                        node.node_id, mono - node.last_seen, len(node.leases))
            self._release(batch, it, node, node.leases.items())
            it.after_commit.append(lambda node=node: self.workers.remove(node))
        if self.orphans and mono >= self.orphan_deadline:
            for lease in self.orphans.values():
                self._requeue(batch, lease.task_id, lease.token)
            log.info("%d lease(s) of nodes that did not come back were requeued", len(self.orphans))
            self.orphans = {}
        if self.next_due is not None and self.next_due <= now:
            self.next_due = batch.promote_due(now)
        self._dispatch(batch, it, now)
        if mono >= self.next_cleanup:
            self.next_cleanup = mono + CLEANUP_INTERVAL
            batch.expire_results(now)

    def _flush(self, it):
        # batched messages (TASK deliveries, RESULT pushes) first: they are on someone's critical path
        outgoing = [(identity, P.message(command, *body)) for (identity, command), body in it.batched.items()]
        sock = self.socket
        mono = self.monotonic()
        for identity, frames in outgoing + it.sends:
            node = self.workers.get(identity)
            try:
                send_frames(sock, [identity, *frames])
            except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or not keeping up
                if node is not None:
                    log.warning("cannot reach worker node %s (%s): evicting", node.node_id, exc)
                    node.last_seen = float("-inf")  # evicted, leases requeued, next iteration
                else:
                    log.debug("dropped reply to a departed client: %s", exc)
            else:
                if node is not None:
                    node.last_sent = mono
        for node in self.workers.heartbeat_due(mono):
            self._send_now(node.identity, P.HEARTBEAT)
            node.last_sent = mono

    def _send_now(self, identity, command, *body):
        try:
            send_frames(self.socket, [identity, *P.message(command, *body)])
        except zmq.ZMQError:
            pass

    # -- message handling --------------------------------------------------------------------
    def _handle(self, batch, it, frames, now, mono, refuse_submits):
        identity = frames[0]
        try:
            command, body = P.split(frames[1:])
            node = self.workers.get(identity)
            if node is not None:
                node.last_seen = mono
            client_handler = self._client_handlers.get(command)
            if client_handler is not None:
                client_handler(batch, it, identity, body, now, refuse_submits)
            elif command == P.READY:
                self._on_ready(batch, it, identity, body, mono)
            elif node is None:
                if command != P.DISCONNECT:
                    it.send(identity, P.DISCONNECT, P.encode({"reason": "unknown worker: send READY"}))
            elif command == P.HEARTBEAT:
                self._on_heartbeat(batch, it, node, body)
            elif command == P.RESULT:
                self._on_result(batch, it, node, body, now)
            elif command == P.DISCONNECT:
                log.info("worker node %s left; %d task(s) handed back", node.node_id, len(node.leases))
                self._release(batch, it, node, node.leases.items())
                it.after_commit.append(lambda: self.workers.remove(node))
            else:
                raise ProtocolError(f"unknown command {command[:32]!r}")
        except ProtocolError as exc:
            log.warning("dropped malformed message from %r: %s", identity[:32], exc)
            it.send(identity, P.DISCONNECT, P.encode({"reason": str(exc)[:200]}))

    def _on_submit(self, batch, it, identity, body, now, refuse_submits):
        if not body:
            raise ProtocolError("SUBMIT without a control frame")
        control = P.decode(body[0])
        tasks = [(P.TaskHeader.parse(h), h, p) for h, p in P.pairs(body[1:])]
        reply = {"req": control.get("req"), "ok": 0, "dup": []}
        if refuse_submits:
            reply.update(error="StorageFull", message=(
                f"broker store {self.store.path!r} is at its size cap "
                f"({self.store.max_size >> 20} MiB): let results expire or raise broker_max_store_size"))
        else:
            for header, raw, payload in tasks:
                if batch.add_task(header, raw, payload, now):
                    reply["ok"] += 1
                    if header.eta is not None and (self.next_due is None or header.eta < self.next_due):
                        self.next_due = header.eta
                else:
                    reply["dup"].append(header.id)
                if header.notify:
                    self.waiters[header.id].add(header.reply_to.encode() if header.reply_to else identity)
            if reply["dup"]:  # a resent or re-submitted id: its waiter may be owed a result now
                for task_id in reply["dup"]:
                    self._reply_if_settled(batch, it, identity, task_id)
        if reply["dup"] or "error" in reply or not isinstance(reply["req"], int):
            it.send(identity, P.ACK, P.encode(reply))
        else:  # the common answer, without the JSON encoder
            it.send(identity, P.ACK, b'{"req":%d,"ok":%d,"dup":[]}' % (reply["req"], reply["ok"]))

    def _on_wait(self, batch, it, identity, body, now, refuse_submits):
        for task_id in P.check_ids(P.decode(body[0]) if body else {}):
            if not self._reply_if_settled(batch, it, identity, task_id):
                if batch.is_known(task_id):
                    self.waiters[task_id].add(identity)
                else:
                    it.add(identity, P.STATE, P.encode({"id": task_id, "state": states.UNKNOWN}))

    def _reply_if_settled(self, batch, it, identity, task_id):
        found = batch.result(task_id)
        if found is None:
            return False
        it.add(identity, P.RESULT, *found)
        return True

    def _on_status(self, batch, it, identity, body, now, refuse_submits):
        control = P.decode(body[0]) if body else {}
        found = {}
        for task_id in P.check_ids(control):
            result = batch.result(task_id)
            if result is not None:
                info = P.decode(result[0])
            elif batch.has_lease(task_id):
                info = {"state": states.RECEIVED}
            elif batch.task(task_id) is not None:
                info = {"state": states.PENDING}
            else:
                info = {"state": states.UNKNOWN}
            found[task_id] = info
        it.send(identity, P.STATE, P.encode({"req": control.get("req"), "states": found}))

    def _on_forget(self, batch, it, identity, body, now, refuse_submits):
        control = P.decode(body[0]) if body else {}
        for task_id in P.check_ids(control):
            batch.forget(task_id)
        it.send(identity, P.ACK, P.encode({"req": control.get("req"), "ok": len(control["ids"])}))

    # -- worker nodes --------------------------------------------------------------------------
    def _on_ready(self, batch, it, identity, body, mono):
        info = P.decode(body[0]) if body else {}
        node_id = P.check_name(info.get("node"), "node id")
        slots = info.get("slots")
        capacity = info.get("capacity", slots)
        queues = info.get("queues")
        held = info.get("held", [])
        if not (isinstance(slots, int) and isinstance(capacity, int) and 0 < slots <= capacity
                and isinstance(queues, list) and isinstance(held, list)):
            raise ProtocolError("READY needs integer slots <= capacity, a queue list and a held list")
        for queue in queues:
            P.check_name(queue, "queue")
        node, previous = self.workers.register(identity, node_id, slots, capacity, queues, mono, info)
        # What the node says it holds is adopted; what we thought it held but it does not is
        # requeued; what it holds but is no longer its own (evicted meanwhile) it must drop.
        candidates = dict(previous.leases) if previous is not None else {}
        for lease in [lease for lease in self.orphans.values() if lease.node == node_id]:
            candidates[lease.token] = lease.task_id
            del self.orphans[lease.task_id]
        held_tokens = {int(t) for t in held if isinstance(t, int)}
        adopted = {t: tid for t, tid in candidates.items() if t in held_tokens}
        node.leases.update(adopted)
        self._release(batch, it, node, [(t, tid) for t, tid in candidates.items() if t not in adopted],
                      forget=False)
        drop = sorted(held_tokens - set(adopted))
        log.info("worker node %s ready: %d slots, queues %s, %d lease(s) adopted, %d dropped",
                 node_id, slots, ",".join(queues), len(adopted), len(drop))
        it.send(identity, P.WELCOME, P.encode(
            {"broker": self.instance, "heartbeat": self.heartbeat, "drop": drop}))

    def _on_heartbeat(self, batch, it, node, body):
        info = P.decode(body[0]) if body else {}
        held, seen = info.get("held"), info.get("seen")
        if isinstance(held, list) and isinstance(seen, int):
            # A delivery the node has seen past but does not hold was lost on the way (a dropped
            # connection): give it to someone else rather than wait forever.
            held = set(held)
            lost = [(t, tid) for t, tid in node.leases.items() if t <= seen and t not in held]
            if lost:
                log.warning("worker node %s lost %d delivery(ies) in transit; requeued",
                            node.node_id, len(lost))
                self._release(batch, it, node, lost)

    def _on_result(self, batch, it, node, body, now):
        expires = None if self.result_expires is None else now + self.result_expires
        settled = []
        for raw, payload in P.pairs(body):
            header = P.ResultHeader.parse(raw)
            settled.append(str(header.token).encode())
            lease = batch.get_lease(header.id)
            if lease is None or lease.token != header.token or header.token not in node.leases:
                log.info("discarded a late result for %s from %s (delivery %d is no longer its lease)",
                         header.id, node.node_id, header.token)
                continue
            it.after_commit.append(lambda t=header.token: node.leases.pop(t, None))
            if header.state == "LOST":  # the pool child died running it: deliver again
                batch.requeue(header.id)
                continue
            batch.settle(header.id, raw, payload, expires)
            for client in self.waiters.pop(header.id, ()):
                it.add(client, P.RESULT, raw, payload)
        it.add(node.identity, P.SETTLED, *settled)

    def _release(self, batch, it, node, leases, forget=True):
        """Requeue the given (token, task id) leases; drop them from the node after commit."""
        leases = list(leases)
        for token, task_id in leases:
            self._requeue(batch, task_id, token)
        if forget and leases:
            tokens = [token for token, _ in leases]
            it.after_commit.append(lambda: [node.leases.pop(t, None) for t in tokens])

    def _requeue(self, batch, task_id, token):
        lease = batch.get_lease(task_id)
        if lease is not None and lease.token == token:
            batch.requeue(task_id)

    # -- dispatch ------------------------------------------------------------------------------
    def _dispatch(self, batch, it, now):
        """Give ready tasks to nodes with credit: best task first, shared fairly between nodes."""
        counts = self.store.ready_counts
        delta = batch.ready_delta
        if not delta and not any(counts.values()):
            return

        def ready(queue):
            return counts[queue] + delta[queue] > 0

        nodes = self.workers.with_credit(ready)
        while nodes:
            share = max(1, sum(counts[q] + delta[q] for q in {q for n in nodes for q in n.queues})
                        // len(nodes))
            still_hungry = []
            for node in nodes:
                credit = node.credit - it.dispatched[node]
                tasks = self._take(batch, node, min(credit, share))
                if not tasks:
                    continue
                it.dispatched[node] += len(tasks)
                frames = []
                new_leases = {}
                for task_id, raw, payload in tasks:
                    token = batch.next_seq()
                    batch.lease(task_id, token, node.node_id, now)
                    new_leases[token] = task_id
                    frames += (str(token).encode(), raw, payload)
                it.add(node.identity, P.TASK, *frames)
                it.after_commit.append(lambda n=node, l=new_leases: n.leases.update(l))
                if credit > len(tasks) and any(ready(q) for q in node.queues):
                    still_hungry.append(node)
            nodes = still_hungry

    def _take(self, batch, node, limit):
        if len(node.queues) == 1:
            return batch.take_ready(node.queues[0], limit)
        taken = []
        while len(taken) < limit:  # several queues: best (priority, age) across all of them
            keys = [(k, q) for q in node.queues if (k := batch.peek_ready(q)) is not None]
            if not keys:
                break
            taken += batch.take_ready(min(keys)[1], 1)
        return taken

    def _nearly_full(self):
        """Is the store close to its cap? Cheap high-water check first; page counts only if high."""
        env = self.store.env
        psize = env.stat()["psize"]
        limit = self.store.max_size * FULL_THRESHOLD
        if (env.info()["last_pgno"] + 1) * psize <= limit:
            return False
        with env.begin() as txn:  # pages actually in use (freed pages are reused by LMDB)
            pages = 0
            for db in self.store.db.values():
                stat = txn.stat(db)
                pages += stat["leaf_pages"] + stat["branch_pages"] + stat["overflow_pages"]
        return pages * psize > limit


def run(data_dir, bind, *, durability="fsync", ready_fd=None, parent_pid=None, **options):
    """Serve until SIGTERM/SIGINT (or the parent dies, when started by ``embedq.start``)."""
    from .lifecycle import StopFlag, die_with_parent, parent_gone

    if parent_pid is not None:
        die_with_parent(parent_pid=parent_pid)
    stop = StopFlag()
    broker = Broker(data_dir, bind, durability=durability, **options)
    if ready_fd is not None:
        os.write(ready_fd, (broker.endpoint + "\n").encode())
        os.close(ready_fd)
    try:
        broker.serve(lambda: stop or parent_gone(parent_pid))
    finally:
        broker.close()
    log.info("broker stopped")


if __name__ == "__main__":
    from .cli import broker_main

    broker_main()
