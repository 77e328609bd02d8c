"""The supervisor's handle on one pool process: start it, read its status array, signal it.

The process itself (the loop that runs tasks) is :mod:`embedq.pool`; this side only starts it
with ``spawn``, talks to it over a one-way pipe (``J``: join the broker, ``D``: warm shutdown,
``R``: retire), reads the shared status array it writes (what it runs, since when, the hard
deadline, how much it prefetched) and sends it signals (SIGUSR1 to drain while busy, SIGKILL at a
hard time limit, SIGTERM/SIGKILL on REVOKE).
"""

import multiprocessing
import os
import signal

from . import limits as L
from .pool import (CURRENT_SIZE, DEADLINE, IDLE_SINCE, LIMIT, RAN, RECEIVED, SERVING, STARTED,
                   STATUS_FIELDS, TOKEN, WAITING, _child_main)


class PoolProcess:
    """The supervisor's handle on one pool process."""

    def __init__(self, app, index, node_id, broker_url, capacity, limits=L.NO_LIMITS, context=None):
        context = context or multiprocessing.get_context("spawn")
        self.index = index
        self.control, child_end = context.Pipe(duplex=False)[::-1]
        #: see TOKEN..SERVING: what it runs, since when, until when. Written by the child.
        self.status = context.RawArray("d", STATUS_FIELDS)
        #: b"task id\0task name\0" of what it runs, for the supervisor's time-limit result
        self.current = context.RawArray("c", CURRENT_SIZE)
        #: set when the supervisor ends it (time limit, revoke): what to report when it is gone
        self.ending = None
        #: asked to retire by autoscale: not replaced when it exits
        self.retiring = False
        self.process = context.Process(
            target=_child_main,
            args=(child_end, self.status, self.current, app, node_id, index, broker_url, capacity,
                  limits, os.getpid()),
            name=f"embedq-pool-{index}", daemon=True)
        self.process.start()
        child_end.close()
        self.sentinel = self.process.sentinel
        self.pid = self.process.pid

    def join_broker(self, heartbeat):
        """Tell the process to (re-)join the broker on a new socket."""
        self._command(b"J%f" % heartbeat)

    def drain(self):
        """Warm shutdown: hand back what is prefetched now, finish the running task, exit."""
        self._command(b"D")
        if self.status[SERVING]:  # busy: only a signal reaches it (before SERVING it would die)
            self.send_signal(signal.SIGUSR1)

    def retire(self):
        """Autoscale: leave once the current task (if any) is done."""
        self.retiring = True
        self._command(b"R")

    def _command(self, command):
        try:
            self.control.send_bytes(command)
        except OSError:
            pass  # it died; the sentinel reports that

    def running(self):
        """The delivery token the process is running, or None."""
        token = int(self.status[TOKEN])
        return token or None

    def overdue(self, now):
        """(token, task id, task name, limit, started) if the running task is past its hard
        limit at ``now`` (time.monotonic()), else None."""
        token, deadline = self.running(), self.status[DEADLINE]
        if not token or not deadline or now < deadline:
            return None
        task_id, _, rest = self.current.raw.partition(b"\0")
        name = rest.partition(b"\0")[0]
        found = (token, task_id.decode(errors="replace"), name.decode(errors="replace"),
                 self.status[LIMIT], self.status[STARTED])
        return found if self.running() == token else None  # it did not just move on

    def deadline(self):
        """time.monotonic() of the running task's hard limit, or None."""
        return (self.status[DEADLINE] or None) if self.running() else None

    def load(self):
        """(busy, deliveries waiting, idle since, serving, tasks run, deliveries received), for
        autoscale decisions."""
        status = self.status
        return (self.running() is not None, int(status[WAITING]), status[IDLE_SINCE],
                bool(status[SERVING]), int(status[RAN]), int(status[RECEIVED]))

    def send_signal(self, sig):
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

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
