"""A worker node: the supervisor process of a pool of task-running processes.

::

    broker ROUTER <--DEALER-- supervisor loop (this module)        pool processes (pool.py)
                   READY / HEARTBEAT {running} / LOST      --pipe "join now"-->  own DEALER to the
                   <--WELCOME / HEARTBEAT / DISCONNECT     <== sentinel: died    broker: TASK in,
                                                                               RESULT out

The supervisor never runs task code and never carries tasks, so its heartbeats keep flowing
however long a task computes: the leases of all its processes live exactly as long as this loop
does. Liveness is judged both ways (Paranoid Pirate): if the broker falls silent for
``heartbeat * liveness`` the node opens a new socket, registers again (saying which deliveries
its processes are running, so they are not redelivered) and tells its processes to re-join.
A pool process that dies is reported as LOST at once and replaced.
"""

import logging
import os
import socket as socket_module
import time
import uuid

import zmq

from . import protocol as P
from .pool import PoolProcess
from .transport import dealer, receive_ready, send_frames

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
        #: deliveries each pool process may hold at once: one running, the rest prefetched
        self.capacity = max(1, prefetch_multiplier or conf.worker_prefetch_multiplier)
        self.queues = list(queues or [conf.task_default_queue])
        hostname = socket_module.gethostname()
        self.name = (name or f"worker@{hostname}").replace("%h", hostname)
        self.node_id = f"{self.name}#{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.heartbeat = heartbeat or conf.broker_heartbeat
        self.liveness = liveness or conf.broker_heartbeat_liveness
        self.monotonic = monotonic
        self.context = context or zmq.Context()
        self.children = []
        self.socket = None
        self.poller = None
        self.welcomed = False
        self.backoff = self.heartbeat
        self.broker_deadline = 0.0
        self.last_sent = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self):
        self.children = [self._spawn(i) for i in range(self.concurrency)]
        self._connect()
        log.info("worker node %s: %d pool processes, queues %s, broker %s", self.node_id,
                 self.concurrency, ",".join(self.queues), self.broker_url)

    def _spawn(self, index):
        return PoolProcess(self.app, index, self.node_id, self.broker_url, self.capacity)

    def stop(self):
        """Hand every delivery back (the broker requeues it at once) and stop the pool."""
        for child in self.children:
            child.kill()
        if self.socket is not None:
            self._send(P.DISCONNECT, P.encode({"reason": "shutdown"}))
            self.socket.close(linger=LINGER_MS)
            self.socket = None
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

    @property
    def timeout(self):
        return self.heartbeat * self.liveness

    def _connect(self):
        """A new socket each time (a new routing id), as the Paranoid Pirate worker does."""
        if self.socket is not None:
            self.socket.close(linger=0)
        identity = f"n:{self.node_id}:{uuid.uuid4().hex[:6]}".encode()
        self.socket = dealer(self.context, self.broker_url, identity, LINGER_MS)
        self.poller = None
        self.welcomed = False
        #: when we give up on this socket if the broker stays silent (grows with backoff)
        self.broker_deadline = self.monotonic() + max(self.timeout, self.backoff)
        self._send(P.READY, P.encode({
            "node": self.node_id, "slots": self.concurrency, "queues": self.queues,
            "running": self._running(), "pid": os.getpid(), "host": socket_module.gethostname(),
            "name": self.name}))

    def _running(self):
        return sorted(token for child in self.children if (token := child.running()))

    # -- the loop ------------------------------------------------------------------------------
    def poll_once(self, max_wait=0.25):
        if self.poller is None:
            self.poller = zmq.Poller()
            self.poller.register(self.socket, zmq.POLLIN)
            for child in self.children:
                self.poller.register(child.sentinel, zmq.POLLIN)
        now = self.monotonic()
        next_beat = self.last_sent + self.heartbeat if self.welcomed else self.broker_deadline
        ready = dict(self.poller.poll(int(max(0.0, min(max_wait, next_beat - now)) * 1000)))
        now = self.monotonic()
        if ready.get(self.socket):
            self._drain_socket(now)
        for child in list(self.children):
            if ready.get(child.sentinel):
                self._replace(child)
        self._keep_alive(now)

    def _drain_socket(self, now):
        for frames in receive_ready(self.socket):
            self.broker_deadline = now + self.timeout
            try:
                command, body = P.split(frames)
            except Exception as exc:  # malformed input from the broker: log it, do not die
                log.warning("dropped malformed message from broker: %s", exc)
                continue
            if command == P.WELCOME:
                info = P.decode(body[0]) if body else {}
                if isinstance(info.get("heartbeat"), (int, float)) and info["heartbeat"] > 0:
                    self.heartbeat = info["heartbeat"]  # the broker sets the pace
                self.welcomed = True
                self.backoff = self.heartbeat
                for child in self.children:
                    child.join_broker(self.heartbeat)
            elif command == P.DISCONNECT:
                log.warning("broker asked us to register again: %s", body[0][:200] if body else "")
                self._connect()
            # HEARTBEAT: hearing anything at all is the point

    def _replace(self, child):
        """A pool process died: report it LOST (the broker redelivers its tasks), start another."""
        code = child.process.exitcode
        token = child.running()
        log.error("pool process %d died (exit code %s)%s", child.pid, code,
                  f" running delivery {token}" if token else "")
        self._send(P.LOST, P.encode({"index": child.index, "running": token,
                                     "reason": f"pool process exited with {code}"}))
        child.close(timeout=0)
        replacement = self._spawn(child.index)
        self.children[self.children.index(child)] = replacement
        self.poller = None
        if self.welcomed:
            replacement.join_broker(self.heartbeat)

    def _keep_alive(self, now):
        if now > self.broker_deadline:
            log.warning("broker silent; reconnecting on a new socket (next try in %.1fs)", self.backoff)
            self.backoff = min(self.backoff * 2, MAX_RECONNECT_BACKOFF)
            self._connect()
        elif self.welcomed and now - self.last_sent >= self.heartbeat:
            self._send(P.HEARTBEAT, P.encode({"running": self._running()}))

    def _send(self, command, *body):
        try:
            send_frames(self.socket, P.message(command, *body))
            self.last_sent = self.monotonic()
        except zmq.ZMQError as exc:
            log.debug("send to broker failed: %s", exc)


def run(app, broker_url, *, parent_pid=None, **options):
    """Serve until SIGTERM/SIGINT (or the parent dies, when started by ``embedq.start``)."""
    from .lifecycle import StopFlag, parent_gone

    if parent_gone(parent_pid):  # it died before we got here
        return
    stop = StopFlag()
    node = WorkerNode(app, broker_url, **options)
    node.serve(lambda: stop or parent_gone(parent_pid))


if __name__ == "__main__":
    from .cli import worker_main

    worker_main()
