"""The durable round trip through a real broker process and real worker nodes."""

import pytest

import embedq
from conftest import record_waits, wait_until
from embedq import states

pytestmark = pytest.mark.timeout(60)


def test_delay_get_state(app, start_worker):
    import testapp

    start_worker()
    result = testapp.add.delay(4, 5)
    assert result.get(timeout=20) == 9
    assert result.state == states.SUCCESS
    assert result.ready() and result.successful() and not result.failed()
    assert result.result == 9


def test_failure_carries_type_and_remote_traceback(app, start_worker):
    import testapp

    start_worker()
    result = testapp.fail.delay("kaput")
    with pytest.raises(ValueError, match="kaput") as caught:
        result.get(timeout=20)
    assert "raise ValueError(message)" in caught.value.remote_traceback
    assert result.state == states.FAILURE and result.failed()
    assert "ValueError: kaput" in result.traceback
    assert isinstance(result.get(propagate=False), ValueError)


def test_unrebuildable_exception_becomes_remote_task_error(app, start_worker):
    import testapp

    start_worker()
    with pytest.raises(embedq.RemoteTaskError) as caught:
        testapp.fail_unpicklable.delay().get(timeout=20)
    assert caught.value.exc_type.endswith("Unpicklable")
    assert "1-2" in str(caught.value)


def test_bound_task_sees_its_request_and_name_override(app, start_worker):
    import testapp

    start_worker()
    result = testapp.whoami.apply_async(task_id="my-id-1")
    assert result.id == "my-id-1"
    assert result.get(timeout=20) == {"id": "my-id-1", "task": "testapp.whoami", "retries": 0}
    assert testapp.renamed.name == "custom.name"
    assert app.send_task("custom.name").get(timeout=20) == "renamed"


def test_unknown_id_is_reported_not_pending(app):
    result = embedq.AsyncResult("never-submitted", app=app)
    assert result.state == states.UNKNOWN
    with pytest.raises(embedq.UnknownTaskError):
        result.get(timeout=5)


def test_queued_task_is_pending_until_a_worker_comes(app, start_worker):
    import testapp

    result = testapp.add.delay(1, 1)
    assert result.state == states.PENDING
    with pytest.raises(embedq.TimeoutError):
        result.get(timeout=0.3)
    start_worker()
    assert result.get(timeout=20) == 2


def test_same_task_id_runs_once(app, start_worker, tmp_path):
    import testapp

    start_worker()
    first = testapp.record.apply_async((str(tmp_path), "x"), task_id="dedupe-me")
    second = testapp.record.apply_async((str(tmp_path), "y"), task_id="dedupe-me")
    assert first.get(timeout=20) == second.get(timeout=20)
    assert len(list(tmp_path.glob("*.*.*"))) == 1


def test_forget_makes_the_id_unknown(app, start_worker):
    import testapp

    start_worker()
    result = testapp.add.delay(2, 2)
    assert result.get(timeout=20) == 4
    result.forget()
    assert embedq.AsyncResult(result.id, app=app).state == states.UNKNOWN


def test_result_readable_from_another_handle_and_thread(app, start_worker):
    import threading

    import testapp

    start_worker()
    task_id = testapp.add.delay(20, 22).id
    found = []
    thread = threading.Thread(target=lambda: found.append(embedq.AsyncResult(task_id, app=app).get(timeout=20)))
    thread.start()
    thread.join(30)
    assert found == [42]


def test_load_is_shared_between_worker_nodes(app, start_worker, tmp_path):
    import testapp

    first, second = start_worker(concurrency=1, prefetch=1), start_worker(concurrency=1, prefetch=1)
    gate, started = tmp_path / "go", tmp_path / "started"
    started.mkdir()
    running = [testapp.hold.delay(str(gate), str(started)) for _ in range(4)]
    wait_until(lambda: len(list(started.iterdir())) == 2, timeout=20, message="both nodes running one")
    gate.write_text("")
    pids = {r.get(timeout=30) for r in running}
    node_children = {c.pid for w in (first, second) for c in w.children()}
    assert pids <= node_children and len(pids) == 2


