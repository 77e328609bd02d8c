"""countdown / eta / expires: held by the broker (never handed to a worker early), fired on time,
kept across a broker kill -9; an expired task never runs and ends REVOKED."""

import datetime
import time

import pytest

import embedq
from conftest import wait_until
from embedq import states

pytestmark = pytest.mark.timeout(60)

#: Lateness allowed in these tests: generous, a loaded 2-core CI box (bench/ measures the real
#: figure). Earliness is never allowed.
LATE = 1.0


def test_countdown_is_held_by_the_broker_and_fires_on_time(app, start_worker):
    import testapp

    start_worker()
    result = testapp.lateness.apply_async(countdown=1.0)
    assert result.state == states.PENDING  # scheduled: known, not delivered
    assert 0 <= result.get(timeout=20) < LATE


def test_eta_as_an_aware_datetime(app, start_worker):
    import testapp

    start_worker()
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=0.5)
    assert 0 <= testapp.lateness.apply_async(eta=eta).get(timeout=20) < LATE


def test_scheduled_task_survives_a_broker_kill(app, broker, start_worker):
    import testapp

    start_worker()
    result = testapp.lateness.apply_async(countdown=2.0)
    broker.kill()
    broker.start()
    assert 0 <= result.get(timeout=30) < LATE + 2  # a restart may wake it late, never early


def test_expired_queued_task_is_revoked_and_never_runs(app, start_worker, tmp_path):
    import testapp

    marks = tmp_path / "marks"
    marks.mkdir()
    result = testapp.record.apply_async((str(marks), "late"), expires=0.3)
    wait_until(lambda: result.state == states.REVOKED, timeout=10, message="expiry")
    with pytest.raises(embedq.TaskRevokedError, match="expired"):
        result.get(timeout=5)
    start_worker()
    assert testapp.add.delay(1, 1).get(timeout=20) == 2  # the worker is serving the queue
    assert list(marks.iterdir()) == []


def test_expiry_before_the_eta_revokes_the_scheduled_task(app, start_worker, tmp_path):
    import testapp

    marks = tmp_path / "marks"
    marks.mkdir()
    start_worker()
    result = testapp.record.apply_async((str(marks), "never"), countdown=0.6, expires=0.3)
    with pytest.raises(embedq.TaskRevokedError):
        result.get(timeout=10)
    assert result.state == states.REVOKED
    time.sleep(0.5)  # past the eta: nothing may run it now (an observation window, not a sync)
    assert list(marks.iterdir()) == []


def test_task_expiring_while_prefetched_by_a_pool_process_is_not_run(app, start_worker, tmp_path):
    import testapp

    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    start_worker(concurrency=1, prefetch=4)
    holder = testapp.hold_marked.delay(str(marks), "holder", str(gate))
    wait_until(lambda: list(marks.glob("start.holder.*")), message="the holder to start")
    waiting = testapp.record.apply_async((str(marks), "expired"), expires=0.5)
    wait_until(lambda: waiting.state == states.RECEIVED, message="the delivery to the busy process")
    time.sleep(0.6)  # let its expiry pass while it sits in the process's backlog
    gate.touch()
    assert holder.get(timeout=20)[0] == "holder"
    with pytest.raises(embedq.TaskRevokedError, match="expired"):
        waiting.get(timeout=20)
    assert not list(marks.glob("expired.*"))
