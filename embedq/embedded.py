"""``embedq.start()``: a broker and a worker node as children of the calling script.

::

    your script (this process)                 children
    --------------------------                 -----------------------------------------------
    Cluster.submit / task.delay  --DEALER-->   broker   (python -m embedq.broker, own interpreter)
    Cluster result thread       <--DEALER--        ^ ROUTER on ipc:// in a private temp dir
                                                   |
                                               worker node (multiprocessing spawn: imports your
                                               script as __mp_main__, so its tasks exist there)
                                                   +-- pool processes 1..N

The broker runs as ``python -m embedq.broker`` so it never imports (or runs) your code; the
worker node is spawned like a ``multiprocessing`` child, hence the ``if __name__ == "__main__":``
guard. Both die with this process (PR_SET_PDEATHSIG, plus a parent-pid check), so even a
``kill -9`` of the script leaves no orphans behind.
"""

import atexit
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid


from . import protocol as P
from . import serialize, states
from .app import default_app
from .client import Connection
from .config import default_concurrency, default_data_dir
from .pool import CALL_TASK
from .transport import receive_ready, wait_readable

log = logging.getLogger(__name__)

#: Seconds to wait for the broker child to report its address before giving up.
BROKER_START_TIMEOUT = 30.0
#: Seconds a child gets to stop cleanly before it is killed.
STOP_TIMEOUT = 5.0
#: Tasks per SUBMIT message in ``Cluster.map`` (one commit each).
MAP_BATCH = 1000


def start(app=None, workers=None, data_dir=None, *, durability=None, bind=None, queues=None,
          worker_name=None, beat=True):
    """Start a broker and one worker node with ``workers`` pool processes; return a Cluster.

    ``data_dir`` defaults to ``app.conf.broker_data_dir`` or a per-app directory under
    ``~/.local/share/embedq``, so tasks accepted before a crash run after the next start.
    ``bind`` defaults to a private ``ipc://`` socket; pass ``tcp://127.0.0.1:PORT`` to let other
    processes on this box submit too. With ``beat`` (the default) the broker fires periodic
    tasks, and the app's ``beat_schedule`` and ``add_periodic_task`` entries are registered.
    """
    cluster = Cluster(app or default_app(), workers=workers, data_dir=data_dir,
                      durability=durability, bind=bind, queues=queues, worker_name=worker_name,
                      beat=beat)
    cluster.start()
    return cluster


