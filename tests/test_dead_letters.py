"""The crash-redelivery cap, dead letters, and at-most-once tasks (acks_late=False,
reject_on_worker_lost=False), with tasks that really SIGKILL their pool process."""

import pytest

import embedq
from conftest import wait_until
from embedq import states

pytestmark = pytest.mark.timeout(90)

#: broker_max_redeliveries' default
CAP = 5


def crash_runs(marks):
    return len(list(marks.glob("crash.*")))


def test_poison_pill_becomes_a_dead_letter_that_can_be_requeued(app, start_worker, marks, tmp_path):
    import testapp

    flag = tmp_path / "poison"
    flag.touch()
    start_worker(concurrency=2)
    result = testapp.crash_while.delay(str(marks), str(flag))
    with pytest.raises(embedq.WorkerLostError, match="dead letter"):
        result.get(timeout=60)
    assert crash_runs(marks) == CAP
    dead = app.control.dead_letters()
    assert [d["id"] for d in dead] == [result.id]
    assert dead[0]["task"] == "testapp.crash_while" and dead[0]["deliveries"] == CAP
    assert app.control.stats()["dead"] == 1

    flag.unlink()  # fixed: requeue it, it runs again under the same id
    assert app.control.requeue_dead_letter(result.id) == 1
    assert embedq.AsyncResult(result.id, app=app).get(timeout=20) == "cured"
    assert app.control.dead_letters() == []


@pytest.mark.parametrize("task_name, option", [("crash_at_most_once", "acks_late=False"),
                                               ("crash_no_reject", "reject_on_worker_lost=False")])
def test_at_most_once_task_is_never_redelivered(app, start_worker, marks, task_name, option):
    import testapp

    start_worker(concurrency=2)
    result = getattr(testapp, task_name).delay(str(marks))
    with pytest.raises(embedq.WorkerLostError, match=option):
        result.get(timeout=30)
    assert crash_runs(marks) == 1
    assert result.state == states.FAILURE


def test_prefetched_tasks_of_a_crashed_process_are_not_counted_as_crashes(app, start_worker, marks, tmp_path):
    """Only the delivery that was running when the process died counts towards the cap."""
    import testapp

    start_worker(concurrency=1, prefetch=4)
    behind = [testapp.crash_at_most_once.delay(str(marks)) for _ in range(3)]
    failed = 0
    for result in behind:
        with pytest.raises(embedq.WorkerLostError):
            result.get(timeout=30)
        failed += 1
    wait_until(lambda: crash_runs(marks) == 3, message="three runs")
    assert failed == 3  # each ran once: the prefetched ones were requeued, not failed unrun
