"""Pool processes: the children of a worker node that run task code.

::

    broker ROUTER  --TASK (token, header, payload)-->  pool process (PoolWorker.serve)
                   <--RESULT / idle HEARTBEAT--------    run one task at a time, resend unsettled
                   --SETTLED / WELCOME------------->    results until SETTLED
                                                        ^ control pipe: "join the broker now"
    worker node (supervisor) ---------------------------+ status array: token running, since when,
      (its handle on each process: pool_process.py)        hard deadline, prefetched, idle since
                              sentinel readable  <== the process died (kill -9, segfault, os._exit)

Each pool process has its own DEALER socket, so a task costs no hop through the supervisor; the
supervisor owns liveness (its heartbeats keep every lease of its processes alive), tells its
processes when to (re-)join, and reports a dead one as LOST so its tasks are redelivered at once.

Processes are started with ``spawn``: a fresh interpreter that imports the app's modules itself,
so no ZeroMQ context, lock or thread of the supervisor leaks into task code. They die with their
supervisor (PR_SET_PDEATHSIG).

A process *retires* (max_tasks_per_child, max_memory_per_child, autoscale, warm shutdown): it
sends RELEASE for the deliveries it prefetched but did not start (the broker requeues them at
once and sends it no more), finishes the task it runs, waits for its results to be SETTLED and
exits with one of the ``EXIT_*`` codes, which tell the supervisor what to report. A warm
shutdown reaches a busy process through SIGUSR1, whose handler sends that RELEASE while the task
keeps running (task code never uses the process's socket, so it is free then).
"""

import collections
import os
import signal
import sys
import time
import uuid

import psutil
import zmq

from . import limits as L
from . import protocol as P
from . import serialize, states
from .arguments import run_builtin, task_arguments
from .errors import NotRegistered, Retry, SoftTimeLimitExceeded
from .lifecycle import die_with_parent
from .transport import dealer, receive_ready, send_frames

#: Name of the built-in task that runs a pickled callable (``Cluster.submit`` / ``map``).
CALL_TASK = "embedq.call"
#: Results of back-to-back tasks sent in one message (a lone task's result goes at once).
RESULT_BATCH = 64
#: Milliseconds a pool process's socket may linger at exit to flush a last result.
LINGER_MS = 500
#: Seconds a retiring process waits for the broker to settle its last results before it exits
#: anyway (their tasks are then redelivered: at-least-once).
RETIRE_SETTLE_TIMEOUT = 5.0

# Exit codes of a process that retired on purpose (anything else is a crash).
EXIT_DRAINED = 100       # warm shutdown of the node
EXIT_MAX_TASKS = 101     # ran max_tasks_per_child tasks
EXIT_MAX_MEMORY = 102    # above max_memory_per_child after a task
EXIT_SCALED_DOWN = 103   # autoscale: idle, not needed

# The status array, written by the process, read by the supervisor (floats; 0 means none).
TOKEN = 0          # delivery token being run
STARTED = 1        # wall-clock time it started
DEADLINE = 2       # time.monotonic() of its hard time limit (CLOCK_MONOTONIC is system-wide)
LIMIT = 3          # that hard limit in seconds
WAITING = 4        # deliveries prefetched, not started
IDLE_SINCE = 5     # time.monotonic() the process last became idle
SERVING = 6        # 1 once its signal handlers are installed (it may be sent SIGUSR1)
RAN = 7            # tasks it has run
RECEIVED = 8       # deliveries it has received
STATUS_FIELDS = 9
#: Bytes shared for "task id NUL task name" of the running task (names are at most 255 bytes).
CURRENT_SIZE = 2 * P.MAX_NAME_LENGTH + 2


