"""A worker node: one supervisor process that talks to the broker, plus a pool of children.

::

    broker ROUTER <--DEALER-- supervisor loop (this module)             pool children (pool.py)
                   READY/HEARTBEAT/RESULT   | backlog of delivered tasks  --pipe--> run task
                   <--WELCOME/TASK/SETTLED  | running: token -> child    <--pipe-- result
                                            | unsettled results (resent until SETTLED)
                                            | child sentinels: death -> LOST, replace child

The supervisor never runs task code, so its heartbeats keep flowing however long a task computes:
a lease lives as long as this loop does. Liveness is judged both ways (Paranoid Pirate): if the
broker falls silent for ``heartbeat * liveness`` the node opens a new socket and re-registers,
telling the broker which deliveries it still holds so they are adopted rather than run twice.
"""

import collections
import logging
import os
import socket as socket_module
import time
import uuid

import zmq

from . import protocol as P
from .pool import PoolProcess, lost_result
from .transport import NOBLOCK, dealer, send_frames

log = logging.getLogger(__name__)

#: Longest wait between reconnect attempts while the broker is unreachable (seconds).
MAX_RECONNECT_BACKOFF = 4.0
#: Milliseconds a closing socket may linger to flush (bounded: never hang at exit).
LINGER_MS = 500


