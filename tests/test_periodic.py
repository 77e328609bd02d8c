"""Periodic tasks end to end: a real broker fires, a real worker node registers and runs them.

Real processes only (see conftest): the broker subprocess owns the LMDB store under tmp_path,
worker nodes run ``python -m embedq.worker -A beatapp`` (which registers beatapp's schedule when
it starts), and each run leaves a stamp file named by its deterministic task id
(``beat:<entry>:<slot>``), so a test can count runs per slot and measure their lateness.
"""

import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from itertools import pairwise

import psutil
import pytest
import zmq

import embedq
from embedq import protocol as P
from embedq.embedded import start_broker_process

from conftest import TESTS_DIR, WorkerProcess, _environment, process_gone, wait_until

pytestmark = pytest.mark.timeout(90)

REPO = os.path.dirname(TESTS_DIR)


def BeatWorker(broker_url, markers, interval=1.0, policy="skip"):  # noqa: N802 - a process class
    """``python -m embedq.worker -A beatapp`` with the schedule given in the environment."""
    return WorkerProcess(broker_url, concurrency=1, app="beatapp", env={
        "BEATAPP_MARKERS": str(markers), "BEATAPP_INTERVAL": str(interval), "BEATAPP_POLICY": policy})


@pytest.fixture
def beat_worker(broker, tmp_path):
    started = []

    def start(**options):
        markers = tmp_path / f"markers{len(started)}"
        markers.mkdir()
        worker = BeatWorker(broker.url, markers, **options)
        started.append(worker)
        return markers

    yield start
    for worker in started:
        worker.stop()


def runs(markers):
    """[(slot time, started time, task id)] of every execution so far, by slot."""
    found = []
    for name in os.listdir(markers):
        if name.startswith("."):
            continue
        task_id = name.split("|")[0]
        slot = datetime.fromisoformat(task_id.split(":", 2)[2]).timestamp()
        with open(os.path.join(markers, name)) as handle:
            found.append((slot, float(handle.read()), task_id))
    return sorted(found)


@pytest.fixture
def client_app(broker):
    app = embedq.App("beatclient", broker=broker.url, broker_resend_interval=0.3)

    @app.task(name="beatclient.add")
    def add(x, y):
        return x + y

    yield app
    app.close()


# -- firing ----------------------------------------------------------------------------------
def test_a_one_second_entry_fires_on_its_slots(broker, beat_worker):
    markers = beat_worker(interval=1.0)
    wait_until(lambda: len(runs(markers)) >= 6, timeout=30, message="six runs")
    found = runs(markers)
    slots = [slot for slot, _, _ in found]
    assert len({task_id for _, _, task_id in found}) == len(found)             # one run per slot
    assert all(abs((b - a) - 1.0) < 1e-6 for a, b in pairwise(slots))   # every slot, on the grid
    # Lateness = slot -> the task starting in a pool process: the broker's timer, the commit,
    # the delivery and the worker's hand-off. The first runs may meet a pool still warming up.
    lateness = [started - slot for slot, started, _ in found[2:]]
    print(f"\n1 s entry, {len(lateness)} runs: lateness median {1000 * statistics.median(lateness):.1f} ms, "
          f"max {1000 * max(lateness):.1f} ms")
    assert min(lateness) >= 0
    assert statistics.median(lateness) < 0.05


def test_broker_kill9_and_restart_neither_repeats_nor_forgets_a_slot(broker, beat_worker):
    markers = beat_worker(interval=0.5, policy="all")
    wait_until(lambda: len(runs(markers)) >= 3, timeout=30, message="three runs")
    broker.kill(signal.SIGKILL)
    killed_at = time.time()
    # The broker stays down for three slots (a duration, not a synchronisation).
    time.sleep(1.6)
    broker.start()
    restarted_at = time.time()
    wait_until(lambda: runs(markers)[-1][0] >= restarted_at + 1.5, timeout=30, message="runs after restart")
    found = runs(markers)
    ids = [task_id for _, _, task_id in found]
    slots = [slot for slot, _, _ in found]
    assert len(ids) == len(set(ids)), "a slot ran twice"
    assert all(abs((b - a) - 0.5) < 1e-6 for a, b in pairwise(slots)), "a slot was forgotten"
    assert sum(killed_at < slot < restarted_at for slot in slots) >= 3       # the downtime's slots ran


def test_a_broker_without_beat_stores_entries_but_does_not_fire(tmp_path):
    process, url = start_broker_process("tcp://127.0.0.1:0", str(tmp_path / "d"), durability="process",
                                        env=_environment(), extra_args=["--no-beat", "--loglevel", "WARNING"])
    app = embedq.App("nobeat", broker=url)
    try:
        app.add_periodic_task(0.1, "nobeat.add", name="fast")
        app.beat.sync()
        registered = time.time()
        [entry] = app.beat.list()
        # nothing would fire in a second; five slots would have in a broker with beat
        wait_until(lambda: time.time() > registered + 0.6, message="five slots' time")
        [entry] = app.beat.list()
        assert entry["name"] == "fast" and entry["runs"] == 0
    finally:
        app.close()
        process.kill()
        process.wait(10)


