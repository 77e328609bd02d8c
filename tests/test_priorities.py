"""Priorities: 0..255, higher runs sooner, decided by the broker across the whole queue (and
across the queues a worker consumes), per call and per task."""

import pytest

pytestmark = pytest.mark.timeout(60)


def run_order(marks):
    names = sorted((p.name for p in marks.iterdir()), key=lambda n: int(n.rsplit(".", 1)[1]))
    return [name.split(".")[1] for name in names]


def test_higher_priority_runs_first_across_the_whole_queue(app, start_worker, marks):
    import testapp

    sent = [("low", 1), ("low2", 1), ("mid", 5), ("high", 9), ("high2", 9), ("zero", 0)]
    results = [testapp.ordered.apply_async((str(marks), v), priority=p) for v, p in sent]
    start_worker(concurrency=1, prefetch=1)
    for result in results:
        result.get(timeout=20)
    assert run_order(marks) == ["high", "high2", "mid", "low", "low2", "zero"]


def test_priority_across_the_queues_a_worker_consumes_and_per_task_default(app, start_worker, marks):
    import testapp

    results = [testapp.ordered.apply_async((str(marks), "a-low"), queue="a", priority=1),
               testapp.ordered.apply_async((str(marks), "b-mid"), queue="b", priority=5),
               testapp.urgent.apply_async((str(marks), "b-task-default"), queue="b"),
               testapp.ordered.apply_async((str(marks), "a-top"), queue="a", priority=9)]
    start_worker(concurrency=1, prefetch=1, queues=["a", "b"])
    for result in results:
        result.get(timeout=20)
    assert run_order(marks) == ["a-top", "b-task-default", "b-mid", "a-low"]


def test_priority_out_of_range_is_refused_at_the_call(app):
    import testapp

    for bad in (256, -1, 1.5, "9"):
        with pytest.raises(ValueError, match="priority must be an integer 0..255"):
            testapp.add.apply_async((1, 2), priority=bad)