class WorkerNode:
    def __init__(self, app, broker_url, *, concurrency=None, queues=None, name=None,
                 prefetch_multiplier=None, heartbeat=None, liveness=None, context=None,
                 monotonic=time.monotonic):
        conf = app.conf
        self.app = app
        self.broker_url = broker_url
        self.concurrency = concurrency or conf.worker_concurrency or os.cpu_count() or 1
        multiplier = prefetch_multiplier or conf.worker_prefetch_multiplier
        #: deliveries this node may hold at once: running + waiting in the backlog
        self.capacity = max(self.concurrency, self.concurrency * multiplier)
        self.queues = list(queues or [conf.task_default_queue])
        hostname = socket_module.gethostname()
        self.name = (name or f"worker@{hostname}").replace("%h", hostname)
        self.node_id = f"{self.name}#{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.heartbeat = heartbeat or conf.broker_heartbeat
        self.timeout = self.heartbeat * (liveness or conf.broker_heartbeat_liveness)
        self.monotonic = monotonic
        self.context = context or zmq.Context()
        self.children = []
        self.backlog = collections.deque()     # (token, task id, header, payload)
        self.unsettled = {}                     # token -> (result header, payload, sent at)
        self.dropped = set()                    # tokens the broker took back while we ran them
        self.outgoing = []                      # result frames to send this iteration
        self.seen = 0                           # highest delivery token received
        self.socket = None
        self._poller = None
        self.welcomed = False
        self.backoff = self.heartbeat
        self.broker_deadline = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self):
        self.children = [PoolProcess(self.app, i) for i in range(self.concurrency)]
        self._connect()
        log.info("worker node %s: %d pool processes, queues %s, broker %s", self.node_id,
                 self.concurrency, ",".join(self.queues), self.broker_url)

    def stop(self):
        """Hand every delivery back (the broker requeues it at once) and stop the pool."""
        for child in self.children:
            child.kill()
        if self.socket is not None:
            self._send(P.DISCONNECT, P.encode({"reason": "shutdown"}))
            self.socket.close(linger=LINGER_MS)
        for child in self.children:
            child.close(timeout=0.5)
        self.children = []

    def serve(self, stop=lambda: False):
        self.start()
        try:
            while not stop():
                self.poll_once(max_wait=0.25)
        finally:
            self.stop()

    def _connect(self):
        """A new socket each time (a new routing id), as the Paranoid Pirate worker does."""
        if self.socket is not None:
            self.socket.close(linger=0)
        identity = f"w:{self.node_id}:{uuid.uuid4().hex[:6]}".encode()
        self.socket = dealer(self.context, self.broker_url, identity, LINGER_MS)
        self._poller = None
        self.welcomed = False
        now = self.monotonic()
        self.last_sent = now
        #: when we give up on this socket if the broker stays silent (grows with backoff)
        self.broker_deadline = now + max(self.timeout, self.backoff)
        self._send(P.READY, P.encode({
            "node": self.node_id, "slots": self.concurrency, "capacity": self.capacity,
            "queues": self.queues, "held": sorted(self.held()), "pid": os.getpid(),
            "host": socket_module.gethostname(), "name": self.name}))

    def held(self):
        running = {child.current[0] for child in self.children if child.current}
        return ({token for token, *_ in self.backlog} | running | set(self.unsettled)) - self.dropped

    # -- the loop ------------------------------------------------------------------------------
    def _make_poller(self):
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        for child in self.children:
            poller.register(child.conn.fileno(), zmq.POLLIN)
            poller.register(child.sentinel, zmq.POLLIN)
        self._poller = poller
        return poller

    def poll_once(self, max_wait=0.25):
        poller = self._poller or self._make_poller()
        now = self.monotonic()
        next_beat = self.last_sent + self.heartbeat if self.welcomed else self.broker_deadline
        wait = max(0.0, min(max_wait, next_beat - now))
        ready = dict(poller.poll(int(wait * 1000)))
        now = self.monotonic()
        if ready.get(self.socket):
            self._drain_socket(now)
        for child in list(self.children):
            if ready.get(child.conn.fileno()) and child.current:
                try:
                    self._finished(child.receive())
                except (EOFError, OSError):
                    pass  # it died mid-reply: the sentinel path below handles it
            if ready.get(child.sentinel):
                self._replace(child)
        self._assign(now)
        self._flush_results(now)
        self._keep_alive(now)

    def _drain_socket(self, now):
        while True:
            try:
                frames = self.socket.recv_multipart(NOBLOCK)
            except zmq.Again:
                return
            self.broker_deadline = now + self.timeout
            try:
                command, body = P.split(frames)
                self._on_message(command, body, now)
            except Exception as exc:  # malformed input from the broker: log it, do not die
                log.warning("dropped malformed message from broker: %s", exc)

    def _on_message(self, command, body, now):
        if command == P.TASK:
            for token, header, payload in P.pairs(body, 3):
                token = int(token)
                self.seen = max(self.seen, token)
                task_id = P.decode(header)["id"]
                self.backlog.append((token, task_id, header, payload))
        elif command == P.SETTLED:
            for token in body:
                self.unsettled.pop(int(token), None)
        elif command == P.WELCOME:
            info = P.decode(body[0])
            self.welcomed = True
            if isinstance(info.get("heartbeat"), (int, float)) and info["heartbeat"] > 0:
                self.timeout *= info["heartbeat"] / self.heartbeat  # the broker sets the pace
                self.heartbeat = info["heartbeat"]
            self.backoff = self.heartbeat
            drop = set(info.get("drop", []))
            if drop:
                log.warning("broker took back %d delivery(ies) while we were away", len(drop))
                self.backlog = collections.deque(t for t in self.backlog if t[0] not in drop)
                for token in drop:
                    self.unsettled.pop(token, None)
                self.dropped |= drop
            for token, (header, payload, _) in self.unsettled.items():  # resend what is unsettled
                self.outgoing += (header, payload)
                self.unsettled[token] = (header, payload, now)
        elif command == P.DISCONNECT:
            log.warning("broker asked us to re-register: %s", body[0][:200] if body else "")
            self._connect()
        # HEARTBEAT: hearing anything at all is the point

    def _finished(self, outcome):
        token, header, payload = outcome
        if token in self.dropped:  # evicted while it ran; another node owns the task now
            self.dropped.discard(token)
            return
        self.unsettled[token] = (header, payload, self.monotonic())
        self.outgoing += (header, payload)

    def _replace(self, child):
        """A pool child died: report its task as LOST (the broker redelivers) and start another."""
        code = child.process.exitcode
        if child.current is not None:
            token, task_id, _ = child.current
            log.error("pool process %d died (exit code %s) running task %s", child.pid, code, task_id)
            self._finished((token, *lost_result(task_id, token, f"pool process exited with {code}")))
            child.current = None
        child.close(timeout=0)
        index = self.children.index(child)
        self.children[index] = PoolProcess(self.app, child.index)
        self._poller = None

    def _assign(self, now):
        for child in self.children:
            if not self.backlog:
                return
            if child.idle:
                token, task_id, header, payload = self.backlog.popleft()
                child.send(token, task_id, header, payload, now)

    def _flush_results(self, now):
        stale = [t for t, (_, _, sent) in self.unsettled.items() if now - sent > self.timeout]
        for token in stale:  # SETTLED never came (lost on the way): send again, ids dedupe
            header, payload, _ = self.unsettled[token]
            self.outgoing += (header, payload)
            self.unsettled[token] = (header, payload, now)
        if self.outgoing and self.welcomed:
            self._send(P.RESULT, *self.outgoing)
        self.outgoing = []

    def _keep_alive(self, now):
        if now > self.broker_deadline:
            log.warning("broker silent; reconnecting on a new socket (next try in %.1fs)", self.backoff)
            self.backoff = min(self.backoff * 2, MAX_RECONNECT_BACKOFF)
            self._connect()
        elif now - self.last_sent >= self.heartbeat and self.welcomed:
            self._send(P.HEARTBEAT, P.encode({"held": sorted(self.held()), "seen": self.seen}))

    def _send(self, command, *body):
        try:
            send_frames(self.socket, P.message(command, *body))
            self.last_sent = self.monotonic()
        except zmq.ZMQError as exc:
            log.debug("send to broker failed: %s", exc)


def run(app, broker_url, *, parent_pid=None, **options):
    """Serve until SIGTERM/SIGINT (or the parent dies, when started by ``embedq.start``)."""
    from .lifecycle import StopFlag, die_with_parent, parent_gone

    if parent_pid is not None:
        die_with_parent(parent_pid=parent_pid)
    stop = StopFlag()
    node = WorkerNode(app, broker_url, **options)
    node.serve(lambda: stop or parent_gone(parent_pid))


if __name__ == "__main__":
    from .cli import worker_main

    worker_main()
