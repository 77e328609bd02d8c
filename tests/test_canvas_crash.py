"""Crash safety of workflows: the broker and worker nodes are killed (kill -9) at random points
while many chords and chains run; every chord body runs exactly once and every chain completes.

Chord bodies run on their own queue, served by a node this test never kills, so that a body run
can be interrupted only by the broker's death, which must not make it run twice (the lease is
adopted when the node re-registers, an unsettled result is resent). Everything else runs on
nodes that are killed, so header tasks and chain steps are redelivered (at least once) freely.
"""

import random
import time

import pytest

from conftest import wait_until
from embedq import chain, chord

pytestmark = pytest.mark.timeout(180)

CHORDS = 20
MEMBERS = 6
CHAINS = 20
STEPS = 4


def test_chords_and_chains_survive_broker_and_worker_kills(app, broker, start_worker, tmp_path):
    from testapp import body_marker, slow_add

    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    marks = tmp_path / "marks"
    marks.mkdir()
    start_worker(concurrency=1, name="bodies", queues=["bodies"])
    workers = [start_worker(concurrency=2, name=f"work{i}", queues=["work"]) for i in range(2)]

    chords = []
    for c in range(CHORDS):
        header = [slow_add.s(c, m, rng.uniform(0.01, 0.05)).set(queue="work") for m in range(MEMBERS)]
        body = body_marker.s(str(marks), f"c{c}").set(queue="bodies")
        chords.append((chord(header, body)(), sum(c + m for m in range(MEMBERS))))
    chains = []
    for c in range(CHAINS):
        steps = [slow_add.s(c, 0, 0.02).set(queue="work")]
        steps += [slow_add.s(1, rng.uniform(0.01, 0.04)).set(queue="work") for _ in range(STEPS - 1)]
        chains.append((chain(*steps)(), c + STEPS - 1))

    # Chaos: three broker kills and one worker node kill, at random moments of the run.
    events = sorted([("broker", rng.uniform(0.1, 2.5)) for _ in range(3)] + [("worker", rng.uniform(0.1, 2.5))],
                    key=lambda e: e[1])
    started = time.monotonic()
    for what, at in events:
        time.sleep(max(0.0, at - (time.monotonic() - started)))  # a random moment, not a sync
        if what == "broker":
            broker.kill()
            broker.start()
        else:
            victim = workers.pop(0)
            victim.kill()
            workers.append(start_worker(concurrency=2, name="work-new", queues=["work"]))

    for result, expected in chords:
        assert result.get(timeout=120) == expected, f"seed {seed}"
    for result, expected in chains:
        assert result.get(timeout=120) == expected, f"seed {seed}"
    runs = {}
    for path in marks.glob("body.*"):
        name = path.name.split(".")[1]
        runs[name] = runs.get(name, 0) + 1
    assert runs == {f"c{c}": 1 for c in range(CHORDS)}, f"seed {seed}: body runs {runs}"
    wait_until(lambda: app.control.stats()["leased"] == 0, message="no lease left behind")
