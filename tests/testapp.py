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
def size_of(data):
    return len(data)


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


# -- issue 3: task semantics -------------------------------------------------------------------
def _attempt(marker_dir):
    """Leave a marker for this run; return how many runs there have been (this one included)."""
    _mark(marker_dir, "attempt", "x")
    return len([n for n in os.listdir(marker_dir) if n.startswith("attempt.")])


@app.task(bind=True, max_retries=5)
def flaky(self, marker_dir, failures, countdown=0.05):
    """Fail (and retry) ``failures`` times, then return the number of runs."""
    runs = _attempt(marker_dir)
    if runs <= failures:
        raise self.retry(exc=ConnectionError(f"attempt {runs}"), countdown=countdown)
    return runs


@app.task(bind=True, max_retries=2, default_retry_delay=0.05)
def always_retry(self, marker_dir):
    runs = _attempt(marker_dir)
    raise self.retry(exc=KeyError(f"attempt {runs}"))


@app.task(bind=True)
def retry_with_new_args(self, value):
    if value < 3:
        raise self.retry(args=(value + 1,), countdown=0.01)
    return value, self.request.retries


@app.task(autoretry_for=(ConnectionError,), dont_autoretry_for=(ConnectionRefusedError,),
          max_retries=3, default_retry_delay=0.05)
def auto_flaky(marker_dir, failures, refuse=False):
    runs = _attempt(marker_dir)
    if refuse:
        raise ConnectionRefusedError("not retried")
    if runs <= failures:
        raise ConnectionError(f"attempt {runs}")
    return runs


@app.task(bind=True)
def lateness(self):
    """Seconds between the task's due time (its eta) and the moment it started."""
    return time.time() - self.request.eta if self.request.eta else None


@app.task(bind=True)
def progress(self, gate):
    self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
    wait_for_file.run(gate)
    return "finished"


@app.task(track_started=True)
def tracked(gate):
    return wait_for_file.run(gate)


@app.task(rate_limit="5/s")
def stamp():
    return time.time()


@app.task(queue="special")
def special():
    return "special"


@app.task
def ordered(marker_dir, value):
    """Leave ``run.<value>...`` (its start order is the marker's monotonic_ns)."""
    _mark(marker_dir, "run", value)
    return value


@app.task(acks_late=False)
def crash_at_most_once(marker_dir):
    return crash.run(marker_dir)


@app.task(reject_on_worker_lost=False)
def crash_no_reject(marker_dir):
    return crash.run(marker_dir)


@app.task(bind=True)
def where(self):
    """The queue this delivery came from."""
    return self.request.delivery_info["queue"]


@app.task
def crash_while(marker_dir, flag):
    """A poison pill while ``flag`` exists, a normal task once it is gone."""
    if os.path.exists(flag):
        return crash.run(marker_dir)
    return "cured"


# -- issue 4: canvas ------------------------------------------------------------------------------
@app.task
def xsum(numbers):
    """Sum, nested lists included (a chord body over a header with a nested group)."""
    return sum(xsum.run(n) if isinstance(n, list) else n for n in numbers)


@app.task
def mul(x, y):
    return x * y


@app.task
def error_handler(request, exc, traceback, marker_dir):
    """A new-style errback: ``(request, exc, traceback)`` before its own arguments."""
    with open(os.path.join(marker_dir, f"errback.{request.id}"), "w") as handle:
        handle.write(f"{type(exc).__name__}: {exc}\n{traceback}")


@app.task
def old_error_handler(task_id, marker_dir):
    """An old-style errback: only the failed task's id."""
    open(os.path.join(marker_dir, f"old-errback.{task_id}"), "w").close()


@app.task
def identity(value):
    return value


@app.task
def slow_add(x, y, delay=0.02):
    time.sleep(delay)
    return x + y


@app.task
def body_marker(results, marker_dir, name):
    """A chord body that leaves one marker per run, so a test can count runs."""
    _mark(marker_dir, "body", name)
    return sum(results)


@app.task(priority=7)
def urgent(marker_dir, value):
    return ordered.run(marker_dir, value)


@app.task(bind=True, max_retries=3)
def add_after_retries(self, x, y, marker_dir, failures=1):
    """``x + y`` after failing ``failures`` times (a chain step that retries keeps its input)."""
    if _attempt(marker_dir) <= failures:
        raise self.retry(exc=ConnectionError("not yet"), countdown=0.05)
    return x + y


@app.task(bind=True, max_retries=3)
def add_retry_new_args(self, x, y):
    """A chain step whose retry changes the arguments (the parent's result is already in them)."""
    if y < 3:
        raise self.retry(args=(x, y + 1), countdown=0.01)
    return x + y


@app.task(rate_limit="1/m")
def once_a_minute():
    return time.time()
