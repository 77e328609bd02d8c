"""Time limits with real processes: a real broker, real worker nodes, tasks that overrun.

The hard limit is enforced by the worker node's supervisor (it kills the pool process, reports
the task FAILURE/TimeLimitExceeded with its LOST, and starts a fresh process), so it ends even a
task stuck in C code holding the GIL; the soft limit raises SoftTimeLimitExceeded inside the task.
"""

import math
import time

import pytest

import embedq
from embedq import protocol as P
from embedq import states

from conftest import pid_gone, pool_children, wait_until

pytestmark = pytest.mark.timeout(90)

#: The supervisor wakes at the deadline of the running task; allow for a loaded 2-core box.
KILL_BOUND = 2.0


def start_markers(directory, value):
    return sorted(directory.glob(f"start.{value}.*"))


def marker_time(path):
    return float(path.read_text())


def single_node(start_worker, args=()):
    """A node with one pool process (prefetch 4); returns (worker, pid of its pool process)."""
    import testapp

    worker = start_worker(concurrency=1, prefetch=4, args=args)
    child = testapp.pid.delay().get(timeout=30)
    assert {p.pid for p in pool_children(worker.pid)} == {child}
    return worker, child


def test_hard_limit_kills_a_task_holding_the_gil_and_the_node_carries_on(broker, start_worker, app,
                                                                         tmp_path):
    import testapp

    worker, first_child = single_node(start_worker)
    # The hog and three tasks prefetched behind it by the same pool process, in one submit.
    hog = testapp.gil_hog.build_message((str(tmp_path),), time_limit=1, soft_time_limit=0.3)
    rest = [testapp.add.build_message((i, 1)) for i in range(3)]
    results = app.send_messages([hog, *rest])

    with pytest.raises(embedq.TimeLimitExceeded, match="time limit of 1s"):
        results[0].get(timeout=30)
    ended = time.time()
    (marker,) = start_markers(tmp_path, "hog")
    # the soft limit could not interrupt C code; the hard one ended it on time
    assert 1.0 <= ended - marker_time(marker) < 1.0 + KILL_BOUND
    assert results[0].state == states.FAILURE
    assert "TimeLimitExceeded" in results[0].traceback
    # the prefetched tasks were handed to the fresh pool process and ran
    assert [r.get(timeout=30) for r in results[1:]] == [1, 2, 3]
    # the killed process was replaced; the node itself was never evicted or restarted
    wait_until(lambda: pid_gone(first_child), timeout=5, message="the killed pool process to be gone")
    new_child = testapp.pid.delay().get(timeout=30)
    assert new_child != first_child
    assert worker.process.poll() is None
    assert {p.pid for p in pool_children(worker.pid)} == {new_child}
    # a timed-out task is settled, not redelivered: it started exactly once
    assert len(start_markers(tmp_path, "hog")) == 1


def test_hard_limit_per_task_and_per_call(broker, start_worker, app, tmp_path):
    import testapp

    worker, _ = single_node(start_worker)
    started = time.monotonic()
    with pytest.raises(embedq.TimeLimitExceeded):
        testapp.limited_sleeper.delay(30).get(timeout=30)  # @app.task(time_limit=1)
    assert time.monotonic() - started < 1.0 + KILL_BOUND + 1.0
    # a per-call limit overrides the task's own: 1.5 s of sleep is fine under 20 s
    child = testapp.limited_sleeper.apply_async((1.5,), time_limit=20).get(timeout=30)
    assert child in {p.pid for p in pool_children(worker.pid)}
    with pytest.raises(embedq.TimeLimitExceeded):
        testapp.sleeper.apply_async((30,), time_limit=0.5).get(timeout=30)


def test_soft_limit_lets_the_task_clean_up_in_the_same_process(broker, start_worker, app):
    import testapp

    _, child = single_node(start_worker)
    outcome, pid, ran = testapp.soft_cleanup.apply_async(soft_time_limit=0.3).get(timeout=30)
    assert outcome == "cleaned up"
    assert 0.3 <= ran < 0.3 + KILL_BOUND
    assert pid == child  # the soft limit does not replace the process
    assert testapp.pid.delay().get(timeout=30) == child


def test_uncaught_soft_limit_fails_the_task(broker, start_worker, app):
    import testapp

    _, child = single_node(start_worker)
    result = testapp.sleeper.apply_async((30,), soft_time_limit=0.3)
    with pytest.raises(embedq.SoftTimeLimitExceeded):
        result.get(timeout=30)
    assert result.state == states.FAILURE
    assert testapp.pid.delay().get(timeout=30) == child


def test_worker_default_limits_from_the_command_line(broker, start_worker, app, tmp_path):
    import testapp

    single_node(start_worker, args=["--time-limit", "1", "--soft-time-limit", "0.3"])
    assert testapp.soft_cleanup.delay(30).get(timeout=30)[0] == "cleaned up"
    with pytest.raises(embedq.TimeLimitExceeded):
        testapp.gil_hog.delay(str(tmp_path)).get(timeout=30)
    # a task's own limit wins over the worker's default
    assert testapp.soft_cleanup.apply_async((0.5,), soft_time_limit=10).get(timeout=30)[0] == "finished"


def test_app_default_time_limit_applies_in_embedded_mode(tmp_path):
    import testapp

    conf = testapp.app.conf
    conf.task_time_limit = 1
    try:
        with embedq.start(testapp.app, workers=1, data_dir=str(tmp_path / "data"),
                          durability="process"):
            with pytest.raises(embedq.TimeLimitExceeded):
                testapp.gil_hog.delay().get(timeout=30)
            assert testapp.add.delay(2, 2).get(timeout=30) == 4
    finally:
        conf.task_time_limit = None


def test_limits_travel_in_the_task_header_and_are_validated():
    import testapp

    _, raw, _ = testapp.limited_sleeper.build_message((1,), soft_time_limit=0.5)
    header = P.decode(raw)
    assert (header["time_limit"], header["soft_time_limit"]) == (1, 0.5)
    _, raw, _ = testapp.add.build_message((1, 2))
    assert "time_limit" not in P.decode(raw) and "soft_time_limit" not in P.decode(raw)
    for bad in (0, -1, math.nan, math.inf, True, "3"):
        with pytest.raises(ValueError, match="positive number of seconds"):
            testapp.add.build_message((1, 2), time_limit=bad)
        with pytest.raises(ValueError, match="positive number of seconds"):
            testapp.add.build_message((1, 2), soft_time_limit=bad)
