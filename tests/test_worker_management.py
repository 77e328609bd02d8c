"""Pool process management with real processes: recycling (max tasks / memory per child),
autoscale, warm and cold shutdown on SIGTERM, and REVOKE's terminate on the node side.

Nodes are started with ``python -m embedq.worker`` against a real broker (for REVOKE, against a
fake broker: a ROUTER socket in the test speaking the protocol by hand). Tasks are held "running"
with ``testapp.hold_marked`` (a ``start`` marker per run naming the pid, a gate file to finish).
"""

import collections
import os
import signal
import time

import psutil
import pytest
import zmq

from embedq import protocol as P
from embedq import serialize, states

from conftest import pid_gone, WorkerProcess, pool_children, wait_until

pytestmark = pytest.mark.timeout(90)

#: Bound on "at once" for deliveries handed back by a process (no timeout involved, but a
#: loaded 2-core box may take a while to run them elsewhere).
HANDBACK_BOUND = 4.0


# -- helpers -------------------------------------------------------------------------------------
def pids(worker):
    return {process.pid for process in pool_children(worker.pid)}


def starts(directory, value):
    """[(wall time, pid)] of the ``start`` markers of ``hold_marked``/``sleeper`` runs of ``value``."""
    found = []
    for path in directory.glob(f"start.{value}.*"):
        found.append((float(path.read_text()), int(path.name.split(".")[2])))
    return sorted(found)


def probe(queue):
    """A task on a queue only one node consumes: returns the pid that ran it (node registered)."""
    import testapp

    return testapp.pid.apply_async(queue=queue).get(timeout=30)


def held_node_and_spare(start_worker, app, tmp_path, args=()):
    """Node ``a`` (one process) running a held task plus three deliveries prefetched behind it,
    then node ``b`` started (nothing is left for it). Returns (a, b, held result, the three
    record results, the gate file, a's pool process)."""
    import testapp

    a = start_worker(concurrency=1, name="a", queues=["celery", "only-a"], prefetch=4, args=args)
    a_child = probe("only-a")
    gate = tmp_path / "gate"
    (tmp_path / "rec").mkdir()
    held = testapp.hold_marked.delay(str(tmp_path), "held", str(gate))
    wait_until(lambda: starts(tmp_path, "held"), message="the held task to start on a")
    records = app.send_messages([testapp.record.build_message((str(tmp_path / "rec"), i)) for i in range(3)])
    # all three are leased to a's process (prefetched), none waits in the broker
    wait_until(lambda: all(r.state == states.RECEIVED for r in records), message="prefetched on a")
    b = start_worker(concurrency=1, name="b", queues=["celery", "only-b"], prefetch=4)
    probe("only-b")
    return a, b, held, records, gate, a_child


# -- recycling -----------------------------------------------------------------------------------
def test_max_tasks_per_child_recycles_and_every_task_runs_once(broker, start_worker, app, tmp_path):
    import testapp

    worker = start_worker(concurrency=1, prefetch=4, args=["--max-tasks-per-child", "2"])
    first = probe("celery")  # task 1 of the first process
    (tmp_path / "rec").mkdir()
    results = app.send_messages([testapp.record.build_message((str(tmp_path / "rec"), i))
                                 for i in range(7)])
    values = [r.get(timeout=60) for r in results]
    assert [value for value, _ in values] == list(range(7))
    runs = collections.Counter(pid for _, pid in values)
    assert all(count <= 2 for count in runs.values()), runs
    assert runs.get(first, 0) <= 1  # the probe was its first task
    assert len(runs) >= 4
    # every delivery ran exactly once: what a retiring process prefetched was handed back, and
    # what it finished was settled before it left (not redelivered)
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "rec").iterdir()) == [str(i) for i in range(7)]
    assert worker.process.poll() is None and len(pids(worker)) == 1


def test_max_memory_per_child_replaces_the_process_after_the_task(broker, start_worker, app):
    import testapp

    limit_kib = 150 * 1024
    worker = start_worker(concurrency=1, args=["--max-memory-per-child", str(limit_kib)])
    first = probe("celery")
    assert psutil.Process(first).memory_info().rss // 1024 < limit_kib  # precondition
    assert probe("celery") == first  # below the limit the process stays
    assert testapp.hog_memory.delay(200).get(timeout=30) == first  # the task itself completes
    wait_until(lambda: pid_gone(first), message="the process above the memory limit to leave")
    second = probe("celery")
    assert second != first and pids(worker) == {second}


# -- autoscale -------------------------------------------------------------------------------
def test_autoscale_grows_while_work_waits_and_shrinks_when_idle(broker, start_worker, app, tmp_path):
    import testapp

    worker = start_worker(concurrency=1, prefetch=4, args=["--autoscale", "3,1", "--autoscale-idle", "1"])
    probe("celery")
    assert len(pids(worker)) == 1  # it starts at the minimum
    gate = tmp_path / "gate"
    results = app.send_messages([testapp.hold_marked.build_message((str(tmp_path), f"t{i}", str(gate)))
                                 for i in range(8)])
    seen = []

    def count():
        seen.append(len(pids(worker)))
        return seen[-1]

    wait_until(lambda: count() == 3, timeout=30, message="autoscale up to 3 processes")
    wait_until(lambda: len({pid for _, pid in starts(tmp_path, "t*")}) >= 2, timeout=30,
               message="tasks running in two processes at once")
    gate.touch()
    assert sorted(r.get(timeout=30)[0] for r in results) == sorted(f"t{i}" for i in range(8))
    wait_until(lambda: count() == 1, timeout=30, message="autoscale down to 1 process")
    assert max(seen) == 3 and min(seen) >= 1
    assert probe("celery") in pids(worker)  # the last one still serves


