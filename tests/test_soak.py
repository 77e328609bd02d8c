"""Soak run (opt-in): ``python -m pytest -m soak tests/test_soak.py``, ``SOAK_SECONDS`` long (60),
chaos from ``SOAK_SEED`` (2), the broker in ``SOAK_DURABILITY`` (process).

Tasks are submitted without pause while a chaos thread, at random moments, kills pool processes
and worker nodes with SIGKILL, freezes a node with SIGSTOP past its eviction, and kills and
restarts the broker on the same data dir. Afterwards every task whose ``apply_async`` returned
(accepted: committed by the broker) must have its correct result, whatever was killed while it
waited or ran.
"""

import os
import random
import signal
import threading
import time

import pytest

from conftest import TEST_HEARTBEAT, BrokerProcess, pool_children
from embedq import states
from embedq.errors import BrokerUnavailable

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
#: The broker's durability in the run (``fsync`` widens the window in which a TASK is out before
#: its commit, where a broker kill makes a phantom delivery).
SOAK_DURABILITY = os.environ.get("SOAK_DURABILITY", "process")

pytestmark = [pytest.mark.soak, pytest.mark.timeout(SOAK_SECONDS + 300)]

#: Seconds between two blows of the chaos thread (uniformly drawn).
CHAOS_PAUSE = (0.3, 1.5)
#: Seconds all accepted tasks get, after the chaos stops, to have their results.
RESULTS_TIMEOUT = 120
#: How long a frozen node stays frozen: past its eviction (heartbeat * liveness = 0.6 s).
FREEZE_SECONDS = (4 * TEST_HEARTBEAT, 10 * TEST_HEARTBEAT)


class Chaos(threading.Thread):
    """Deals one blow at a time to the cluster until stopped; counts what it did."""

    def __init__(self, broker, workers, start_worker, seed):
        super().__init__(name="chaos", daemon=True)
        self.broker, self.workers, self.start_worker = broker, workers, start_worker
        self.random = random.Random(seed)
        self.stopping = threading.Event()
        self.blows = {"pool process killed": 0, "node killed": 0, "node frozen": 0, "broker killed": 0}
        self.error = None

    def run(self):
        try:
            while not self.stopping.wait(self.random.uniform(*CHAOS_PAUSE)):
                blow = self.random.choice(list(self.blows))
                getattr(self, "_" + blow.replace(" ", "_"))()
                self.blows[blow] += 1
        except BaseException as exc:  # reported by the test, not lost in this thread
            self.error = exc

    def _pool_process_killed(self):
        pools = pool_children(self.random.choice(self.workers).pid)
        if pools:
            os.kill(self.random.choice(pools).pid, signal.SIGKILL)

    def _node_killed(self):
        victim = self.workers.pop(self.random.randrange(len(self.workers)))
        victim.stop()  # SIGKILL to the node and its pool processes
        self.workers.append(self.start_worker(concurrency=2))

    def _node_frozen(self):
        victim = self.random.choice(self.workers)
        victim.kill(signal.SIGSTOP)
        self.stopping.wait(self.random.uniform(*FREEZE_SECONDS))
        victim.kill(signal.SIGCONT)

    def _broker_killed(self):
        self.broker.kill(signal.SIGKILL)
        self.broker.start()  # same data dir, same port


@pytest.fixture
def broker(tmp_path):
    handle = BrokerProcess(str(tmp_path / "data"), durability=SOAK_DURABILITY).start()
    yield handle
    handle.stop()


def test_every_accepted_task_completes_through_kills_freezes_and_broker_restarts(broker, start_worker, app):
    import testapp

    workers = [start_worker(concurrency=2) for _ in range(2)]
    chaos = Chaos(broker, workers, start_worker, seed=int(os.environ.get("SOAK_SEED", "2")))
    accepted, uncertain = {}, 0
    deadline = time.monotonic() + SOAK_SECONDS
    chaos.start()
    try:
        index = 0
        while time.monotonic() < deadline and chaos.error is None:
            index += 1
            task_id = f"soak-{index}"
            try:
                accepted[task_id] = testapp.add.apply_async((index, index), task_id=task_id)
            except BrokerUnavailable:  # may or may not have been stored: nothing to assert
                uncertain += 1
    finally:
        chaos.stopping.set()
        chaos.join(60)
    assert chaos.error is None, f"the chaos thread failed: {chaos.error!r}"
    assert all(chaos.blows.values()), f"not every kind of blow was dealt: {chaos.blows}"
    assert len(accepted) > 100, f"only {len(accepted)} tasks accepted in {SOAK_SECONDS}s"

    wrong, stuck = {}, []
    phase = time.monotonic()
    deadline = phase + RESULTS_TIMEOUT
    for task_id, result in accepted.items():
        try:
            value = result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
        except TimeoutError:  # (embedq.errors.TimeoutError is one)
            stuck.append(task_id)
            continue
        expected = 2 * int(task_id.split("-")[1])
        if value != expected or result.state != states.SUCCESS:
            wrong[task_id] = (result.state, value)
    if stuck:  # name them with their states: what the broker holds them as tells where they hang
        states_now = testapp.app.client.status(stuck[:20])
        pytest.fail(f"{len(stuck)} of {len(accepted)} accepted tasks had no result after "
                    f"{RESULTS_TIMEOUT}s, e.g. {states_now}")
    assert wrong == {}, f"{len(wrong)} of {len(accepted)} accepted tasks ended wrong"
    print(f"\nsoak [{SOAK_DURABILITY}]: {len(accepted)} tasks accepted ({uncertain} submits gave up) through {chaos.blows}; "
          f"all results in {time.monotonic() - phase:.1f}s")
