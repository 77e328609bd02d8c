"""What the benchmarked pools run: a no-op embedq task and a no-op plain function.

This lives in an importable module (not in a test file) because every system under test runs
the work in other processes: embedq's worker node is started with ``multiprocessing`` 'spawn'
and finds this App by importing ``bench_tasks``; the baselines' children unpickle ``noop_fn`` by
reference. ``bench/conftest.py`` puts this directory on ``PYTHONPATH`` so any child can import it.
"""

import embedq

app = embedq.App("bench")


@app.task
def noop():
    return None


def noop_fn(*args):
    """Plain no-op for ``ProcessPoolExecutor``, ``multiprocessing.Pool`` and ``Cluster.map``."""
    return None


@app.task(bind=True)
def lateness(self):
    """Seconds from the task's due time (its eta) to the moment a pool process started it."""
    import time

    return time.time() - self.request.eta


@app.task
def square(x):
    return x * x


@app.task
def xsum(numbers):
    return sum(numbers)


def square_fn(x):
    """``square`` as a plain function, for ``multiprocessing.Pool.map``."""
    return x * x
