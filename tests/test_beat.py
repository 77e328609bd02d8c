"""``embedq.beat``: the broker's scheduler, on a real LMDB store under ``tmp_path``, with a fake clock.

No broker process and no sleeping: a test steps :class:`Beat` the way the broker loop does (one
batch, ``fire_due``, commit, then the after-commit callbacks) at whatever ``now`` it chooses.
Entries are built by the client side (``app.beat``), exactly as they travel on the wire.
"""

from datetime import datetime, timedelta, timezone

import pytest

import embedq
from embedq import protocol as P
from embedq.beat import Beat, parse_entry, run_id
from embedq.broker import Iteration
from embedq.errors import ProtocolError
from embedq.periodic import describe
from embedq.schedules import crontab
from embedq.store import Store

pytestmark = pytest.mark.timeout(60)

UTC = timezone.utc
T0 = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def make_app(**settings):
    app = embedq.App("unit", **settings)

    @app.task(name="unit.add")
    def add(x, y):
        return x + y

    return app, add


class Harness:
    """A store and a Beat, stepped like the broker loop steps them."""

    def __init__(self, path, enabled=True):
        self.path = path
        self.store = Store(path, durability="process")
        self.beat = Beat(self.store, enabled=enabled)

    def step(self, action):
        it = Iteration()
        batch = self.store.begin()
        result = action(batch, it)
        batch.commit()
        for callback in it.after_commit:
            callback()
        return result, it

    def fire(self, now):
        return self.step(lambda batch, it: self.beat.fire_due(batch, it, now))[0]

    def command(self, control, frames=(), now=T0):
        body = [P.encode({"req": 1, **control}), *frames]
        _, it = self.step(lambda batch, it: self.beat.handle(batch, it, b"client", body, now))
        [(_identity, message)] = it.sends
        return message[1], P.decode(message[2])

    def register(self, app, now=T0):
        return self.command({"op": "add"}, app.beat.messages(), now)

    def entries(self):
        return {entry["name"]: entry for entry in self.command({"op": "list"})[1]["entries"]}

    def queued(self):
        """Ids of the tasks waiting in the store, in submit order."""
        batch = self.store.begin()
        taken = batch.take_ready("celery", 10_000)
        batch.abort()
        return [task_id for task_id, _, _ in taken]

    def restart(self):
        self.store.close()
        self.store = Store(self.path, durability="process")
        self.beat = Beat(self.store, enabled=self.beat.enabled)


@pytest.fixture
def harness(tmp_path):
    handle = Harness(str(tmp_path / "data"))
    yield handle
    handle.store.close()


def ids(name, *offsets):
    return [run_id(name, datetime.fromtimestamp(T0 + s, UTC)) for s in offsets]


# -- registering and firing ------------------------------------------------------------------
def test_interval_entry_fires_each_slot_once_with_the_client_payload(harness):
    app, add = make_app()
    app.add_periodic_task(10.0, add, args=(1, 2), name="adder")
    command, reply = harness.register(app)
    assert (command, reply) == (P.ACK, {"req": 1, "ok": 1})
    assert harness.beat.seconds_until_due(T0) == pytest.approx(10.0)
    assert harness.fire(T0 + 9.999) == 0
    assert harness.fire(T0 + 10.002) == 1
    assert harness.fire(T0 + 10.5) == 0           # that slot is done
    assert harness.fire(T0 + 20.0) == 1
    assert harness.queued() == ids("adder", 10, 20)
    batch = harness.store.begin()
    _, raw, payload = batch.task(ids("adder", 10)[0])
    batch.abort()
    header = P.decode(raw)
    assert header["task"] == "unit.add" and header["queue"] == "celery" and "eta" not in header
    assert payload == app.beat.messages()[1]      # the client's pickle, stored unchanged
    entry = harness.entries()["adder"]
    assert entry["runs"] == 2 and entry["last_run"] == T0 + 20 and entry["next_run"] == T0 + 30
    assert entry["args"] == "(1, 2)" and describe(entry["schedule"]) == "every 10s"


