"""Pool processes: the children of a worker node that run task code.

::

    broker ROUTER  --TASK (token, header, payload)-->  pool process (PoolWorker.serve)
                   <--RESULT / idle HEARTBEAT--------    run one task at a time, resend unsettled
                   --SETTLED / WELCOME------------->    results until SETTLED
                                                        ^ control pipe: "join the broker now"
    worker node (supervisor) ---------------------------+ status array: token running, since when
                              sentinel readable  <== the process died (kill -9, segfault, os._exit)

Each pool process has its own DEALER socket, so a task costs no hop through the supervisor; the
supervisor owns liveness (its heartbeats keep every lease of its processes alive), tells its
processes when to (re-)join, and reports a dead one as LOST so its tasks are redelivered at once.

Processes are started with ``spawn``: a fresh interpreter that imports the app's modules itself,
so no ZeroMQ context, lock or thread of the supervisor leaks into task code. They die with their
supervisor (PR_SET_PDEATHSIG).
"""

import collections
import multiprocessing
import os
import signal
import time
import uuid

import zmq

from . import protocol as P
from . import serialize, states
from .arguments import run_builtin, task_arguments
from .errors import NotRegistered, Retry, TaskRevokedError
from .lifecycle import die_with_parent
from .transport import dealer, receive_ready, send_frames

#: Name of the built-in task that runs a pickled callable (``Cluster.submit`` / ``map``).
CALL_TASK = "embedq.call"
#: Results of back-to-back tasks sent in one message (a lone task's result goes at once).
RESULT_BATCH = 64
#: Milliseconds a pool process's socket may linger at exit to flush a last result.
LINGER_MS = 500


class PoolProcess:
    """The supervisor's handle on one pool process."""

    def __init__(self, app, index, node_id, broker_url, capacity, context=None):
        context = context or multiprocessing.get_context("spawn")
        self.index = index
        self.control, child_end = context.Pipe(duplex=False)[::-1]
        #: [token being run, time it started]; 0 when idle. Written by the child, read here.
        self.status = context.RawArray("d", 2)
        self.process = context.Process(
            target=_child_main,
            args=(child_end, self.status, app, node_id, index, broker_url, capacity, os.getpid()),
            name=f"embedq-pool-{index}", daemon=True)
        self.process.start()
        child_end.close()
        self.sentinel = self.process.sentinel
        self.pid = self.process.pid

    def join_broker(self, heartbeat):
        """Tell the process to (re-)join the broker on a new socket."""
        try:
            self.control.send_bytes(b"J%f" % heartbeat)
        except OSError:
            pass  # it died; the sentinel reports that

    def running(self):
        """The delivery token the process is running, or None."""
        token = int(self.status[0])
        return token or None

    def kill(self):
        if self.process.is_alive():
            self.process.kill()

    def close(self, timeout=1.0):
        """Ask the process to exit (closing its pipe); kill it if it does not within ``timeout``."""
        self.control.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(1.0)


