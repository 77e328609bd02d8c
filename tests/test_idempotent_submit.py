"""Idempotent submit: a task id is put-if-absent in the broker, whenever the duplicate comes."""

import pytest

from conftest import wait_until
from embedq import states

pytestmark = pytest.mark.timeout(60)


def runs(marks, value):
    return len(list(marks.glob(f"{value}.*")))


def test_duplicate_while_queued_running_and_after_success_runs_once(app, start_worker, marks, tmp_path):
    import testapp

    gate = tmp_path / "gate"
    first = testapp.hold_marked.apply_async((str(marks), "once", str(gate)), task_id="same-id")
    again = testapp.hold_marked.apply_async((str(marks), "twice", str(gate)), task_id="same-id")  # queued
    start_worker(concurrency=2)
    wait_until(lambda: first.state == states.RECEIVED or list(marks.glob("start.*")), message="delivery")
    testapp.hold_marked.apply_async((str(marks), "thrice", str(gate)), task_id="same-id")     # running
    gate.touch()
    assert first.get(timeout=20)[0] == "once" and again.get(timeout=20)[0] == "once"
    late = testapp.hold_marked.apply_async((str(marks), "late", str(gate)), task_id="same-id")  # settled
    assert late.get(timeout=20)[0] == "once"
    assert testapp.add.delay(1, 1).get(timeout=20) == 2  # the queue behind it was served
    assert runs(marks, "start") == 1 and runs(marks, "done") == 1


def test_a_forgotten_id_may_run_again(app, start_worker, marks):
    import testapp

    start_worker()
    first = testapp.record.apply_async((str(marks), "v"), task_id="reusable")
    first.get(timeout=20)
    first.forget()
    assert testapp.record.apply_async((str(marks), "v"), task_id="reusable").get(timeout=20)[0] == "v"
    assert runs(marks, "v") == 2