# -- shutdown ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_warm_shutdown_finishes_the_running_task_and_hands_back_the_rest(broker, start_worker, app,
                                                                         tmp_path, sig):
    a, b, held, records, gate, a_child = held_node_and_spare(
        start_worker, app, tmp_path, args=["--soft-shutdown-timeout", "60"])
    b_children = pids(b)
    os.kill(a.pid, sig)
    signalled = time.monotonic()
    # the prefetched deliveries are redelivered to b at once, while a still runs the held task
    ran_on = {r.get(timeout=30)[1] for r in records}
    assert time.monotonic() - signalled < HANDBACK_BOUND
    assert ran_on <= b_children
    assert a.process.poll() is None and not pid_gone(a_child)
    assert not list(tmp_path.glob("done.held.*"))
    # the running task finishes on a and its result is stored; then a exits by itself
    gate.touch()
    assert held.get(timeout=30) == ("held", a_child)
    assert held.state == states.SUCCESS
    assert a.process.wait(30) == 0
    assert [pid for _, pid in starts(tmp_path, "held")] == [a_child]  # it ran once


def test_second_signal_is_a_cold_shutdown(broker, start_worker, app, tmp_path):
    a, b, held, records, gate, a_child = held_node_and_spare(
        start_worker, app, tmp_path, args=["--soft-shutdown-timeout", "60"])
    os.kill(a.pid, signal.SIGTERM)
    assert {r.get(timeout=30)[1] for r in records} <= pids(b)  # the warm shutdown has begun
    os.kill(a.pid, signal.SIGTERM)
    a.process.wait(10)  # without waiting for the held task
    assert pid_gone(a_child)
    # the held task was handed back at once and runs again on b
    wait_until(lambda: len(starts(tmp_path, "held")) == 2, timeout=HANDBACK_BOUND,
               message="the held task to be redelivered to b")
    gate.touch()
    _, pid = held.get(timeout=30)
    assert pid in pids(b) and pid == starts(tmp_path, "held")[1][1]


def test_warm_shutdown_grace_period_ends_in_cold_shutdown(broker, start_worker, app, tmp_path):
    a, b, held, records, gate, _ = held_node_and_spare(
        start_worker, app, tmp_path, args=["--soft-shutdown-timeout", "1"])
    os.kill(a.pid, signal.SIGTERM)
    signalled = time.monotonic()
    a.process.wait(1 + 10)
    assert 1.0 <= time.monotonic() - signalled
    wait_until(lambda: len(starts(tmp_path, "held")) == 2, timeout=HANDBACK_BOUND,
               message="the held task to be redelivered to b")
    assert {r.get(timeout=30)[1] for r in records} <= pids(b)
    gate.touch()
    assert held.get(timeout=30)[1] in pids(b)


# -- REVOKE (node side), against a fake broker -----------------------------------------------------
class FakeBroker:
    """A ROUTER socket that speaks just enough of the protocol to a real worker node."""

    def __init__(self):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{port}"
        self.node = None

    def send(self, identity, command, *body):
        self.socket.send_multipart([identity, *P.message(command, *body)])

    def expect(self, wanted, timeout=20.0):
        """Serve (WELCOME, heartbeats) until a ``wanted`` command arrives: (identity, body)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node is not None:
                self.send(self.node, P.HEARTBEAT)  # keep the node's view of us alive
            if not self.socket.poll(50):
                continue
            identity, *frames = self.socket.recv_multipart()
            command, body = P.split(frames)
            if command == P.READY:
                self.node = identity
                self.send(identity, P.WELCOME, P.encode({"broker": "fake", "heartbeat": 0.2}))
            elif command == P.JOIN:
                self.send(identity, P.WELCOME, P.encode({"broker": "fake", "drop": []}))
            if command == wanted:
                return identity, body
        raise AssertionError(f"no {wanted!r} within {timeout}s")

    def close(self):
        self.socket.close()
        self.context.term()


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_revoke_terminates_the_pool_process_running_that_delivery(tmp_path, signal_name):
    fake = FakeBroker()
    worker = WorkerProcess(fake.url, concurrency=1, name="r")
    try:
        pool_process, body = fake.expect(P.JOIN)
        first = P.decode(body[0])["pid"]
        header = P.encode({"id": "t1", "task": "testapp.wait_for_file", "queue": "celery"})
        payload, _ = serialize.dumps(((str(tmp_path / "never"),), {}))
        fake.send(pool_process, P.TASK, b"", b"7", header, payload)
        wait_until(lambda: P.decode(fake.expect(P.HEARTBEAT)[1][0]).get("running") == [7],
                   message="the node to report delivery 7 running")
        fake.send(fake.node, P.REVOKE, P.encode({"tokens": [8, 7], "signal": signal_name}))
        identity, body = fake.expect(P.LOST)
        assert identity == fake.node
        assert P.decode(body[0]) == {"index": 0, "running": 7, "kind": "terminated",
                                     "reason": f"revoked: terminated with {signal_name}"}
        assert pid_gone(first)
        # a fresh process takes its place
        _, body = fake.expect(P.JOIN)
        assert P.decode(body[0])["index"] == 0 and P.decode(body[0])["pid"] != first
        assert worker.process.poll() is None
    finally:
        worker.stop()
        fake.close()
