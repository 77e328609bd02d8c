"""Tasks the test suite's worker processes run (imported by ``python -m embedq.worker -A testapp``)."""

import os
import time

import embedq

app = embedq.App("testapp")


@app.task
def add(x, y):
    return x + y


@app.task
def noop():
    return None


@app.task
def fail(message="boom"):
    raise ValueError(message)


@app.task
def pid():
    return os.getpid()


@app.task(bind=True)
def whoami(self):
    return {"id": self.request.id, "task": self.request.task, "retries": self.request.retries}


@app.task(name="custom.name")
def renamed():
    return "renamed"


@app.task
def record(marker_dir, value=None, delay=0.0):
    """Leave one file per execution (so a test can count runs), optionally after ``delay``."""
    if delay:
        time.sleep(delay)
    path = os.path.join(marker_dir, f"{value}.{os.getpid()}.{time.monotonic_ns()}")
    with open(path, "w") as handle:
        handle.write(str(os.getpid()))
    return value, os.getpid()


@app.task
def wait_for_file(path, timeout=30.0):
    """Block until ``path`` exists: lets a test hold a task 'running' as long as it needs."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return os.getpid()


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickle rebuilds with one arg: this cannot be unpickled
        super().__init__(f"{a}-{b}")


@app.task
def fail_unpicklable():
    raise Unpicklable(1, 2)


def _mark(marker_dir, stage, value):
    """Atomically leave ``<stage>.<value>.<pid>.<ns>`` holding the wall-clock time, for the tests."""
    name = f"{stage}.{value}.{os.getpid()}.{time.monotonic_ns()}"
    temporary = os.path.join(marker_dir, f".{name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(repr(time.time()))
    os.replace(temporary, os.path.join(marker_dir, name))


@app.task
def hold_marked(marker_dir, value, gate, timeout=30.0):
    """Like ``wait_for_file``, but observable: a ``start`` marker when a pool child begins running
    it, a ``done`` marker when the gate has opened and it finishes. Returns ``(value, pid)``, so a
    test can tell which pool child's run produced the stored result (``value`` has no dots)."""
    _mark(marker_dir, "start", value)
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(gate)
        time.sleep(0.01)
    _mark(marker_dir, "done", value)
    return value, os.getpid()


@app.task
def crash(marker_dir):
    """Kill the pool process running it (a poison pill), after leaving a marker per attempt."""
    import signal

    _mark(marker_dir, "crash", "x")
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
def hold(gate, started_dir):
    """Mark that it started (one file per run), then block until ``gate`` exists."""
    open(os.path.join(started_dir, f"{os.getpid()}.{time.monotonic_ns()}"), "w").close()
    return wait_for_file.run(gate)


# -- time limits and pool process management (tests/test_time_limits.py, test_worker_management.py)
@app.task
def sleeper(seconds, marker_dir=None, value="s"):
    """Sleep in Python (interruptible by signals), leaving a start marker per run if asked."""
    if marker_dir:
        _mark(marker_dir, "start", value)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return value, os.getpid()


@app.task(time_limit=1)
def limited_sleeper(seconds):
    """Per-task hard limit (``@app.task(time_limit=1)``)."""
    time.sleep(seconds)
    return os.getpid()


@app.task
def gil_hog(marker_dir=None):
    """Hold the GIL in C for minutes (``sum`` over a range runs no bytecode, so no signal
    handler): only a hard time limit that kills the process can end it."""
    if marker_dir:
        _mark(marker_dir, "start", "hog")
    return sum(range(10 ** 12))


@app.task
def soft_cleanup(seconds=30.0):
    """Catch the soft limit and clean up: returns ("cleaned up", pid, seconds run)."""
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            time.sleep(0.01)
    except embedq.SoftTimeLimitExceeded:
        return "cleaned up", os.getpid(), time.monotonic() - started
    return "finished", os.getpid(), time.monotonic() - started


_HOARD = []


@app.task
def hog_memory(mebibytes):
    """Grow this pool process's resident memory by ``mebibytes`` MiB and keep it."""
    _HOARD.append(b"x" * (mebibytes << 20))  # bytes(*) writes every page: they become resident
    return os.getpid()