def test_no_broker_configured_names_the_fix():
    app = embedq.App("nobroker")

    @app.task
    def f():
        return 1

    with pytest.raises(embedq.ConfigurationError, match="embedq.start"):
        f.delay()


def test_threads_share_submits_and_each_gets_its_own_results(app, start_worker):
    """Threads that delay() at the same time share SUBMITs (group submit: one broker commit for
    all of them), and every result is still pushed to the socket of the thread that asked: with
    resends slowed to 30 s, a result sent anywhere else would time the get() out."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import testapp

    app.conf.broker_resend_interval = 30.0
    start_worker()
    client = app.client
    sizes = []
    send_submit = client._send_submit

    def recording(conn, parts, timeout, chords=None):  # the real send, with its size noted
        sizes.append(sum(len(messages) for _, messages in parts))
        return send_submit(conn, parts, timeout, chords)

    client._send_submit = recording
    threads = 8
    start = threading.Barrier(threads)

    def work(i):
        testapp.add.delay(0, 0).get(timeout=20)  # this thread's socket is known to the broker
        start.wait()
        results = [testapp.add.delay(i, j) for j in range(30)]
        return [r.get(timeout=20) for r in results] == [i + j for j in range(30)]

    with ThreadPoolExecutor(threads) as pool:
        assert all(pool.map(work, range(threads)))
    assert sum(sizes) == threads * 31
    assert max(sizes) > 1  # some SUBMITs carried several threads' tasks


def test_a_get_that_hears_the_broker_reasks_for_its_own_id_only(app, start_worker, monkeypatch):
    """A get() left waiting past a resend interval asks for its result again. While the broker
    keeps pushing other results to this process it is the broker that has our subscriptions, so
    the get() asks for its own id alone: a WAIT for every result owed (thousands, with tasks
    scheduled ahead) stalled the broker's loop once per interval, and scheduled tasks started
    late by up to 40 ms. (After a silence, see test_recovery: it asks for all of them.)"""
    import testapp

    start_worker(concurrency=2)
    assert testapp.add.delay(0, 0).get(timeout=20) == 0  # the worker is up: results flow at once
    late = testapp.add.apply_async((1, 1), countdown=2.0)  # about six resend intervals away
    stream = [testapp.add.apply_async((i, 0), countdown=0.05 * i) for i in range(40)]
    waits = record_waits(monkeypatch)
    assert late.get(timeout=20) == 2  # meanwhile the stream's results arrive every 50 ms
    assert waits, "the get() never waited a resend interval: the test proves nothing"
    assert all(ids == [late.id] for ids in waits), waits
    assert [r.get(timeout=20) for r in stream] == list(range(40))


def test_a_thread_getting_a_backlog_in_order_asks_for_each_id_about_once(app, start_worker, monkeypatch):
    """A thread that did not submit the tasks subscribes its socket to every result the process
    is owed with its first WAIT; each later get() that has to wait asks only for what was
    submitted since. (It sent the whole remaining backlog each time: for n results falling due one
    after another, n²/2 ids for the broker to look up.)"""
    import threading

    import testapp

    start_worker(concurrency=2)
    assert testapp.add.delay(0, 0).get(timeout=20) == 0
    n = 60
    backlog = [testapp.add.apply_async((i, 0), countdown=0.02 * i) for i in range(n)]
    waits = record_waits(monkeypatch)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(r.get(timeout=20) for r in backlog))
    consumer.start()
    consumer.join(30)
    asked = sum(map(len, waits))
    assert got == list(range(n))
    assert asked >= n // 2, "the consumer hardly waited: the test proves nothing"
    assert asked <= 3 * n, f"{asked} ids asked for {n} results"