def test_a_worker_with_a_bad_schedule_fails_at_start_naming_it(broker, tmp_path):
    env = _environment()
    env.update(BEATAPP_MARKERS=str(tmp_path), BEATAPP_POLICY="sometimes")
    completed = subprocess.run([sys.executable, "-m", "embedq.worker", "-A", "beatapp", "--broker", broker.url],
                               capture_output=True, text=True, timeout=40, env=env)
    assert completed.returncode != 0
    assert "bad periodic task in beatapp" in completed.stderr and "sometimes" in completed.stderr


# -- the API -------------------------------------------------------------------------------------
def test_api_lists_pauses_resumes_and_removes(client_app):
    app = client_app
    app.conf.beat_schedule = {"ten": {"task": "beatclient.add", "schedule": embedq.crontab(minute="*/10"),
                                      "args": (1, 2)}}
    app.add_periodic_task(30.0, app.tasks["beatclient.add"], args=(3, 4), name="thirty")
    assert app.beat.sync() == ["ten", "thirty"]
    entries = {entry["name"]: entry for entry in app.beat.list()}
    assert set(entries) == {"ten", "thirty"}
    ten = entries["ten"]
    assert ten["task"] == "beatclient.add" and ten["args"] == "(1, 2)" and ten["policy"] == "skip"
    assert ten["next_run"].minute % 10 == 0 and ten["next_run"].second == 0 and not ten["paused"]
    app.beat.pause("thirty")
    assert {e["name"]: e for e in app.beat.list()}["thirty"]["paused"]
    app.beat.sync()                                              # a re-sync does not resume it
    assert {e["name"]: e for e in app.beat.list()}["thirty"]["paused"]
    app.beat.resume("thirty")
    thirty = {e["name"]: e for e in app.beat.list()}["thirty"]
    assert not thirty["paused"] and thirty["next_run"] is not None
    app.beat.remove("ten")
    assert [e["name"] for e in app.beat.list()] == ["thirty"]
    with pytest.raises(KeyError, match="nope"):
        app.beat.pause("nope")


def test_cli_beat_commands(broker, tmp_path):
    env = _environment()
    env["BEATAPP_MARKERS"] = str(tmp_path)
    env["BEATAPP_INTERVAL"] = "3600"

    def beat(*args):
        return subprocess.run([sys.executable, "-m", "embedq", "beat", *args, "--broker", broker.url],
                              capture_output=True, text=True, timeout=40, env=env, cwd=REPO)

    synced = beat("sync", "-A", "beatapp")
    assert synced.returncode == 0 and "registered stamp" in synced.stdout, synced.stderr
    listed = beat("list")
    assert listed.returncode == 0, listed.stderr
    [row] = listed.stdout.splitlines()[1:]
    assert row.split()[:4] == ["stamp", "beatapp.stamp", "every", "3600s"]
    assert beat("pause", "stamp").returncode == 0
    assert "paused" in beat("list").stdout
    assert beat("resume", "stamp").returncode == 0
    assert "paused" not in beat("list").stdout
    assert beat("remove", "stamp").returncode == 0
    missing = beat("remove", "stamp")
    assert missing.returncode == 1 and "no periodic entry named stamp" in missing.stderr
    assert beat("list").stdout.splitlines()[1:] == []


def test_malformed_beat_commands_get_disconnect_and_the_broker_carries_on(broker, client_app):
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.url)
    bad = [[],
           [b"not json"],
           [P.encode({"req": 1, "op": "explode"})],
           [P.encode({"req": 1, "op": "add"}), P.encode({"name": "x", "schedule": {"type": "pickle"}}), b""],
           [P.encode({"req": 1, "op": "add"}), P.encode({"name": "x", "header": {"task": "t", "queue": "q"},
                                                          "schedule": {"type": "interval", "seconds": 1e-9}}), b""],
           [P.encode({"req": 1, "op": "pause", "names": [1, 2]})]]
    try:
        for body in bad:
            sock.send_multipart([P.PROTOCOL, P.BEAT, *body])
            assert sock.poll(5000), body
            reply = sock.recv_multipart()
            assert reply[1] == P.DISCONNECT, (body, reply)
        assert not process_gone(psutil.Process(broker.pid))
        client_app.add_periodic_task(60.0, "beatclient.add", name="ok")
        client_app.beat.sync()
        assert [e["name"] for e in client_app.beat.list()] == ["ok"]   # nothing bad was stored
    finally:
        sock.close()
        context.term()


def test_example_script_runs(tmp_path):
    env = _environment()
    env["XDG_DATA_HOME"] = str(tmp_path)
    completed = subprocess.run([sys.executable, os.path.join(REPO, "examples", "periodic.py")],
                               capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert sum(line.startswith("every second: slot") for line in lines) == 3
    assert lines[-1].startswith("report: next run")
