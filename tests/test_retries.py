"""Retries through real broker and worker processes: self.retry, autoretry_for, backoff, RETRY
state, and a pending retry that survives a broker kill -9."""

import random

import pytest

import embedq
from conftest import wait_until
from embedq import states
from embedq.retries import autoretry_countdown, backoff_delay

pytestmark = pytest.mark.timeout(60)


def runs(marks):
    return len(list(marks.glob("attempt.*")))


def test_retry_until_it_succeeds(app, start_worker, tmp_path):
    import testapp

    start_worker()
    result = testapp.flaky.delay(str(tmp_path), 2)
    assert result.get(timeout=20) == 3
    assert runs(tmp_path) == 3
    assert result.state == states.SUCCESS


def test_final_failure_carries_the_last_exception_after_max_retries(app, start_worker, tmp_path):
    import testapp

    start_worker()
    result = testapp.always_retry.delay(str(tmp_path))
    with pytest.raises(KeyError, match="attempt 3"):  # max_retries=2: three runs in all
        result.get(timeout=20)
    assert runs(tmp_path) == 3
    assert result.state == states.FAILURE


def test_retry_can_change_the_arguments(app, start_worker):
    import testapp

    start_worker()
    assert testapp.retry_with_new_args.delay(0).get(timeout=20) == (3, 3)  # (value, retries)


def test_autoretry_for_and_dont_autoretry_for(app, start_worker, tmp_path):
    import testapp

    start_worker()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert testapp.auto_flaky.delay(str(tmp_path / "a"), 2).get(timeout=20) == 3
    with pytest.raises(ConnectionRefusedError):
        testapp.auto_flaky.delay(str(tmp_path / "b"), 0, refuse=True).get(timeout=20)
    assert runs(tmp_path / "b") == 1


def test_retry_state_is_visible_while_waiting_and_survives_a_broker_kill(app, broker, start_worker, tmp_path):
    import testapp

    start_worker()
    result = testapp.flaky.delay(str(tmp_path), 1, countdown=3.0)
    wait_until(lambda: result.state == states.RETRY, timeout=15, message="RETRY state")
    assert isinstance(result.info, ConnectionError)
    assert runs(tmp_path) == 1
    broker.kill()
    broker.start()
    assert result.get(timeout=30) == 2
    assert runs(tmp_path) == 2  # fired once after the restart, not lost, not doubled


def test_retry_outside_a_worker_reraises():
    app = embedq.App("local-retry")

    @app.task(bind=True)
    def local(self):
        raise self.retry(exc=OSError("no worker here"))

    with pytest.raises(OSError):
        local()


@pytest.mark.parametrize("retries, expected", [(0, 1), (1, 2), (3, 8), (10, 600)])
def test_backoff_without_jitter_doubles_up_to_the_maximum(retries, expected):
    assert backoff_delay(1, retries, 600, jitter=False) == expected


def test_backoff_with_jitter_stays_within_bounds():
    rng = random.Random(7)
    delays = [backoff_delay(2, 4, 600, jitter=True, rng=rng) for _ in range(200)]
    assert all(0 <= d <= 32 for d in delays)
    assert len(set(delays)) > 5  # actually jittered


def test_autoretry_countdown_uses_backoff_or_the_default_delay():
    class Plain:
        retry_backoff, default_retry_delay = False, 7

    class Backoff:
        retry_backoff, retry_backoff_max, retry_jitter = 3, 20, False

    assert autoretry_countdown(Plain, 5) == 7
    assert autoretry_countdown(Backoff, 0) == 3
    assert autoretry_countdown(Backoff, 5) == 20