class Cluster(concurrent.futures.Executor):
    """Handle on the embedded broker and worker node; also a ``concurrent.futures.Executor``."""

    def __init__(self, app, *, workers=None, data_dir=None, durability=None, bind=None,
                 queues=None, worker_name=None, beat=True):
        conf = app.conf
        self.app = app
        self.workers = workers or conf.worker_concurrency or default_concurrency()
        self.data_dir = data_dir or conf.broker_data_dir or default_data_dir(app.main)
        self.durability = durability or conf.broker_durability
        self.queues = queues
        self.worker_name = worker_name or "embedded@%h"
        self.beat = beat
        self._socket_dir = None
        self.bind = bind
        self.broker_process = None
        self.worker_process = None
        self.endpoint = None
        self._previous_url = None
        self._futures = {}
        self._submitting = set()   # ids sent but not yet acknowledged: not UNKNOWN, just early
        self._futures_lock = threading.Lock()
        self._listener = None
        self._listener_identity = b"x:" + uuid.uuid4().hex.encode()
        self._listener_ready = threading.Event()
        self._stopping = threading.Event()
        self._shutdown = False

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self):
        if self.beat:
            self.app.beat.messages()  # a bad periodic entry fails here, before anything starts
        if self.bind is None:  # a short private path: ipc:// paths are limited to ~100 bytes
            self._socket_dir = tempfile.mkdtemp(prefix="embedq-")
            self.bind = f"ipc://{self._socket_dir}/broker.sock"
        self.broker_process, self.endpoint = self._start_broker()
        self._previous_url = self.app.conf.broker_url
        self.app.conf.broker_url = self.endpoint
        self.worker_process = self._start_worker(self.endpoint)
        atexit.register(self.stop)
        if self.beat:
            self.app.beat.sync()
        return self

    def _start_broker(self):
        conf = self.app.conf
        return start_broker_process(
            self.bind, self.data_dir, durability=self.durability, parent_pid=os.getpid(),
            extra_args=["--heartbeat", str(conf.broker_heartbeat),
                        "--result-expires", str(conf.result_expires or 0),
                        "--max-redeliveries", str(conf.broker_max_redeliveries),
                        "--beat" if self.beat else "--no-beat",
                        "--loglevel", logging.getLevelName(logging.getLogger("embedq").getEffectiveLevel())])

    def _start_worker(self, endpoint):
        from .worker import run as run_worker  # here: importing it at the top would make
        # `python -m embedq.worker` import the module twice (runpy warns about that)

        context = multiprocessing.get_context("spawn")
        # the node's warm shutdown must end (and hand back what it holds) before stop() kills it
        grace = self.app.conf.worker_soft_shutdown_timeout
        grace = STOP_TIMEOUT - 1.0 if grace is None else min(grace, STOP_TIMEOUT - 1.0)
        options = {"concurrency": self.workers, "queues": self.queues, "name": self.worker_name,
                   "parent_pid": os.getpid(), "shutdown_timeout": grace}
        process = context.Process(target=run_worker, args=(self.app, endpoint), kwargs=options,
                                  name="embedq-worker", daemon=False)
        process.start()
        return process

    def stop(self, timeout=STOP_TIMEOUT):
        """Stop the worker node, then the broker (both commit what they hold). Idempotent."""
        if self.broker_process is None:
            return
        self._stopping.set()
        atexit.unregister(self.stop)
        if self._listener is not None:
            self._listener.join(timeout)
        self.app.close()
        if self.worker_process is not None and self.worker_process.is_alive():
            self.worker_process.terminate()
            self.worker_process.join(timeout)
            if self.worker_process.is_alive():
                self.worker_process.kill()
                self.worker_process.join()
        if self.broker_process.poll() is None:
            self.broker_process.send_signal(signal.SIGTERM)
            try:
                self.broker_process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.broker_process.kill()
                self.broker_process.wait()
        self.broker_process = None
        self.app.conf.broker_url = self._previous_url
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.shutdown(wait=True)
        return False

    # -- concurrent.futures.Executor -------------------------------------------------------
    def submit(self, fn, /, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the pool; any callable cloudpickle can carry."""
        return self._submit_many([(fn, args, kwargs)])[0]

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """Like ``Executor.map``, but submitted in batches of MAP_BATCH calls per commit."""
        calls = ((fn, args, {}) for args in zip(*iterables))
        futures = []
        while batch := list(itertools.islice(calls, MAP_BATCH)):
            futures += self._submit_many(batch)
        deadline = None if timeout is None else time.monotonic() + timeout

        def results():
            try:
                for future in futures:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    yield future.result(left)
            finally:
                for future in futures:
                    future.cancel()
        return results()

    def shutdown(self, wait=True, *, cancel_futures=False):
        if cancel_futures:
            with self._futures_lock:
                for future in self._futures.values():
                    future.cancel()
        if wait:
            with self._futures_lock:
                pending = list(self._futures.values())
            concurrent.futures.wait(pending)
        self._shutdown = True
        self.stop()

    def _submit_many(self, calls):
        if self._shutdown or self.broker_process is None:
            raise RuntimeError("cannot submit after shutdown")
        self._ensure_listener()
        queue = self.app.conf.task_default_queue if not self.queues else self.queues[0]
        messages, futures, ids = [], [], []
        for fn, args, kwargs in calls:
            payload, codec = serialize.dumps_by_value(((fn, *args), kwargs))
            task_id = P.new_task_id()
            header = {"id": task_id, "task": CALL_TASK, "queue": queue, "codec": codec,
                      "py": serialize.PYTHON_VERSION, "notify": True,
                      "reply_to": self._listener_identity.decode()}
            messages.append((task_id, P.encode(header), payload))
            future = concurrent.futures.Future()
            future.set_running_or_notify_cancel()
            futures.append(future)
            ids.append(task_id)
        with self._futures_lock:  # registered before the submit: a fast result must find it
            self._futures.update(zip(ids, futures))
            self._submitting.update(ids)
        try:
            self.app.client.submit(messages)
        finally:
            with self._futures_lock:
                self._submitting.difference_update(ids)
        return futures

    def _ensure_listener(self):
        if self._listener is None:
            self._listener = threading.Thread(target=self._listen, name="embedq-results", daemon=True)
            self._listener.start()
            self._listener_ready.wait(5)

    def _listen(self):
        """Own a socket the broker pushes executor results to; complete the futures."""
        conn = Connection(self.app.client, identity=self._listener_identity)
        resend = self.app.conf.broker_resend_interval
        conn.send(P.message(P.WAIT, P.encode({"ids": []})))  # connect now; results follow
        self._listener_ready.set()
        last_message = time.monotonic()
        try:
            while not self._stopping.is_set():
                if wait_readable(conn.socket, resend):
                    last_message = time.monotonic()
                    self._drain(conn)
                elif time.monotonic() - last_message >= resend:
                    with self._futures_lock:  # silence: re-ask for everything still pending
                        ids = [i for i in self._futures if i not in self._submitting]
                    if ids:
                        conn.send(P.message(P.WAIT, P.encode({"ids": ids})))
                    last_message = time.monotonic()
        finally:
            conn.socket.close(linger=0)

    def _drain(self, conn):
        for frames in receive_ready(conn.socket, waiting=True):
            try:
                command, body = P.split(frames)
                if command == P.RESULT:
                    for raw, payload in P.pairs(body):
                        self._complete(P.decode(raw), payload)
                elif command == P.STATE:
                    info = P.decode(body[0])
                    if info.get("state") == states.UNKNOWN:
                        self._complete(info, b"")
            except Exception as exc:
                log.warning("dropped malformed result message: %s", exc)

    def _complete(self, header, payload):
        with self._futures_lock:
            future = self._futures.pop(header.get("id"), None)
        if future is None or future.done():
            return
        state = header.get("state")
        if state == states.SUCCESS:
            future.set_result(serialize.loads(payload, header.get("codec"), header.get("py")))
        elif state == states.UNKNOWN:
            from .errors import UnknownTaskError
            future.set_exception(UnknownTaskError(header.get("id")))
        else:
            future.set_exception(serialize.loads_exception(payload, header))


def start_broker_process(bind, data_dir, *, durability="fsync", parent_pid=None, extra_args=(),
                         timeout=BROKER_START_TIMEOUT, **popen_options):
    """Run ``python -m embedq.broker`` and wait until it listens; return (Popen, endpoint).

    The broker reports its real endpoint (``tcp://127.0.0.1:0`` picks a free port) on a pipe,
    so the caller never races its bind.
    """
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "embedq.broker", "--bind", bind, "--data-dir", str(data_dir),
               "--durability", durability, "--ready-fd", str(write_fd), *extra_args]
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    process = subprocess.Popen(command, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, **popen_options)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        line = _read_line(ready, timeout)
    if not line:
        code = process.poll()
        process.kill()
        process.wait()
        raise RuntimeError(f"the broker did not start (exit code {code}); see its error output "
                           f"(data dir {str(data_dir)!r})")
    return process, line.decode().strip()


def _read_line(stream, timeout):
    """Read one line from a pipe with a deadline (the broker may fail before writing it)."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    if not selector.select(timeout):
        return b""
    return stream.readline()
