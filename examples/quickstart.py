"""Quickstart: tasks, a broker and a worker pool in one script.

    python examples/quickstart.py
"""

import tempfile

import embedq

app = embedq.App("quickstart")


@app.task
def add(x, y):
    return x + y


@app.task
def divide(x, y):
    return x / y


if __name__ == "__main__":  # the worker processes import this file; the guard keeps them idle
    with tempfile.TemporaryDirectory() as data_dir, embedq.start(app, workers=2, data_dir=data_dir) as cluster:
        result = add.delay(4, 5)            # returns once the task is committed to disk
        print("add(4, 5) =", result.get(timeout=10), result.state)

        try:
            divide.delay(1, 0).get(timeout=10)
        except ZeroDivisionError as exc:    # the worker's exception, with its traceback attached
            print("divide(1, 0) raised", repr(exc))

        # The cluster is also a concurrent.futures.Executor, for any picklable callable.
        squares = list(cluster.map(lambda n: n * n, range(10)))
        print("squares:", squares)