def _child_main(control, status, current, app, node_id, index, broker_url, capacity, limits,
                parent_pid):
    die_with_parent(signal.SIGKILL, parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    worker = PoolWorker(control, status, app, node_id, index, broker_url, capacity, limits, current)
    code = worker.serve()
    # Interpreter shutdown restores SIGUSR1's default action (terminate): a drain signal sent
    # now would turn this clean exit into a reported crash.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    status[SERVING] = 0
    sys.exit(code)


class PoolWorker:
    """The loop inside a pool process."""

    def __init__(self, control, status, app, node_id, index, broker_url, capacity,
                 limits=L.NO_LIMITS, current=None):
        self.control = control
        self.status = status
        self.current = current
        self.app = app
        self.node_id, self.index, self.capacity = node_id, index, capacity
        self.limits = limits
        self.broker_url = broker_url
        self.context = zmq.Context()
        self.socket = None
        self.control_fd = control.fileno()
        #: what ``_poll`` waits on: the control pipe, then the socket once joined
        self.poll_items = [(self.control_fd, zmq.POLLIN)]
        self.backlog = collections.deque()   # (token, header, payload) received, not yet run
        self.unsettled = {}                   # token -> (result header, payload, sent at)
        self.seen = 0                         # highest delivery token received
        self.heartbeat = 0.5
        self.last_sent = 0.0
        self.finished = []                    # result frames not sent yet (sent when idle)
        self.tasks_run = 0
        self.soft_limit = L.SoftLimit()
        self.in_task = False                  # task code is running (the socket is free, unless
        self.sending = False                  # it is sending a PROGRESS: then this is set)
        self.drain_requested = False          # warm shutdown asked for (pipe or SIGUSR1)
        self.retiring = None                  # EXIT_* code once retiring
        self.retire_deadline = 0.0

    def serve(self):
        """Run until told to stop; returns the exit code (0, or EXIT_* after retiring)."""
        self.soft_limit.install()
        signal.signal(signal.SIGUSR1, self._on_drain_signal)
        self.status[IDLE_SINCE] = time.monotonic()
        self.status[SERVING] = 1
        while True:
            if self.drain_requested:
                self._retire(EXIT_DRAINED)
            if self.backlog and self.retiring is None:
                self._run(*self.backlog.popleft())
                self._check_recycle()
                wait = 0 if self.backlog else self.heartbeat  # idle now: block for input
            else:
                wait = self.heartbeat
            if self.finished and (not self.backlog or len(self.finished) >= 2 * RESULT_BATCH):
                self._send(P.RESULT, *self.finished)  # one message for a run of short tasks
                self.finished = []
            if self.retiring is not None and (not self.unsettled or time.monotonic() > self.retire_deadline):
                if self.socket is not None:
                    self.socket.close(linger=LINGER_MS)
                return self.retiring
            if not self._poll(wait):
                return 0

    def _poll(self, wait):
        """Handle control and socket input for up to ``wait`` seconds; False to exit."""
        ready = dict(zmq.zmq_poll(self.poll_items, int(wait * 1000)))
        if ready.get(self.control_fd):
            try:
                command = self.control.recv_bytes()
            except (EOFError, OSError):
                return False
            if command.startswith(b"J"):
                self.heartbeat = float(command[1:])
                self._join()
            elif command == b"D":
                self.drain_requested = True
            elif command == b"R":
                self._retire(EXIT_SCALED_DOWN)
        if self.socket is not None:
            if ready.get(self.socket):
                self._drain(waiting=True)
            self._keep_up(time.monotonic())
        return True

    def _join(self):
        if self.socket is not None:
            self.socket.close(linger=0)
            self.backlog.clear()  # what was queued for the old socket goes back to the broker
            self.status[WAITING] = 0
        identity = f"p:{self.node_id}/{self.index}/{uuid.uuid4().hex[:6]}".encode()
        self.socket = dealer(self.context, self.broker_url, identity, LINGER_MS)
        self.poll_items[1:] = [(self.socket, zmq.POLLIN)]
        self._send(P.JOIN, P.encode({"node": self.node_id, "index": self.index, "capacity": self.capacity,
                                     "held": sorted(self.unsettled), "pid": os.getpid()}))
        if self.retiring is not None:
            self._release([])  # a new slot for the broker: say at once that it takes no work
        for token, (header, payload, _) in self.unsettled.items():  # after JOIN, on the new socket
            self._send(P.RESULT, header, payload)
            self.unsettled[token] = (header, payload, time.monotonic())

    def _drain(self, waiting=False):
        """Handle all queued input (a REVOKE must be read before the next task starts);
        ``waiting``: a poll has just seen the first message."""
        for frames in receive_ready(self.socket, waiting=waiting):
            try:
                command, body = P.split(frames)
                if command == P.TASK:
                    settled, body = body[0], body[1:]
                    tokens = []
                    for token, header, payload in P.pairs(body, 3):
                        token = int(token)
                        self.seen = max(self.seen, token)
                        tokens.append(token)
                        if self.retiring is None:
                            self.backlog.append((token, header, payload))
                    if self.retiring is not None:  # crossed our RELEASE on the way
                        self._release(tokens)
                    self.status[WAITING] = len(self.backlog)
                    self.status[RECEIVED] += len(tokens)
                    if settled:  # results settled meanwhile: the deferred SETTLED rides along
                        self._settled(settled.split(b","))
                elif command == P.REVOKE:
                    self._drop(set(P.int_list(P.decode(body[0]).get("tokens"))))
                elif command == P.SETTLED:
                    self._settled(body)
                elif command == P.WELCOME:
                    drop = set(P.decode(body[0]).get("drop", ()))
                    for token in drop:
                        self.unsettled.pop(token, None)
                elif command == P.DISCONNECT:
                    pass  # our node is not registered (yet/any more); it will tell us to re-join
            except Exception:  # malformed input from the broker: drop it, carry on
                continue

    def _settled(self, tokens):
        """The broker stored these results (SETTLED, alone or inside a TASK): stop resending."""
        for token in tokens:
            self.unsettled.pop(int(token), None)

    # -- retiring ------------------------------------------------------------------------------
    def _on_drain_signal(self, signum, frame):
        """SIGUSR1 from the supervisor (warm shutdown). While task code runs, the socket is not
        in use (unless a PROGRESS is being sent: then right after it), so the prefetched
        deliveries are handed back right now; otherwise the loop does it before it starts
        anything else."""
        self.drain_requested = True
        if self.in_task and not self.sending:  # (task code may be sending a PROGRESS)
            self._retire(EXIT_DRAINED)

    def _check_recycle(self):
        limits = self.limits
        if limits.max_tasks_per_child and self.tasks_run >= limits.max_tasks_per_child:
            self._retire(EXIT_MAX_TASKS)
        elif limits.max_memory_per_child:
            if L.memory_kib(psutil.Process()) > limits.max_memory_per_child:
                self._retire(EXIT_MAX_MEMORY)

    def _retire(self, code):
        """Run nothing more: hand back every delivery not started (also those still queued on
        the socket: a busy process has not read them yet), then exit once settled."""
        if self.retiring is not None:
            return
        self.retiring = code
        self.retire_deadline = time.monotonic() + RETIRE_SETTLE_TIMEOUT
        self.soft_limit.hold = True  # maybe in a signal handler: no alarm may split a message
        try:
            tokens = [token for token, _, _ in self.backlog]
            self.backlog.clear()
            self.status[WAITING] = 0
            self._release(tokens)
            if self.socket is not None:
                self._drain()  # TASKs received now are released at once (we are retiring)
        finally:
            self.soft_limit.hold = False

    def _release(self, tokens):
        """RELEASE (leaving): the broker requeues ``tokens`` now and sends us no more work."""
        if self.socket is not None:
            self._send(P.RELEASE, P.encode({"tokens": tokens, "leaving": True}))

    # -- running -------------------------------------------------------------------------------
    def _run(self, token, raw_header, payload):
        header = P.decode(raw_header)
        expires = header.get("expires")
        if expires is not None and time.time() > expires:  # it waited here past its expiry
            return self._finish(token, *revoked_result(header, token, "expired"))
        soft, hard = L.effective(header, self.app.tasks.get(header.get("task")), self.limits)
        status = self.status
        status[WAITING] = len(self.backlog)
        if self.current is not None:
            self.current.raw = (f"{header.get('id')}\0{header.get('task')}\0".encode()
                                [:CURRENT_SIZE])
        status[STARTED] = started = time.time()
        status[LIMIT] = hard or 0
        status[DEADLINE] = time.monotonic() + hard if hard else 0
        status[TOKEN] = token

        def report(state, meta=None):
            self._send(P.PROGRESS, P.encode({"id": header["id"], "token": token, "state": state,
                                             "meta": meta}))
            if self.drain_requested:  # a drain signal came during that send: act on it now
                self._retire(EXIT_DRAINED)

        self.in_task = True
        if self.drain_requested:  # asked just before we started: hand the rest back first
            self._retire(EXIT_DRAINED)
        try:
            self.soft_limit.arm(soft)
            result, body = execute(self.app, token, header, payload, report)
        except SoftTimeLimitExceeded as exc:  # fired outside the task's own code
            result, body = L.failure(token, header, exc, started)
        finally:
            self.in_task = False
            self.soft_limit.disarm()
            status[TOKEN] = 0
            status[DEADLINE] = 0
            status[IDLE_SINCE] = time.monotonic()
        self.tasks_run += 1
        status[RAN] = self.tasks_run
        self._finish(token, result, body)

    def _finish(self, token, result, body):
        raw = P.encode(result)
        self.unsettled[token] = (raw, body, time.monotonic())
        self.finished += (raw, body)

    def _drop(self, tokens):
        """The broker revoked these deliveries: the ones not started yet end REVOKED unrun."""
        for item in [item for item in self.backlog if item[0] in tokens]:
            self.backlog.remove(item)
            self._finish(item[0], *revoked_result(P.decode(item[1]), item[0], "revoked"))

    def held(self):
        return sorted({token for token, _, _ in self.backlog} | set(self.unsettled))

    def _keep_up(self, now):
        """Resend results the broker has not settled; report what we hold while idle."""
        timeout = self.heartbeat * 3
        for token, (header, payload, sent) in list(self.unsettled.items()):
            if now - sent > timeout:
                self._send(P.RESULT, header, payload)
                self.unsettled[token] = (header, payload, now)
        if not self.backlog and now - self.last_sent >= self.heartbeat:
            self._send(P.HEARTBEAT, P.encode({"held": self.held(), "seen": self.seen}))

    def _send(self, command, *body):
        self.sending = True  # a signal handler must not send in the middle of this message
        try:
            send_frames(self.socket, P.message(command, *body))
            self.last_sent = time.monotonic()
        except zmq.ZMQError:
            pass  # resent later from self.unsettled
        finally:
            self.sending = False


def revoked_result(header, token, reason):
    """(result header, payload) of a delivery dropped unrun (revoked, or expired on arrival)."""
    result = P.error_result(header["id"], states.REVOKED, "TaskRevokedError", reason, time.time(),
                            header.get("task"))
    return {**result, "token": token}, b""


def execute(app, token, header, payload, report=None):
    """Run one task; never raises. Returns (result header dict, result payload)."""
    started = time.time()
    result = {"id": header["id"], "token": token, "task": header["task"]}
    if "parent_id" in header:  # a workflow step: its result names the step before it
        result["parent_id"] = header["parent_id"]
    try:
        args, kwargs = task_arguments(app, header, payload)
        if header["task"] == CALL_TASK:
            function, args = args[0], args[1:]
            value = function(*args, **kwargs)
        elif (value := run_builtin(app, header["task"], args, kwargs)) is not NotImplemented:
            pass
        else:
            task = app.tasks.get(header["task"])
            if task is None:
                raise NotRegistered(
                    f"task {header['task']!r} is not registered on this worker; start the worker "
                    f"with -A <the module that defines it>")
            track = task.track_started if task.track_started is not None else app.conf.task_track_started
            if track and report is not None:
                report(states.STARTED, {"pid": os.getpid()})
            value = task.run_with_request(header, args, kwargs, report)
        body, codec = serialize.dumps(value)
        result.update(state=states.SUCCESS, codec=codec)
    except Retry as retry:  # not a failure: the broker runs it again at retry.when
        body, meta = serialize.dumps_exception(retry.exc if retry.exc is not None else retry)
        result.update(state=states.RETRY, eta=retry.when, retries=header.get("retries", 0) + 1, **meta)
        new_args = getattr(retry, "new_args", None)
        if new_args is not None:  # the payload is the next run's arguments, not the exception
            body, codec = serialize.dumps(new_args)
            result.update(new_args=True, codec=codec)
    except Exception as exc:  # the task's failure is data; the process carries on
        body, meta = serialize.dumps_exception(exc)
        result.update(state=states.FAILURE, **meta)
    done = time.time()
    result.update(date_done=done, runtime=round(done - started, 6), pid=os.getpid())
    return result, body
