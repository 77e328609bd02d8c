"""embedq.start(): the broker and a worker node as children of the calling script."""

import concurrent.futures
import os
import subprocess
import sys
import textwrap

import pytest

import embedq
from embedq import states

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cluster(tmp_path):
    import testapp

    with embedq.start(testapp.app, workers=2, data_dir=str(tmp_path / "data"), durability="process") as handle:
        yield handle


def test_tasks_round_trip_in_process_durability(cluster):
    import testapp

    result = testapp.add.delay(4, 5)
    assert result.get(timeout=30) == 9
    assert result.state == states.SUCCESS


def test_executor_runs_lambdas_and_closures(cluster):
    offset = 10
    future = cluster.submit(lambda x: x + offset, 5)
    assert future.result(timeout=30) == 15
    assert list(cluster.map(lambda a, b: a * b, range(5), range(5))) == [0, 1, 4, 9, 16]


def test_executor_futures_work_with_wait_and_as_completed(cluster):
    futures = [cluster.submit(pow, 2, n) for n in range(8)]
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert not not_done
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=30)) == [2 ** n for n in range(8)]


def test_executor_future_carries_the_exception(cluster):
    future = cluster.submit(divmod, 1, 0)
    with pytest.raises(ZeroDivisionError):
        future.result(timeout=30)
    assert isinstance(future.exception(), ZeroDivisionError)


def test_executor_map_is_batched_and_ordered(cluster):
    assert list(cluster.map(abs, range(-2500, 0))) == list(range(2500, 0, -1))


def test_stop_restores_the_app_and_refuses_new_work(tmp_path):
    import testapp

    before = testapp.app.conf.broker_url
    handle = embedq.start(testapp.app, workers=1, data_dir=str(tmp_path / "d"), durability="process")
    broker_pid, worker_pid = handle.broker_process.pid, handle.worker_process.pid
    assert testapp.add.delay(1, 2).get(timeout=30) == 3
    handle.shutdown()
    assert testapp.app.conf.broker_url == before
    for pid in (broker_pid, worker_pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError):
        handle.submit(abs, -1)


def test_tasks_defined_in_the_script_itself(tmp_path):
    """A newcomer's first script: tasks in __main__, start() under the __main__ guard."""
    script = tmp_path / "first.py"
    script.write_text(textwrap.dedent(f"""
        import embedq

        app = embedq.App("first")

        @app.task
        def add(x, y):
            return x + y

        class Point:
            def __init__(self, x):
                self.x = x

        @app.task
        def double(point):
            return Point(point.x * 2)

        if __name__ == "__main__":
            with embedq.start(app, workers=2, data_dir={str(tmp_path / 'data')!r}) as cluster:
                print("add", add.delay(4, 5).get(timeout=30))
                print("name", add.name)
                print("point", double.delay(Point(21)).get(timeout=30).x)
                print("lambda", cluster.submit(lambda: "ok").result(timeout=30))
    """))
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                               timeout=80, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines == ["add 9", "name first.add", "point 42", "lambda ok"]


def test_accepted_tasks_survive_a_restart_of_the_embedded_cluster(tmp_path):
    """Submit with no worker able to run it, stop, start again on the same data dir: it runs."""
    import testapp

    data_dir = str(tmp_path / "data")
    with embedq.start(testapp.app, workers=1, data_dir=data_dir, queues=["elsewhere"]):
        pending = testapp.add.delay(20, 22)
        assert pending.state == states.PENDING
    with embedq.start(testapp.app, workers=1, data_dir=data_dir):
        assert embedq.AsyncResult(pending.id, app=testapp.app).get(timeout=30) == 42