def test_seed_style_crontab_config_fires_on_the_ten_minutes(harness):
    from embedq import crontab as exported_crontab

    app, _ = make_app()
    app.conf.beat_schedule = {"every-ten": {"task": "unit.add", "schedule": exported_crontab(minute="*/10"),
                                            "args": (16, 16)}}
    harness.register(app, now=utc(2024, 6, 1, 12, 3).timestamp())
    assert harness.entries()["every-ten"]["next_run"] == utc(2024, 6, 1, 12, 10).timestamp()
    assert harness.fire(utc(2024, 6, 1, 12, 10, 0, 1000).timestamp()) == 1
    assert harness.entries()["every-ten"]["next_run"] == utc(2024, 6, 1, 12, 20).timestamp()
    assert describe(harness.entries()["every-ten"]["schedule"]) == "*/10 * * * * (UTC)"


def test_crontab_uses_the_app_timezone_and_its_dst(harness):
    app, add = make_app(timezone="America/New_York")
    app.add_periodic_task(crontab(minute=30, hour=2), add, args=(0, 0), name="night")
    app.add_periodic_task(crontab(minute=0, hour=12, tz="UTC"), add, args=(0, 0), name="noon-utc")
    harness.register(app, now=utc(2024, 3, 8, 12, 0).timestamp())
    assert harness.entries()["night"]["schedule"]["tz"] == "America/New_York"
    assert harness.entries()["noon-utc"]["schedule"]["tz"] == "UTC"   # an explicit tz wins
    now = utc(2024, 3, 8, 12, 0).timestamp()
    while (now := now + harness.beat.seconds_until_due(now) + 0.001) < utc(2024, 3, 12).timestamp():
        harness.fire(now)                          # wake exactly when beat asks to
    fired = [task_id for task_id in harness.queued() if task_id.startswith("beat:night:")]
    # 02:30 EST on the 9th; 02:30 does not exist on the 10th: 03:00 EDT; 02:30 EDT on the 11th
    assert fired == [run_id("night", utc(2024, 3, 9, 7, 30)), run_id("night", utc(2024, 3, 10, 7, 0)),
                     run_id("night", utc(2024, 3, 11, 6, 30))]


# -- restarts, crashes and missed runs ---------------------------------------------------------
def test_restart_neither_repeats_nor_forgets_a_slot(harness):
    app, add = make_app()
    app.add_periodic_task(10.0, add, args=(1, 2), name="adder")
    harness.register(app)
    harness.fire(T0 + 10.001)
    harness.restart()
    assert harness.beat.seconds_until_due(T0 + 10.5) == pytest.approx(9.5)
    assert harness.fire(T0 + 10.5) == 0
    # A crash after firing but before the commit: nothing of that attempt is stored ...
    it, batch = Iteration(), harness.store.begin()
    assert harness.beat.fire_due(batch, it, T0 + 20.001) == 1
    batch.abort()
    harness.restart()
    # ... so the restarted beat fires that slot (once), with the same task id
    assert harness.fire(T0 + 20.5) == 1
    assert harness.fire(T0 + 20.6) == 0
    assert harness.queued() == ids("adder", 10, 20)


def test_an_aborted_attempt_leaves_memory_as_it_was(harness):
    app, add = make_app()
    app.add_periodic_task(10.0, add, args=(1, 2), name="adder")
    harness.register(app)
    it, batch = Iteration(), harness.store.begin()
    harness.beat.fire_due(batch, it, T0 + 10.001)
    batch.abort()                                  # after_commit callbacks never run
    assert harness.beat.seconds_until_due(T0 + 10.001) < 0
    assert harness.fire(T0 + 10.002) == 1


def test_a_run_already_in_the_store_is_not_enqueued_twice(harness):
    app, add = make_app()
    app.add_periodic_task(10.0, add, name="adder")
    harness.register(app)
    [task_id] = ids("adder", 10)
    raw = P.encode({"id": task_id, "task": "unit.add", "queue": "celery"})
    harness.step(lambda batch, it: batch.add_task(P.TaskHeader.parse(raw), raw, b"x", T0))
    harness.fire(T0 + 10.001)
    assert harness.queued() == [task_id]


