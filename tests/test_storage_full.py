"""A full store: submits are refused at once with StorageFull, and nothing accepted is lost."""

import os
import resource
import threading

import pytest

import embedq
from conftest import BrokerProcess, WorkerProcess, wait_until
from embedq import states

pytestmark = pytest.mark.timeout(90)

#: The broker's cap for these tests (its LMDB map starts at this size and cannot grow).
CAP = 8 << 20
#: Task arguments big enough that a few dozen tasks fill the cap.
BIG = "x" * (256 << 10)


@pytest.fixture
def small_broker(tmp_path):
    import testapp

    broker = BrokerProcess(str(tmp_path / "data"), extra_args=["--max-store-size", str(CAP)]).start()
    testapp.app.conf.broker_url = broker.url
    testapp.app.conf.broker_resend_interval = 0.3
    yield broker
    testapp.app.close()
    testapp.app.conf.broker_url = None
    broker.stop()


def fill(task):
    """Submit big tasks until the broker refuses one; returns (accepted results, the error)."""
    accepted = []
    for _ in range(4 * CAP // len(BIG)):  # far more than fits
        try:
            accepted.append(task.delay(BIG))
        except embedq.StorageFull as exc:
            return accepted, exc
    raise AssertionError(f"{len(accepted)} big tasks accepted by a {CAP >> 20} MiB store")


def accepts(task):
    try:
        task.delay(BIG)
    except embedq.StorageFull:
        return False
    return True


def test_a_full_store_refuses_submits_at_once_and_loses_nothing(small_broker):
    import testapp

    accepted, error = fill(testapp.size_of)
    assert len(accepted) >= 10  # the cap is for the store, not a handful of tasks
    assert "broker_max_store_size" in str(error)  # the message names the fix
    # concurrent submitters sharing SUBMITs (group submit) all get the error, none hangs
    threads, errors = 6, []
    start = threading.Barrier(threads)

    def submit():
        testapp.size_of.AsyncResult(accepted[0].id).state  # this thread's socket is in use now
        start.wait()
        try:
            testapp.size_of.delay(BIG)
        except embedq.StorageFull as exc:
            errors.append(exc)

    workers = [threading.Thread(target=submit) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(30)
    assert not any(thread.is_alive() for thread in workers)
    assert len(errors) == threads
    # everything accepted is still there and runs once a worker comes
    assert {result.state for result in accepted} == {states.PENDING}
    worker = WorkerProcess(small_broker.url, concurrency=2)
    try:
        assert [result.get(timeout=60) for result in accepted] == [len(BIG)] * len(accepted)
        # the results are small, so the space of the drained tasks comes back: submits resume
        # (the broker re-checks its space every SPACE_CHECK_INTERVAL)
        wait_until(lambda: accepts(testapp.size_of), timeout=10, message="submits to be accepted again")
    finally:
        worker.stop()


def test_a_disk_that_refuses_writes_gets_storage_full_and_the_broker_carries_on(tmp_path):
    """A full disk, played by a file size limit on the broker process (RLIMIT_FSIZE: its LMDB
    writes past the limit fail, as on a full disk): submits get StorageFull at once, the broker
    keeps serving, and once the disk takes writes again everything accepted runs."""
    import testapp

    data = tmp_path / "data"
    broker = BrokerProcess(str(data)).start()
    testapp.app.conf.broker_url = broker.url
    testapp.app.conf.broker_resend_interval = 0.3
    worker = None
    try:
        accepted = [testapp.size_of.delay("small") for _ in range(3)]
        room = os.path.getsize(data / "data.mdb") + (1 << 20)  # a few big tasks more, not dozens
        resource.prlimit(broker.pid, resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
        with pytest.raises(embedq.StorageFull) as refused:
            for _ in range(64):
                accepted.append(testapp.size_of.delay(BIG))
        assert "cannot be written" in str(refused.value) and "free disk space" in str(refused.value)
        assert len(accepted) > 3  # the limit stopped growth, not every write
        assert testapp.size_of.AsyncResult(accepted[0].id).state == states.PENDING  # still serving
        assert broker.process.poll() is None
        resource.prlimit(broker.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        wait_until(lambda: accepts(testapp.size_of), timeout=10, message="submits to be accepted again")
        worker = WorkerProcess(broker.url, concurrency=2)
        sizes = [result.get(timeout=60) for result in accepted]
        assert sizes == [len("small")] * 3 + [len(BIG)] * (len(accepted) - 3)
    finally:
        if worker is not None:
            worker.stop()
        testapp.app.close()
        testapp.app.conf.broker_url = None
        broker.stop()
