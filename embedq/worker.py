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

The supervisor also ends pool processes itself: at a task's hard time limit (SIGKILL; it sees
each process's running token and deadline in its status array, so a task stuck in C code is
ended too; the LOST carries the task's FAILURE/TimeLimitExceeded result), and on REVOKE from the
broker (revoke with terminate). Processes that retire on purpose (max tasks or memory per
child, autoscale) exit with an ``EXIT_*`` code and are reported with the matching LOST kind.

Shutdown: the first SIGTERM/SIGINT is *warm*: every process hands back what it prefetched (the
broker redelivers it at once), running tasks get ``worker_soft_shutdown_timeout`` seconds to
finish and have their results settled, then the node says DISCONNECT (everything still leased to
it is requeued) and exits. A second signal, or the end of that grace period, is *cold*: the pool
is killed now and everything is handed back.
"""

import logging
import os
import signal
import socket as socket_module
import time
import uuid
from typing import NamedTuple

import zmq

from . import autoscale as A
from . import limits as L
from . import pool
from . import protocol as P
from .pool_process import PoolProcess
from .transport import dealer, receive_ready, send_frames

log = logging.getLogger(__name__)

#: Longest wait between reconnect attempts while the broker is unreachable (seconds).
MAX_RECONNECT_BACKOFF = 4.0
#: Milliseconds a closing socket may linger to flush (bounded: never hang at exit).
LINGER_MS = 500
#: Signals REVOKE may ask for (Celery's revoke(terminate=True, signal=...)).
REVOKE_SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
#: What a pool process's exit code says: (LOST kind, reason).
EXIT_KINDS = {
    pool.EXIT_DRAINED: (P.LOST_RECYCLED, "worker shutdown"),
    pool.EXIT_MAX_TASKS: (P.LOST_RECYCLED, "max tasks per child reached"),
    pool.EXIT_MAX_MEMORY: (P.LOST_MEMORY, "above max memory per child"),
    pool.EXIT_SCALED_DOWN: (P.LOST_RECYCLED, "autoscale: idle"),
}


class Ending(NamedTuple):
    """Why the supervisor itself ended a pool process: reported in the LOST once it is gone."""

    kind: str
    token: int
    reason: str
    frames: tuple = ()


class WorkerNode:
    def __init__(self, app, broker_url, *, concurrency=None, queues=None, name=None,
                 prefetch_multiplier=None, heartbeat=None, liveness=None, context=None,
                 monotonic=time.monotonic, time_limit=None, soft_time_limit=None,
                 max_tasks_per_child=None, max_memory_per_child=None, autoscale=None,
                 autoscale_idle=None, shutdown_timeout=None):
        conf = app.conf
        self.app = app
        self.broker_url = broker_url
        self.concurrency = concurrency or conf.worker_concurrency or os.cpu_count() or 1
        #: defaults every pool process applies (time limits; when it retires)
        self.limits = L.Limits.from_settings(conf, time_limit, soft_time_limit, max_tasks_per_child,
                                             max_memory_per_child)
        self.autoscaler = None
        if autoscale:
            maximum, minimum = A.parse(autoscale) if isinstance(autoscale, str) else autoscale
            idle = conf.worker_autoscale_idle if autoscale_idle is None else autoscale_idle
            self.autoscaler = A.Autoscaler(maximum, minimum, idle)
            self.concurrency = minimum
        self.next_scale = 0.0
        #: warm shutdown: seconds running tasks get before the pool is killed (0: none, it is a
        #: cold shutdown at once; None: as long as they need)
        self.shutdown_timeout = (conf.worker_soft_shutdown_timeout if shutdown_timeout is None
                                 else shutdown_timeout)
        self.draining = False
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
        return PoolProcess(self.app, index, self.node_id, self.broker_url, self.capacity, self.limits)

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

    def serve(self, stop=lambda: False, cold=lambda: False):
        """Serve until ``stop()``; then shut down warm until the pool has left, ``cold()`` or the
        grace period ends; then cold (:meth:`stop`)."""
        self.start()
        try:
            while not stop():
                self.poll_once(max_wait=0.25)
            deadline = self.begin_shutdown()
            while self.children and not cold() and (deadline is None or self.monotonic() < deadline):
                self.poll_once(max_wait=0.1)
        finally:
            self.stop()

    def begin_shutdown(self):
        """Warm shutdown: no more work; prefetched deliveries go back now. Returns the deadline
        (None: wait for the running tasks however long they take)."""
        grace = self.shutdown_timeout
        if not self.draining:
            self.draining = True
            log.info("worker node %s: warm shutdown (running tasks get %s; signal again to stop "
                     "now)", self.node_id, "all the time they need" if grace is None else f"{grace:g}s")
            for child in self.children:
                child.drain()
        return None if grace is None else self.monotonic() + grace

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
            "node": self.node_id, "slots": len(self.children), "queues": self.queues,
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
        wait = min(max_wait, next_beat - now)
        deadlines = [d for child in self.children if child.ending is None and (d := child.deadline())]
        if deadlines:
            wait = min(wait, min(deadlines) - time.monotonic())
        ready = dict(self.poller.poll(int(max(0.0, wait) * 1000)))
        now = self.monotonic()
        if ready.get(self.socket):
            self._drain_socket(now)
        for child in list(self.children):
            if ready.get(child.sentinel):
                self._child_exited(child)
        self._enforce_time_limits()
        if self.autoscaler is not None and not self.draining and now >= self.next_scale:
            self.next_scale = now + A.AUTOSCALE_INTERVAL
            self._autoscale()
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
            elif command == P.REVOKE:
                try:
                    self._revoke(P.decode(body[0]) if body else {})
                except Exception as exc:  # malformed: log it, do not die
                    log.warning("dropped malformed REVOKE: %s", exc)
            # HEARTBEAT: hearing anything at all is the point

    def _child_exited(self, child):
        """A pool process is gone: report it LOST (the broker requeues what it still held, or
        settles a time-limit result), and start another unless it was meant to go."""
        child.process.join(1.0)  # the sentinel closes a moment before the exit code is there
        code = child.process.exitcode
        if child.ending is not None:
            kind, token, reason, frames = child.ending
        else:
            kind, reason = EXIT_KINDS.get(code, (P.LOST_CRASH, f"pool process exited with {code}"))
            token, frames = child.running(), ()
        level = logging.ERROR if kind == P.LOST_CRASH else logging.INFO
        log.log(level, "pool process %d (index %d) is gone: %s (%s)%s", child.pid, child.index,
                kind, reason, f", running delivery {token}" if token else "")
        self._send(P.LOST, P.encode({"index": child.index, "running": token, "kind": kind,
                                     "reason": reason}), *frames)
        child.close(timeout=0)
        self.poller = None
        if self.draining or child.retiring:
            self.children.remove(child)
            return
        replacement = self._spawn(child.index)
        self.children[self.children.index(child)] = replacement
        if self.welcomed:
            replacement.join_broker(self.heartbeat)

    def _enforce_time_limits(self):
        """Kill every pool process whose task is past its hard limit (SIGKILL: a task holding
        the GIL in C code cannot be stopped any other way); its LOST settles the task."""
        now = time.monotonic()
        for child in self.children:
            if child.ending is not None or (overdue := child.overdue(now)) is None:
                continue
            token, task_id, name, limit, started = overdue
            log.warning("task %s[%s] exceeded its time limit of %gs: killing pool process %d",
                        name, task_id, limit, child.pid)
            frames = L.time_limit_result(token, task_id, name, limit, started, child.pid)
            child.ending = Ending(P.LOST_TIME_LIMIT, token, f"time limit ({limit:g}s) exceeded", frames)
            child.kill()

    def _revoke(self, info):
        """REVOKE {"tokens", "signal"}: terminate the pool processes running those deliveries."""
        name = info.get("signal") or "SIGTERM"
        sig = REVOKE_SIGNALS.get(name)
        if sig is None:
            log.warning("REVOKE with unsupported signal %r ignored", name)
            return
        tokens = set(P.int_list(info.get("tokens")))
        for child in self.children:
            token = child.running()
            if token in tokens and child.ending is None:
                log.warning("revoked delivery %d: terminating pool process %d with %s",
                            token, child.pid, name)
                child.ending = Ending(P.LOST_TERMINATED, token, f"revoked: terminated with {name}")
                child.send_signal(sig)

    def _autoscale(self):
        loads = [A.Load(child.index, *child.load(), child.retiring) for child in self.children]
        decision = self.autoscaler.decide(loads, time.monotonic())
        if decision == A.GROW:
            used = {child.index for child in self.children}
            index = next(i for i in range(len(used) + 1) if i not in used)
            log.info("autoscale: all %d pool processes busy with work waiting: adding one",
                     len(self.children))
            child = self._spawn(index)
            self.children.append(child)
            self.poller = None
            if self.welcomed:
                child.join_broker(self.heartbeat)
        elif decision is not None:
            child = next(child for child in self.children if child.index == decision)
            log.info("autoscale: pool process %d idle: retiring it", child.pid)
            child.retire()

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
    stop = StopFlag(raise_on_second=False)  # the second signal means cold shutdown
    node = WorkerNode(app, broker_url, **options)
    node.serve(lambda: stop or parent_gone(parent_pid),
               cold=lambda: stop.count > 1 or parent_gone(parent_pid))


if __name__ == "__main__":
    from .cli import worker_main

    worker_main()