@pytest.mark.parametrize("policy, down_until, expected", [
    ("skip", 37, []),                # slots 10, 20, 30 missed; 30 is 7 s old: beyond tolerance
    ("skip", 33, [30]),              # 30 is 3 s old: merely late, it runs
    ("once", 37, [30]),
    ("all", 37, [10, 20, 30]),
])
def test_missed_runs_after_downtime_follow_the_entry_policy(harness, policy, down_until, expected):
    app, add = make_app()
    app.add_periodic_task(10.0, add, name="adder", policy=policy)
    harness.register(app)
    harness.restart()                              # the broker was down from T0 to down_until
    harness.fire(T0 + down_until)
    assert harness.queued() == ids("adder", *expected)
    entry = harness.entries()["adder"]
    assert entry["next_run"] == T0 + 40 and entry["policy"] == policy
    assert entry["last_run"] == (T0 + 30 if expected else None)
    harness.fire(T0 + 40.001)                      # back on the grid
    assert harness.queued() == ids("adder", *expected, 40)


def test_policy_all_drains_a_long_backlog_in_bounded_steps(harness):
    app, add = make_app()
    app.add_periodic_task(1.0, add, name="tick", policy="all")
    harness.register(app)
    assert harness.fire(T0 + 2500.5) == 1000      # missed_runs' catch-up limit per call
    assert harness.beat.seconds_until_due(T0 + 2500.5) < 0
    assert harness.fire(T0 + 2500.5) == 1000
    assert harness.fire(T0 + 2500.5) == 500
    assert harness.fire(T0 + 2500.5) == 0
    assert len(set(harness.queued())) == 2500


# -- re-registration, pause, resume, remove ----------------------------------------------------
def test_reregistering_an_unchanged_entry_keeps_its_state(harness):
    app, add = make_app()
    app.add_periodic_task(10.0, add, args=(1, 2), name="adder")
    harness.register(app)
    harness.fire(T0 + 10.001)
    app.add_periodic_task(10.0, add, args=(5, 5), name="adder", queue="other")
    harness.register(app, now=T0 + 15)             # a worker restarted: same schedule
    entry = harness.entries()["adder"]
    assert (entry["runs"], entry["next_run"], entry["args"], entry["queue"]) == (1, T0 + 20, "(5, 5)", "other")
    assert harness.fire(T0 + 15) == 0
    app.add_periodic_task(4.0, add, args=(5, 5), name="adder")
    harness.register(app, now=T0 + 15)             # a new schedule starts afresh
    entry = harness.entries()["adder"]
    assert (entry["runs"], entry["next_run"]) == (0, T0 + 19)


def test_pause_resume_and_remove(harness):
    app, add = make_app()
    app.add_periodic_task(10.0, add, name="adder")
    app.add_periodic_task(60.0, add, name="slow")
    harness.register(app)
    assert harness.command({"op": "pause", "names": ["adder", "nope"]}) == (
        P.ACK, {"req": 1, "ok": 1, "missing": ["nope"]})
    assert harness.entries()["adder"]["paused"] and harness.entries()["adder"]["next_run"] is None
    assert harness.beat.seconds_until_due(T0) == pytest.approx(60)
    assert harness.fire(T0 + 35) == 0
    harness.register(app, now=T0 + 36)             # re-registration does not un-pause
    harness.restart()
    assert harness.entries()["adder"]["paused"]
    harness.command({"op": "resume", "names": ["adder"]}, now=T0 + 36)
    # slots 10..30 passed while paused and are not made up; the grid (anchor T0) is kept
    assert harness.entries()["adder"]["next_run"] == T0 + 40
    assert harness.fire(T0 + 40.001) == 1
    assert harness.command({"op": "remove", "names": ["adder"]})[1]["ok"] == 1
    assert list(harness.entries()) == ["slow"]
    assert harness.fire(T0 + 50.001) == 0
    harness.restart()
    assert list(harness.entries()) == ["slow"]
    assert harness.queued() == ids("adder", 40)