def _child_main(control, status, app, node_id, index, broker_url, capacity, parent_pid):
    die_with_parent(signal.SIGKILL, parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    PoolWorker(control, status, app, node_id, index, broker_url, capacity).serve()


class PoolWorker:
    """The loop inside a pool process."""

    def __init__(self, control, status, app, node_id, index, broker_url, capacity):
        self.control = control
        self.status = status
        self.app = app
        self.node_id, self.index, self.capacity = node_id, index, capacity
        self.broker_url = broker_url
        self.context = zmq.Context()
        self.socket = None
        self.backlog = collections.deque()   # (token, header, payload) received, not yet run
        self.unsettled = {}                   # token -> (result header, payload, sent at)
        self.seen = 0                         # highest delivery token received
        self.heartbeat = 0.5
        self.last_sent = 0.0
        self.finished = []                    # result frames not sent yet (sent when idle)

    def serve(self):
        while True:
            if self.backlog:
                self._run(*self.backlog.popleft())
                wait = 0
            else:
                wait = self.heartbeat
            if self.finished and (not self.backlog or len(self.finished) >= 2 * RESULT_BATCH):
                self._send(P.RESULT, *self.finished)  # one message for a run of short tasks
                self.finished = []
            if not self._poll(wait):
                return

    def _poll(self, wait):
        """Handle control and socket input for up to ``wait`` seconds; False to exit."""
        items = [(self.control.fileno(), zmq.POLLIN)]
        if self.socket is not None:
            items.append((self.socket, zmq.POLLIN))
        ready = dict(zmq.zmq_poll(items, int(wait * 1000)))
        if ready.get(self.control.fileno()):
            try:
                command = self.control.recv_bytes()
            except (EOFError, OSError):
                return False
            if command.startswith(b"J"):
                self.heartbeat = float(command[1:])
                self._join()
        if self.socket is not None:
            if ready.get(self.socket):
                self._drain()
            self._keep_up(time.monotonic())
        return True

    def _join(self):
        if self.socket is not None:
            self.socket.close(linger=0)
            self.backlog.clear()  # what was queued for the old socket goes back to the broker
        identity = f"p:{self.node_id}/{self.index}/{uuid.uuid4().hex[:6]}".encode()
        self.socket = dealer(self.context, self.broker_url, identity, LINGER_MS)
        self._send(P.JOIN, P.encode({"node": self.node_id, "index": self.index, "capacity": self.capacity,
                                     "held": sorted(self.unsettled), "pid": os.getpid()}))
        for token, (header, payload, _) in self.unsettled.items():  # after JOIN, on the new socket
            self._send(P.RESULT, header, payload)
            self.unsettled[token] = (header, payload, time.monotonic())

    def _drain(self):
        for frames in receive_ready(self.socket):
            try:
                command, body = P.split(frames)
                if command == P.TASK:
                    for token, header, payload in P.pairs(body, 3):
                        token = int(token)
                        self.seen = max(self.seen, token)
                        self.backlog.append((token, header, payload))
                elif command == P.REVOKE:
                    self._drop(set(P.int_list(P.decode(body[0]).get("tokens"))))
                elif command == P.SETTLED:
                    for token in body:
                        self.unsettled.pop(int(token), None)
                elif command == P.WELCOME:
                    drop = set(P.decode(body[0]).get("drop", ()))
                    for token in drop:
                        self.unsettled.pop(token, None)
                elif command == P.DISCONNECT:
                    pass  # our node is not registered (yet/any more); it will tell us to re-join
            except Exception:  # malformed input from the broker: drop it, carry on
                continue

    def _run(self, token, raw_header, payload):
        header = P.decode(raw_header)
        expires = header.get("expires")
        if expires is not None and time.time() > expires:  # it waited here past its expiry
            return self._finish(token, *revoked_result(header, token, "expired"))
        self.status[1] = time.time()
        self.status[0] = token

        def report(state, meta=None):
            self._send(P.PROGRESS, P.encode({"id": header["id"], "token": token, "state": state,
                                             "meta": meta}))

        try:
            result, body = execute(self.app, token, header, payload, report)
        finally:
            self.status[0] = 0
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
        try:
            send_frames(self.socket, P.message(command, *body))
            self.last_sent = time.monotonic()
        except zmq.ZMQError:
            pass  # resent later from self.unsettled


def revoked_result(header, token, reason):
    """(result header, payload) of a delivery dropped unrun (revoked, or expired on arrival)."""
    body, meta = serialize.dumps_exception(TaskRevokedError(reason))
    return ({"id": header["id"], "token": token, "task": header.get("task"), "state": states.REVOKED,
             "date_done": time.time(), **meta}, body)


def execute(app, token, header, payload, report=None):
    """Run one task; never raises. Returns (result header dict, result payload)."""
    started = time.time()
    result = {"id": header["id"], "token": token, "task": header["task"]}
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
