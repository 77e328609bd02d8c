"""Pool processes: the children of a worker node that actually run task code.

::

    worker node (supervisor)                         pool child (this module's child_main)
    ------------------------                         -------------------------------------
    PoolProcess.send(token, header, payload) --pipe--> unpickle args, run the task
    PoolProcess.receive() <------------------------pipe-- result header (JSON) + pickled value
    PoolProcess.sentinel readable  <== the child died (kill -9, segfault, os._exit)

Children are started with the ``spawn`` method: a fresh interpreter that imports the app's
modules itself, so no ZeroMQ context, lock or thread of the supervisor leaks into task code. A
child never talks to the broker; it runs one task at a time so the supervisor always knows which
task a dead child was running. Children die with their supervisor (PR_SET_PDEATHSIG).
"""

import multiprocessing
import os
import signal
import struct
import time

from . import protocol as P
from . import serialize, states
from .errors import NotRegistered
from .lifecycle import die_with_parent

#: Name of the built-in task that runs a pickled callable (``Cluster.submit`` / ``map``).
CALL_TASK = "embedq.call"

_TASK_PREFIX = struct.Struct(">QI")  # token, header length
_U32 = struct.Struct(">I")


class PoolProcess:
    """The supervisor's handle on one child."""

    def __init__(self, app, index, context=None):
        context = context or multiprocessing.get_context("spawn")
        self.index = index
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(
            target=child_main, args=(child_conn, app, os.getpid()),
            name=f"embedq-pool-{index}", daemon=True)
        self.process.start()
        child_conn.close()
        self.sentinel = self.process.sentinel
        self.pid = self.process.pid
        #: (token, task id, started at) of the task it runs, or None when idle
        self.current = None
        self.tasks_run = 0

    def fileno(self):
        return self.conn.fileno()

    @property
    def idle(self):
        return self.current is None

    def send(self, token, task_id, header, payload, now):
        self.conn.send_bytes(_TASK_PREFIX.pack(token, len(header)) + header + payload)
        self.current = (token, task_id, now)

    def receive(self):
        """The finished task's (token, result header, payload); the child is idle again."""
        data = self.conn.recv_bytes()
        header, payload = _split(data)
        token = self.current[0]
        self.current = None
        self.tasks_run += 1
        return token, header, payload

    def alive(self):
        return self.process.is_alive()

    def kill(self):
        if self.process.is_alive():
            self.process.kill()

    def close(self, timeout=1.0):
        """Ask the child to exit (closing its pipe); kill it if it does not within ``timeout``."""
        self.conn.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(1.0)


def _split(data):
    (hlen,) = _U32.unpack_from(data)
    return data[4:4 + hlen], data[4 + hlen:]


def child_main(conn, app, parent_pid):
    """Entry point of a pool child: run tasks from the pipe until it closes."""
    die_with_parent(signal.SIGKILL, parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        token, hlen = _TASK_PREFIX.unpack_from(data)
        start = _TASK_PREFIX.size
        header, payload = P.decode(data[start:start + hlen]), data[start + hlen:]
        result_header, result_payload = execute(app, token, header, payload)
        raw = P.encode(result_header)
        try:
            conn.send_bytes(_U32.pack(len(raw)) + raw + result_payload)
        except OSError:
            return


def execute(app, token, header, payload):
    """Run one task; never raises. Returns (result header dict, result payload)."""
    started = time.time()
    result = {"id": header["id"], "token": token, "task": header["task"]}
    try:
        args, kwargs = serialize.loads(payload, header.get("codec"), header.get("py"))
        if header["task"] == CALL_TASK:
            function, args = args[0], args[1:]
            value = function(*args, **kwargs)
        else:
            task = app.tasks.get(header["task"])
            if task is None:
                raise NotRegistered(
                    f"task {header['task']!r} is not registered on this worker; start the worker "
                    f"with -A <the module that defines it>")
            value = task.run_with_request(header, args, kwargs)
        body, codec = serialize.dumps(value)
        result.update(state=states.SUCCESS, codec=codec)
    except Exception as exc:  # the task's failure is data; the child carries on
        body, meta = serialize.dumps_exception(exc)
        result.update(state=states.FAILURE, **meta)
    done = time.time()
    result.update(date_done=done, runtime=round(done - started, 6), pid=os.getpid())
    return result, body


def lost_result(task_id, token, reason):
    """Result header a supervisor sends when the child running a task died."""
    return P.encode({"id": task_id, "token": token, "state": "LOST", "reason": reason}), b""
