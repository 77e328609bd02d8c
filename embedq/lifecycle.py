"""Process hygiene shared by broker, worker node and pool children: no orphans, clean signals,
one broker per data dir."""

import ctypes
import fcntl
import os
import signal
import sys

from .errors import DataDirLocked

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig=signal.SIGTERM, parent_pid=None):
    """Ask Linux to send ``sig`` to this process when its parent dies (even by kill -9).

    Linux sends it when the parent *thread* that started us exits, so this is only for children
    started by a process's main thread (pool processes of a worker node). The broker and the
    node of ``embedq.start()``, which any thread may call, poll :func:`parent_gone` instead.
    Elsewhere this is a no-op. If the parent is already gone, exit at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent_pid is not None and parent_gone(parent_pid):
        os._exit(0)


def parent_gone(parent_pid):
    return parent_pid is not None and os.getppid() != parent_pid


class StopFlag:
    """SIGTERM/SIGINT set a flag the loop checks; a second signal raises KeyboardInterrupt.

    The first signal asks for a clean stop (commit, hand leases back); the second is cold.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), raise_on_second=True):
        self.requested = False
        self.count = 0
        #: False: a loop that handles cold shutdown itself reads ``count`` instead
        self.raise_on_second = raise_on_second
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        self.requested = True
        if self.count > 1 and self.raise_on_second:
            raise KeyboardInterrupt

    def __bool__(self):
        return self.requested


def lock_data_dir(path):
    """Exclusive, non-blocking flock; released by the OS if the broker dies (even by kill -9)."""
    lock_file = open(os.path.join(path, "broker.lock"), "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        owner = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise DataDirLocked(
            f"another broker (pid {owner}) is using data dir {path!r}; stop it or choose another "
            "--data-dir") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    return lock_file