def test_disabled_beat_stores_entries_but_never_fires(tmp_path):
    harness = Harness(str(tmp_path / "d"), enabled=False)
    app, add = make_app()
    app.add_periodic_task(1.0, add, name="tick")
    harness.register(app)
    assert harness.beat.seconds_until_due(T0) is None
    assert harness.fire(T0 + 100) == 0
    assert list(harness.entries()) == ["tick"]
    harness.store.close()


def test_full_store_holds_runs_back_and_the_policy_decides_later(harness):
    app, add = make_app()
    app.add_periodic_task(1.0, add, name="tick", policy="once")
    harness.register(app)
    assert harness.step(lambda b, it: harness.beat.fire_due(b, it, T0 + 1.001, refuse_submits=True))[0] == 0
    assert harness.beat.seconds_until_due(T0 + 1.001) == pytest.approx(1.0)  # retried in FULL_RETRY
    assert harness.fire(T0 + 3.5) == 1
    assert harness.queued() == ids("tick", 3)


def test_an_entry_that_runs_out_of_calendar_is_paused_not_fatal(harness):
    app, add = make_app()
    app.add_periodic_task(3600.0, add, name="hourly")
    harness.register(app, now=utc(9999, 12, 31, 22, 0).timestamp())
    assert harness.fire(utc(9999, 12, 31, 23, 0, 1).timestamp()) == 0
    entry = harness.entries()["hourly"]
    assert entry["paused"] and "out of range" in entry["error"], entry
    assert harness.beat.seconds_until_due(T0) is None


# -- validation --------------------------------------------------------------------------------
def good_entry(**changes):
    entry = {"name": "e", "schedule": {"type": "interval", "seconds": 10}, "policy": "skip",
             "header": {"task": "t.add", "queue": "celery"}, "expires": None, "args": "()", "kwargs": "{}"}
    entry.update(changes)
    return P.encode(entry)


def test_parse_entry_keeps_a_canonical_schedule_and_drops_id_and_eta():
    parsed = parse_entry(P.encode({**P.decode(good_entry()), "header": {
        "task": "t.add", "queue": "q", "id": "x", "eta": 5, "priority": 3}}), int(T0 * 1e6))
    assert parsed["schedule"] == {"type": "interval", "seconds": 10.0}
    assert parsed["header"] == {"task": "t.add", "queue": "q", "priority": 3}
    assert parsed["task"] == "t.add" and parsed["policy"] == "skip"


@pytest.mark.parametrize("changes, message", [
    ({"name": ""}, "entry name"),
    ({"name": "x" * 201}, "longer than"),
    ({"name": 5}, "entry name"),
    ({"schedule": {"type": "interval", "seconds": 0.001}}, "shorter than"),
    ({"schedule": {"type": "interval", "seconds": -1}}, "bad schedule"),
    ({"schedule": {"type": "interval", "seconds": 1e300}}, "bad schedule"),
    ({"schedule": {"type": "crontab", "minute": "61"}}, "bad schedule"),
    ({"schedule": {"type": "crontab", "minute": {"a": 1}}}, "bad schedule"),
    ({"schedule": {"type": "crontab", "tz": "Mars/Base"}}, "bad schedule"),
    ({"schedule": {"type": "pickle", "code": "x"}}, "bad schedule"),
    ({"schedule": "*/5 * * * *"}, "bad schedule"),
    ({"policy": "sometimes"}, "policy"),
    ({"header": "t.add"}, "header"),
    ({"header": {"task": "t.add"}}, "queue"),
    ({"header": {"task": "t.add", "queue": "q", "priority": 256}}, "priority"),
    ({"expires": -1}, "expires"),
    ({"expires": True}, "expires"),
    ({"args": [1, 2]}, "display"),
])
def test_parse_entry_refuses_bad_input(changes, message):
    with pytest.raises(ProtocolError, match=message):
        parse_entry(good_entry(**changes), int(T0 * 1e6))


