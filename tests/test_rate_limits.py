"""Rate limits per task type, enforced by the broker across all workers and nodes."""

import pytest

from embedq.ratelimit import RateLimiter, parse_rate

pytestmark = pytest.mark.timeout(60)


def test_rate_limit_is_global_across_nodes(app, start_worker):
    import testapp

    start_worker(concurrency=2)
    start_worker(concurrency=2)
    starts = sorted(r.get(timeout=30) for r in [testapp.stamp.delay() for _ in range(8)])
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # "5/s": the broker hands one out every 0.2 s, whoever runs it. Starts are measured in the
    # pool processes, so a slow pick-up can shift one start (not the rate): bound the span tightly
    # and each gap loosely.
    assert starts[-1] - starts[0] >= 7 * 0.2 - 0.05, gaps
    assert min(gaps) >= 0.1, gaps
    assert testapp.add.delay(1, 1).get(timeout=10) == 2  # other task types are not held up


@pytest.mark.parametrize("text, rate", [("100/s", 100), ("10/m", 10 / 60), ("5/h", 5 / 3600),
                                        ("7", 7), (2.5, 2.5), (None, None), ("0", None)])
def test_parse_rate(text, rate):
    assert parse_rate(text) == pytest.approx(rate) if rate else parse_rate(text) is None


@pytest.mark.parametrize("bad", ["fast", "10/d", "-1/s", "1/s/s", float("nan")])
def test_parse_rate_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        parse_rate(bad)


def test_limiter_spaces_starts_and_reserves_slots():
    limiter = RateLimiter()
    assert limiter.admit("a", "t", 10, now=100.0) is None
    assert limiter.admit("b", "t", 10, now=100.0) == pytest.approx(100.1)
    assert limiter.admit("c", "t", 10, now=100.0) == pytest.approx(100.2)
    assert limiter.admit("x", "other", 10, now=100.0) is None  # per task type
    assert limiter.admit("b", "t", 10, now=100.1) is None      # its reserved slot came
    assert limiter.admit("d", "t", 10, now=100.1) == pytest.approx(100.3)  # after c's slot
    assert limiter.admit("c", "t", 10, now=100.05) == pytest.approx(100.2)  # too early: same slot
    assert limiter.admit("c", "t", 10, now=100.2) is None


def test_rate_limit_survives_a_broker_restart(app, broker, start_worker):
    """"1/m" (testapp.once_a_minute): a second task after a kill -9 of the broker still waits."""
    import testapp

    from embedq import states

    start_worker(concurrency=2)
    assert testapp.once_a_minute.delay().get(timeout=20) is not None
    broker.kill()
    broker.start()
    second = testapp.once_a_minute.delay()
    assert testapp.add.delay(1, 1).get(timeout=20) == 2  # the broker serves other tasks at once
    assert second.state == states.PENDING                 # but this type's next slot is a minute away


def test_limiter_starts_from_persisted_marks():
    limiter = RateLimiter({"t": 200.0})
    assert limiter.admit("a", "t", 1, now=150.0) == 200.0
