"""Revoke: queued, scheduled, prefetched and unknown ids never run; terminate kills a running
task; revocations survive a broker kill -9."""

import time

import pytest

import embedq
from conftest import wait_until
from embedq import states

pytestmark = pytest.mark.timeout(60)


def assert_revoked(result):
    with pytest.raises(embedq.TaskRevokedError):
        result.get(timeout=20)
    assert result.state == states.REVOKED


def prove_worker_idle(testapp):
    """A task submitted after the others has completed: the queue before it was served."""
    assert testapp.add.delay(2, 2).get(timeout=20) == 4


def test_queued_task_revoked_never_runs(app, start_worker, marks):
    import testapp

    result = testapp.record.delay(str(marks), "queued")
    result.revoke()
    assert_revoked(result)
    start_worker()
    prove_worker_idle(testapp)
    assert list(marks.iterdir()) == []


def test_scheduled_task_revoked_never_runs(app, start_worker, marks):
    import testapp

    start_worker()
    result = testapp.record.apply_async((str(marks), "scheduled"), countdown=0.5)
    app.control.revoke(result.id)
    assert_revoked(result)
    time.sleep(0.7)  # past its eta: an observation window, not a synchronisation
    prove_worker_idle(testapp)
    assert list(marks.iterdir()) == []


def test_an_id_revoked_before_it_is_submitted_never_runs(app, start_worker, marks):
    import testapp

    app.control.revoke("not-yet")
    start_worker()
    result = testapp.record.apply_async((str(marks), "early"), task_id="not-yet")
    assert_revoked(result)
    prove_worker_idle(testapp)
    assert list(marks.iterdir()) == []


def test_prefetched_task_revoked_is_dropped_by_its_pool_process(app, start_worker, marks, tmp_path):
    import testapp

    gate = tmp_path / "gate"
    start_worker(concurrency=1, prefetch=4)
    holder = testapp.hold_marked.delay(str(marks), "holder", str(gate))
    wait_until(lambda: list(marks.glob("start.holder.*")), message="the holder to start")
    waiting = testapp.record.delay(str(marks), "prefetched")
    wait_until(lambda: waiting.state == states.RECEIVED, message="the delivery to the busy process")
    waiting.revoke()  # the process reads it when the holder is done, before running the next
    gate.touch()
    assert holder.get(timeout=20)[0] == "holder"
    assert_revoked(waiting)
    prove_worker_idle(testapp)
    assert not list(marks.glob("prefetched.*"))


def test_revoke_without_terminate_lets_a_running_task_finish(app, start_worker, marks, tmp_path):
    import testapp

    gate = tmp_path / "gate"
    start_worker(concurrency=1)
    running = testapp.hold_marked.delay(str(marks), "run", str(gate))
    wait_until(lambda: list(marks.glob("start.run.*")), message="the task to start")
    running.revoke()
    gate.touch()
    assert running.get(timeout=20)[0] == "run"  # as in Celery: revoke does not stop a running task


def test_terminate_kills_the_running_task(app, start_worker, marks, tmp_path):
    import testapp

    start_worker(concurrency=1)
    running = testapp.hold_marked.delay(str(marks), "victim", str(tmp_path / "never"))
    wait_until(lambda: list(marks.glob("start.victim.*")), message="the task to start")
    running.revoke(terminate=True, signal="SIGKILL")
    assert_revoked(running)
    assert not list(marks.glob("done.victim.*"))
    assert testapp.add.delay(1, 2).get(timeout=20) == 3  # a fresh pool process took over


def test_revocation_survives_a_broker_kill(app, broker, start_worker, marks):
    import testapp

    result = testapp.record.delay(str(marks), "persisted")
    result.revoke()
    broker.kill()
    broker.start()
    start_worker()
    prove_worker_idle(testapp)
    assert_revoked(result)
    assert list(marks.iterdir()) == []
