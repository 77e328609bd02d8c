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
a result's SETTLED and a RESULT pushed to a client leave the socket only after ``commit()``. A
crash at any point therefore loses only messages that their sender will resend (clients resend
unanswered requests, nodes resend unsettled results, leases without a live holder are requeued).

TASK deliveries leave just *before* the commit, so a pool process runs the task while the broker
commits (and fsyncs); a delivery acknowledges nothing. If the commit fails or the broker dies
first, the delivery is a phantom: its lease was never stored, its RESULT matches no lease and is
discarded, and the task goes out again (at-least-once allows the second run). Tokens are never
handed out twice, so no later lease takes a phantom's result: see ``Store.SEQ_BLOCK``.
"""

import logging
import os
import signal
import time
import uuid
from collections import defaultdict

import lmdb
import zmq

from . import protocol as P
from .client_requests import ClientRequests
from .control import Control
from .dispatch import Dispatcher
from .beat import Beat
from .errors import ProtocolError
from .leasing import Leasing
from .ratelimit import RateLimiter
from .settlement import DEFAULT_MAX_REDELIVERIES, Settlement
from .store import Store
from .workflow import Workflow
from .transport import receive_ready, send_to, wait_readable

log = logging.getLogger(__name__)

#: Most messages handled in one loop iteration (one transaction).
MAX_BATCH = 2000
#: fsync durability: how long a busy iteration waits to put more messages in one commit.
COMMIT_DELAY = 0.0003
#: ...and how many deliveries must be in flight for it to wait (Postgres' commit_siblings).
COMMIT_SIBLINGS = 4
#: Seconds between sweeps of expired results.
CLEANUP_INTERVAL = 1.0
#: Seconds between checks of the store's size (growth, the StorageFull threshold).
SPACE_CHECK_INTERVAL = 0.05
#: Socket send/receive high-water marks (messages); credit keeps worker traffic far below.
HIGH_WATER_MARK = 100_000
#: Milliseconds a closing socket may linger to flush replies.
LINGER_MS = 1000


class _PoisonMessage(Exception):
    """A handler failed on a message in a way validation did not foresee (see _iterate)."""

    def __init__(self, index):
        super().__init__(index)
        self.index = index


class Iteration:
    """What one loop iteration will send and change in memory once its transaction commits."""

    def __init__(self):
        self.sends = []                                  # (identity, frames)
        #: pool process identity -> TASK body frames, sent before the commit (see the top)
        self.deliveries = defaultdict(list)
        #: (identity, command) -> body frames: RESULT/STATE to clients (never to a node: only
        #: ``sends`` count as a heartbeat to one)
        self.batched = defaultdict(list)
        self.after_commit = []                           # callables
        #: slot -> credit change this iteration: + leases settled or requeued, - tasks delivered
        #: (slot.leases itself changes only after the commit)
        self.credit = defaultdict(int)
        #: slot -> tokens of results settled in this iteration (SETTLED is deferred, see _flush)
        self.settled = defaultdict(list)

    def send(self, identity, command, *body):
        self.sends.append((identity, P.message(command, *body)))

    def add(self, identity, command, *frames):
        self.batched[identity, command].extend(frames)


class Broker:
    def __init__(self, data_dir, bind="tcp://127.0.0.1:5555", *, durability="fsync",
                 max_store_size=4 << 30, max_message_size=64 << 20, heartbeat=0.5, liveness=3,
                 result_expires=86400.0, max_redeliveries=DEFAULT_MAX_REDELIVERIES, beat=True,
                 clock=time.time, monotonic=time.monotonic, context=None):
        self.clock, self.monotonic = clock, monotonic
        self.store = Store(data_dir, durability=durability, max_size=max_store_size)
        self.result_expires = result_expires
        #: seconds an fsync iteration may wait to gather more messages (see poll_once)
        self.commit_delay = COMMIT_DELAY if durability == "fsync" else 0.0
        self.instance = uuid.uuid4().hex[:12]
        self.limiter = RateLimiter(self.store.rate_marks())
        self.settlement = Settlement(clock, result_expires, max_redeliveries, self.limiter.forget)
        self.waiters = self.settlement.waiters           # task id -> client identities
        self.leasing = Leasing(self.store, heartbeat, liveness, monotonic, self.settlement, self.instance,
                               self._due_at)
        self.dispatcher = Dispatcher(self.store, self.leasing.workers, self.limiter, self._due_at)
        self.control = Control(self.settlement, self.leasing, self.store)
        self.workflow = self.settlement.workflow = Workflow(self.settlement, self._track)
        self.next_cleanup = 0.0
        self.next_space_check = 0.0
        #: False, or why submits are refused (the StorageFull message clients get)
        self.refuse_submits = False
        #: that message while the disk refuses commits (see _write_failed), else None
        self.write_failure = None
        self.next_due = None
        self.beat = Beat(self.store, enabled=beat)  # periodic entries; fires inside _work
        requests = ClientRequests(self.settlement, self.workflow, self._track)
        self._client_handlers = {P.SUBMIT: requests.submit, P.WAIT: requests.wait,
                                 P.STATUS: requests.status, P.FORGET: requests.forget,
                                 P.CONTROL: self._on_control, P.BEAT: self.beat.handle}
        self.max_message_size = max_message_size
        self.context = context or zmq.Context()
        self.socket = self._bind(bind, max_message_size)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("broker %s on %s, data dir %s (%s), %d queued, %d leased",
                 self.instance, self.endpoint, data_dir, durability,
                 sum(self.store.ready_counts.values()), len(self.leasing.orphans))
        with self.store.env.begin() as txn:  # anything scheduled or expiring: look at once
            self.next_due = 0.0 if txn.cursor(db=self.store.db["scheduled"]).first() else None
            self.next_expiry = 0.0 if txn.cursor(db=self.store.db["expiring"]).first() else None

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
        readable = wait_readable(self.socket, wait)
        messages = receive_ready(self.socket, MAX_BATCH, waiting=True) if readable else []
        if messages and self.commit_delay and len(messages) < MAX_BATCH and self._busy():
            # Group commit: under load, a short wait fills this fsync with the messages that are
            # about to arrive (results of prefetched tasks, concurrent submits). A lone task
            # never waits: with few deliveries in flight there is nothing to wait for.
            time.sleep(self.commit_delay)
            messages += receive_ready(self.socket, MAX_BATCH - len(messages))
        self._iterate(messages)

    def _next_timer(self):
        mono = self.monotonic()
        leasing = self.leasing
        wait = min(leasing.next_liveness, self.next_cleanup) - mono
        if leasing.settles.next_due is not None:
            wait = min(wait, leasing.settles.next_due - mono)
        now = self.clock()
        if self.next_due is not None:
            wait = min(wait, self.next_due - now)
        if self.next_expiry is not None:
            wait = min(wait, self.next_expiry - now)
        beat_due = self.beat.seconds_until_due(now)
        return max(0.0, wait if beat_due is None else min(wait, beat_due))

    def _iterate(self, messages):
        mono = self.monotonic()
        if mono >= self.next_space_check:  # page counting is too slow for every iteration
            self.next_space_check = mono + SPACE_CHECK_INTERVAL
            self.store.grow_to_fit()
            self.refuse_submits = self.store.refusal()
        refuse_submits = self.refuse_submits
        # memory an aborted attempt changed is put back before a retry
        next_due, next_expiry = self.next_due, self.next_expiry
        for _attempt in range(3 + len(messages)):
            self.next_due, self.next_expiry = next_due, next_expiry
            it = Iteration()
            batch = self.store.begin()
            try:
                self._work(batch, it, messages, refuse_submits)
                early = batch.numbers_reserved
                if early:
                    self._deliver(it)
                batch.commit()
                break
            except lmdb.MapFullError:  # (also at commit, when LMDB's free list needs pages)
                batch.abort()
                if not self.store.grow():
                    log.error("store is at broker_max_store_size; refusing submits")
                    refuse_submits = self.refuse_submits = self.store.cap_reached()
            except _PoisonMessage as poison:  # a bug met by odd input: drop that message, not us
                batch.abort()
                log.error("dropped a message that made the broker fail (%s); replying DISCONNECT",
                          poison.__cause__, exc_info=poison.__cause__)
                bad = messages.pop(poison.index)
                self._send_now(bad[0], P.DISCONNECT, P.encode({"reason": "internal error"}))
            except lmdb.Error as exc:  # the disk refused the writes: full, a size limit, I/O error
                batch.abort()
                if refuse_submits and refuse_submits == self.write_failure:
                    # submits were refused already: nothing else can be stored either
                    return self._refuse_and_drop(messages, refuse_submits)
                refuse_submits = self.refuse_submits = self._write_failed(exc)
        else:
            return self._refuse_and_drop(messages, refuse_submits or "the store is full")
        if self.write_failure is not None and batch.dirty and refuse_submits != self.write_failure:
            self.write_failure = None
            log.warning("the store in %s takes writes again", self.store.path)
        if not early:  # its tokens needed a new reservation, committed just now
            self._deliver(it)
        # results and states owed to clients first: someone is waiting for them
        for (identity, command), body in it.batched.items():
            self._reply(identity, P.message(command, *body))
        for callback in it.after_commit:
            callback()
        self._flush(it)

    def _work(self, batch, it, messages, refuse_submits):
        now, mono = self.clock(), self.monotonic()
        for index, frames in enumerate(messages):
            try:
                self._handle(batch, it, frames, now, mono, refuse_submits)
            except lmdb.MapFullError:
                raise
            except Exception as exc:
                raise _PoisonMessage(index) from exc
        if mono >= self.leasing.next_liveness:
            self.leasing.evict_silent(batch, it, mono)
        if self.next_expiry is not None and self.next_expiry <= now:
            self._expire_waiting(batch, it, now)
        if self.next_due is not None and self.next_due <= now:
            self.next_due = batch.promote_due(now)
        self.beat.fire_due(batch, it, now, refuse_submits)
        self.dispatcher.dispatch(batch, it, now)
        if mono >= self.next_cleanup:
            self.next_cleanup = mono + CLEANUP_INTERVAL
            batch.expire_results(now)

    def _deliver(self, it):
        """Send this iteration's TASKs ahead of its commit (see the top). Each carries its
        process's deferred SETTLED tokens in its first frame (results of earlier, committed
        iterations): no message and no wake-up of their own."""
        take = self.leasing.settles.take
        for identity, body in it.deliveries.items():
            self._reply(identity, P.message(P.TASK, b",".join(take(identity)), *body))

    def _flush(self, it):
        mono = self.monotonic()
        leasing = self.leasing
        settles = leasing.settles
        if it.settled:
            settles.add(it.settled, mono)
        if settles.pending:
            for identity, tokens in settles.due(mono):
                self._reply(identity, P.message(P.SETTLED, *tokens))
        nodes = leasing.workers.nodes
        for identity, frames in it.sends:
            if self._reply(identity, frames) and identity in nodes:
                nodes[identity].last_sent = mono  # anything we send a node doubles as our heartbeat
        if mono >= leasing.next_liveness:
            for node in leasing.heartbeat_due(mono):
                self._send_now(node.identity, P.HEARTBEAT)
                node.last_sent = mono
            leasing.schedule_liveness(mono)

    def _reply(self, identity, frames):
        """A reply after the commit. False if the peer is gone (its leases are then requeued)."""
        try:
            send_to(self.socket, identity, frames)
            return True
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or not keeping up
            if not self.leasing.unreachable(identity, exc):
                log.debug("dropped a reply to a departed client: %s", exc)
            return False

    def _send_now(self, identity, command, *body):
        try:
            send_to(self.socket, identity, P.message(command, *body))
        except zmq.ZMQError:
            pass

    def _write_failed(self, exc):
        """The StorageFull message for a commit the disk refused (logged once until it passes)."""
        if self.write_failure is None:
            log.error("cannot write the store in %s (%s): refusing submits; free disk space "
                      "there (or raise the file size limit)", self.store.path, exc)
        self.write_failure = (f"broker store {self.store.path!r} cannot be written ({exc}): "
                              "free disk space there")
        return self.write_failure

    def _refuse_and_drop(self, messages, reason):
        """Nothing of this iteration could be stored. Its senders resend, except submitters, who
        are told at once (StorageFull) rather than left to resend into a store that is full."""
        log.error("could not commit this iteration (%s); %d messages dropped, their senders "
                  "will resend", reason, len(messages))
        for frames in messages:
            if len(frames) > 3 and frames[2] == P.SUBMIT:
                try:
                    req = P.decode(frames[3]).get("req")
                except ProtocolError:
                    continue
                self._send_now(frames[0], P.ACK, P.encode(P.storage_full_ack(req, reason)))

    # -- message handling --------------------------------------------------------------------
    def _handle(self, batch, it, frames, now, mono, refuse_submits):
        identity = frames[0]
        try:
            if sum(map(len, frames)) > self.max_message_size:  # MAXMSGSIZE is per frame
                raise ProtocolError(f"message larger than {self.max_message_size} bytes")
            command, body = P.split(frames[1:])
            client_handler = self._client_handlers.get(command)
            if client_handler is not None:
                client_handler(batch, it, identity, body, now, refuse_submits)
            elif not self.leasing.handle(batch, it, identity, command, body, now, mono):
                raise ProtocolError(f"unknown command {command[:32]!r}")
        except ProtocolError as exc:
            log.warning("dropped malformed message from %r: %s", identity[:32], exc)
            it.send(identity, P.DISCONNECT, P.encode({"reason": str(exc)[:200]}))

    def _on_control(self, batch, it, identity, body, now, refuse_submits):
        self.control.handle(batch, it, identity, body, now)

    def _track(self, header):
        """Wake the loop for a new task's eta and expires."""
        if header.eta is not None:
            self._due_at(header.eta)
        if header.expires is not None and (self.next_expiry is None or header.expires < self.next_expiry):
            self.next_expiry = header.expires

    def _due_at(self, due):
        """Make sure the loop wakes up for a task scheduled at ``due``."""
        if due is not None and (self.next_due is None or due < self.next_due):
            self.next_due = due

    def _expire_waiting(self, batch, it, now):
        """Tasks whose ``expires`` passed while queued or scheduled end REVOKED, never run. A
        leased one is left to its pool process, which checks ``expires`` before running it."""
        expired, self.next_expiry = batch.pop_expired(now)
        for task_id in expired:
            record = batch.task(task_id)
            if record is not None and not batch.has_lease(task_id):
                name = P.decode(record[1]).get("task")
                self.settlement.revoke_waiting(batch, it, task_id, "expired", name)

    def _busy(self):
        in_flight = 0
        for slot in self.leasing.workers.slots.values():
            in_flight += len(slot.leases)
            if in_flight >= COMMIT_SIBLINGS:
                return True
        return False


def run(data_dir, bind, *, durability="fsync", ready_fd=None, parent_pid=None, **options):
    """Serve until SIGTERM/SIGINT (or the parent dies, when started by ``embedq.start``)."""
    from .lifecycle import StopFlag, parent_gone

    if parent_gone(parent_pid):  # it died before we got here
        return
    # A write past a file size limit (ulimit -f) then fails with EFBIG, which the loop handles
    # like a full disk, instead of killing the broker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
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
