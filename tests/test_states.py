"""Honest states: PENDING, RECEIVED, STARTED (track_started), custom progress states with meta
from update_state, and the final ones."""

import pytest

from conftest import wait_until
from embedq import states

pytestmark = pytest.mark.timeout(60)


def test_update_state_shows_progress_and_meta_while_running(app, start_worker, tmp_path):
    import testapp

    gate = tmp_path / "gate"
    start_worker(concurrency=1)
    result = testapp.progress.delay(str(gate))
    wait_until(lambda: result.state == "PROGRESS", message="the PROGRESS state")
    assert result.info == {"done": 1, "total": 2}
    assert not result.ready()
    gate.touch()
    assert result.get(timeout=20) == "finished"
    assert result.state == states.SUCCESS and result.info == "finished"


def test_track_started(app, start_worker, tmp_path):
    import testapp

    gate = tmp_path / "gate"
    start_worker(concurrency=1)
    result = testapp.tracked.delay(str(gate))
    wait_until(lambda: result.state == states.STARTED, message="STARTED")
    assert isinstance(result.info["pid"], int)
    gate.touch()
    result.get(timeout=20)
    assert result.state == states.SUCCESS


def test_pending_then_received_without_tracking(app, start_worker, tmp_path):
    import testapp

    gate = tmp_path / "gate"
    result = testapp.wait_for_file.delay(str(gate))
    assert result.state == states.PENDING
    start_worker(concurrency=1)
    wait_until(lambda: result.state == states.RECEIVED, message="RECEIVED")
    gate.touch()
    result.get(timeout=20)
    assert result.state == states.SUCCESS


def test_update_state_rejects_meta_that_is_not_json(app):
    import testapp

    with pytest.raises(ValueError):  # outside a worker
        testapp.progress.update_state(state="PROGRESS", meta={"a": 1})