@pytest.mark.parametrize("control, frames", [
    ({}, []),
    ({"op": "explode"}, []),
    ({"op": "add"}, []),
    ({"op": "add"}, [good_entry()]),               # an entry without its payload frame
    ({"op": "pause", "names": "e"}, []),
    ({"op": "remove", "names": [""]}, []),
])
def test_bad_beat_commands_raise_protocol_error(harness, control, frames):
    with pytest.raises(ProtocolError):
        harness.command(control, frames)


# -- the client side -----------------------------------------------------------------------------
class FakeSignature:
    """What a future Signature looks like to add_periodic_task (no canvas yet)."""

    def __init__(self, task, args=(), kwargs=None, options=None):
        self.task, self.args, self.kwargs, self.options = task, args, kwargs or {}, options or {}


def test_add_periodic_task_accepts_tasks_names_and_signature_like_objects():
    app, add = make_app()
    assert app.add_periodic_task(5, add, args=(1, 2)) == "unit.add(1, 2)"
    assert app.add_periodic_task(timedelta(minutes=1), FakeSignature("unit.add", (3, 4), options={"queue": "q"}),
                                 name="sig") == "sig"
    assert app.add_periodic_task(crontab(minute=0), "unit.add", kwargs={"x": 1, "y": 2}) == "unit.add(x=1, y=2)"

    @app.periodic_task(2.5, args=(7,), name="unit.ping")
    def ping(n):
        return n

    assert ping(3) == 3 and app.tasks["unit.ping"] is ping
    entries = [P.decode(frame) for frame in app.beat.messages()[::2]]
    assert [(e["name"], e["header"]["task"], e["args"]) for e in entries] == [
        ("unit.add(1, 2)", "unit.add", "(1, 2)"), ("sig", "unit.add", "(3, 4)"),
        ("unit.add(x=1, y=2)", "unit.add", "()"), ("unit.ping", "unit.ping", "(7,)")]
    assert entries[1]["header"]["queue"] == "q"
    assert entries[1]["schedule"] == {"type": "interval", "seconds": 60.0}


@pytest.mark.parametrize("spec, message", [
    ({"task": "unit.add", "schedule": "*/5 * * * *"}, "cannot use"),
    ({"task": "unit.add", "schedule": 5, "policy": "never"}, "policy"),
    ({"task": "unit.add", "schedule": 5, "options": {"countdown": 3}}, "do not apply"),
    ({"task": None, "schedule": 5}, "task"),
])
def test_bad_beat_schedule_entries_fail_on_the_client(spec, message):
    app, _ = make_app()
    app.conf.beat_schedule = {"bad": spec}
    with pytest.raises((ValueError, TypeError), match=message):
        app.beat.messages()


def test_beat_schedule_is_not_shared_between_apps():
    first, _ = make_app()
    second, _ = make_app()
    first.conf.beat_schedule["x"] = {"task": "unit.add", "schedule": 5}
    assert second.conf.beat_schedule == {}


# -- the stored layout (docs/storage.md) ---------------------------------------------------------
def test_beat_record_layout_and_a_store_written_before_beat_existed(tmp_path):
    import struct

    import lmdb

    path = str(tmp_path / "old")
    env = lmdb.open(path, max_dbs=8)                # a version 2 store without a `beat` database
    with env.begin(write=True) as txn:
        txn.put(b"version", b"2", db=env.open_db(b"meta", txn=txn))
    env.close()
    harness = Harness(path)
    try:
        assert harness.entries() == {}
        app, add = make_app()
        app.add_periodic_task(10.0, add, args=(1, 2), name="adder")
        harness.register(app)
        with harness.store.env.begin() as txn:
            value = txn.get(b"adder", db=harness.store.db["beat"])
        (hlen,) = struct.unpack_from(">I", value)
        entry = P.decode(value[4:4 + hlen])
        assert value[4 + hlen:] == app.beat.messages()[1]
        assert entry["state"] == {"handled": int(T0 * 1e6), "next_run": int((T0 + 10) * 1e6), "last_run": None,
                                  "anchor": int(T0 * 1e6), "paused": False, "runs": 0, "error": None}
    finally:
        harness.store.close()
