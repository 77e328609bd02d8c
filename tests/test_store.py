"""``embedq.store``: the broker's LMDB store, on a real LMDB environment under ``tmp_path``.

No broker process here: a test opens a :class:`Store`, drives :class:`Batch` transactions the way
the broker loop does (one batch, then ``commit()``), and checks what LMDB holds afterwards.
"""

import os
import signal
import struct
import subprocess
import sys

import lmdb
import pytest

from embedq import protocol as P
from embedq import lifecycle
from embedq import store as store_module
from embedq import store_space
from embedq.errors import DataDirLocked, EmbedqError
from embedq.store import Store, join_record, split_record

pytestmark = pytest.mark.timeout(60)

NOW = 1_700_000_000.0


def make_header(task_id, queue="celery", priority=None, eta=None, task="t.task", **extra):
    obj = {"id": task_id, "task": task, "queue": queue, **extra}
    if priority is not None:
        obj["priority"] = priority
    if eta is not None:
        obj["eta"] = eta
    raw = P.encode(obj)
    return P.TaskHeader.parse(raw), raw


def add(store, task_id, payload=b"payload", now=NOW, **fields):
    header, raw = make_header(task_id, **fields)
    batch = store.begin()
    accepted = batch.add_task(header, raw, payload, now)
    batch.commit()
    return accepted


def take(store, queue="celery", limit=100):
    batch = store.begin()
    taken = batch.take_ready(queue, limit)
    batch.commit()
    return [task_id for task_id, _, _ in taken]


def lease(store, task_id, node="node-1", now=NOW):
    """Lease a task as the broker does: a fresh delivery token from the sequence, then the row."""
    batch = store.begin()
    token = batch.next_seq()
    batch.lease(task_id, token, node, now)
    batch.commit()
    return token


def result_header(task_id, token=1, state="SUCCESS"):
    return P.encode({"id": task_id, "token": token, "state": state})


def settle(store, task_id, payload=b"result", expires_at=None, **kw):
    raw = result_header(task_id, **kw)
    batch = store.begin()
    batch.settle(task_id, raw, payload, expires_at)
    batch.commit()
    return raw


def read(store, method, *args):
    """Call a Batch read method in a transaction that is then aborted."""
    batch = store.begin()
    try:
        return getattr(batch, method)(*args)
    finally:
        batch.abort()


def raw_items(store, db):
    with store.env.begin() as txn:
        return list(txn.cursor(db=store.db[db]))


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")


@pytest.fixture
def store(data_dir):
    handle = Store(data_dir, durability="process")
    yield handle
    try:
        handle.close()
    except Exception:
        pass


# -- submit: put-if-absent ---------------------------------------------------------------------
def test_add_stores_header_and_payload_verbatim(store):
    header, raw = make_header("t1", priority=3, options={"x": [1, 2]})
    batch = store.begin()
    assert batch.add_task(header, raw, b"\x00\xffopaque", NOW) is True
    batch.commit()
    seq, stored_header, payload = read(store, "task", "t1")
    assert stored_header == raw and payload == b"\x00\xffopaque"
    assert seq == store.seq >= 1
    assert read(store, "is_known", "t1") and not read(store, "has_lease", "t1")
    assert read(store, "task", "nope") is None and not read(store, "is_known", "nope")


def test_duplicate_id_is_refused_and_keeps_the_first(store):
    assert add(store, "dup", payload=b"first") is True
    assert add(store, "dup", payload=b"second", priority=9) is False
    assert read(store, "task", "dup")[2] == b"first"
    assert take(store) == ["dup"]  # one ready entry, not two
    assert take(store) == []


def test_duplicate_within_one_batch(store):
    header, raw = make_header("same")
    batch = store.begin()
    assert batch.add_task(header, raw, b"a", NOW) is True
    assert batch.add_task(header, raw, b"b", NOW) is False
    batch.commit()
    assert store.ready_counts["celery"] == 1


def test_duplicate_of_a_leased_task_is_refused(store):
    add(store, "running")
    assert take(store) == ["running"]
    lease(store, "running")
    assert add(store, "running") is False
    assert take(store) == []


def test_duplicate_of_a_settled_result_is_refused(store):
    add(store, "done")
    take(store)
    settle(store, "done")
    assert read(store, "task", "done") is None  # the task record is gone, the result stays
    assert add(store, "done") is False
    assert take(store) == [] and read(store, "task", "done") is None


def test_forgotten_id_can_be_submitted_again(store):
    add(store, "f")
    take(store)
    settle(store, "f")
    batch = store.begin()
    assert batch.forget("f") is True
    assert batch.forget("f") is False
    batch.commit()
    assert read(store, "result", "f") is None and not read(store, "is_known", "f")
    assert add(store, "f") is True


# -- ready ordering ----------------------------------------------------------------------------
def test_ready_order_is_priority_then_submit_order(store):
    for task_id, priority in [("low1", 0), ("high1", 9), ("mid", 5), ("low2", None), ("high2", 9),
                              ("max", 255)]:
        add(store, task_id, priority=priority)
    assert take(store) == ["max", "high1", "high2", "mid", "low1", "low2"]


def test_queues_are_separate(store):
    add(store, "a1", queue="a")
    add(store, "b1", queue="b", priority=200)
    add(store, "a2", queue="a", priority=1)
    add(store, "ab", queue="ab")  # a queue whose name extends another's
    assert store.ready_counts == {"a": 2, "b": 1, "ab": 1}
    assert take(store, "a") == ["a2", "a1"]
    assert take(store, "ab") == ["ab"]
    assert take(store, "b") == ["b1"]
    assert take(store, "missing") == []


def test_take_ready_limits(store):
    for i in range(5):
        add(store, f"t{i}")
    assert take(store, limit=0) == []
    assert take(store, limit=2) == ["t0", "t1"]
    assert store.ready_counts["celery"] == 3
    assert take(store, limit=1) == ["t2"]
    assert take(store, limit=10) == ["t3", "t4"]
    assert store.ready_counts["celery"] == 0
    assert take(store, limit=10) == []


def test_take_ready_returns_header_and_payload(store):
    header, raw = make_header("x", priority=1)
    batch = store.begin()
    batch.add_task(header, raw, b"body", NOW)
    batch.commit()
    batch = store.begin()
    assert batch.take_ready("celery", 5) == [("x", raw, b"body")]
    batch.commit()


def test_peek_ready_gives_the_sort_key_of_the_best_task(store):
    assert read(store, "peek_ready", "celery") is None
    add(store, "low", priority=1)
    add(store, "high", priority=7)
    key = read(store, "peek_ready", "celery")
    assert key[0] == 255 - 7 and len(key) == 9
    assert read(store, "peek_ready", "other") is None
    assert take(store, limit=1) == ["high"]  # peeking took nothing


def test_ready_counts_follow_commits_not_aborts(store):
    add(store, "a")
    header, raw = make_header("b")
    batch = store.begin()
    batch.add_task(header, raw, b"", NOW)
    batch.take_ready("celery", 5)
    assert batch.ready_delta["celery"] == -1  # +1 for b, -2 taken
    batch.abort()
    assert store.ready_counts["celery"] == 1
    assert read(store, "task", "b") is None
    assert take(store) == ["a"]


def stored_seq(store):
    with store.env.begin() as txn:
        return struct.unpack(">Q", txn.get(b"seq", db=store.db["meta"]))[0]


def test_seq_numbers_are_never_handed_out_twice(data_dir, store):
    """TASK deliveries leave before their commit (broker.py): a number of an aborted batch, or of
    one a crash cut short, may be out in a delivery, so no later batch may hand it out again."""
    add(store, "a")
    reserved = stored_seq(store)  # what is stored is the reservation, committed at open
    assert store.seq < reserved == store.reserved == store_module.SEQ_BLOCK
    batch = store.begin()
    first = batch.next_seq()
    assert batch.numbers_reserved
    batch.abort()
    batch = store.begin()
    assert batch.next_seq() == first + 1  # not reused after the abort
    batch.abort()

    batch = store.begin()  # a batch cut short by a crash: its number is out, never stored
    lost = batch.next_seq()
    batch.txn.abort()
    store.close()
    reopened = Store(data_dir, durability="process")
    try:
        assert reopened.seq == reserved > lost  # continues after the old reservation
        assert stored_seq(reopened) == reopened.reserved == reserved + store_module.SEQ_BLOCK

        reopened.reserved = reopened.seq  # as if the block were used up
        batch = reopened.begin()
        number = batch.next_seq()
        assert not batch.numbers_reserved  # (its deliveries wait for this commit)
        batch.commit()
        assert stored_seq(reopened) == reopened.reserved == number + store_module.SEQ_BLOCK
    finally:
        reopened.close()


def test_an_idle_batch_commits_nothing(store):
    add(store, "a")
    before = store.env.info()["last_txnid"]
    batch = store.begin()
    assert batch.take_ready("other", 10) == [] and batch.result("a") is None
    batch.promote_due(NOW)
    batch.expire_results(NOW)
    batch.commit()  # nothing was written: no LMDB commit (and no fsync) at all
    assert store.env.info()["last_txnid"] == before
    assert take(store) == ["a"]
    assert store.env.info()["last_txnid"] == before + 1


def test_a_batch_that_only_leases_is_committed(store):
    """Every write marks the batch dirty; an unmarked one would be dropped by commit()."""
    add(store, "t")
    take(store)
    batch = store.begin()
    batch.lease("t", 123, "node/0", NOW)
    batch.commit()
    assert read(store, "has_lease", "t")


def test_a_stale_ready_entry_is_skipped(store):
    add(store, "gone")
    add(store, "kept")
    settle(store, "gone")  # settled while still indexed as ready
    assert take(store) == ["kept"]
    assert store.ready_counts["celery"] == 0
    assert raw_items(store, "ready") == []


def add_in(batch, task_id, payload=b"payload", **fields):
    header, raw = make_header(task_id, **fields)
    return batch.add_task(header, raw, payload, NOW)


def ready_entries(batch):
    return batch.txn.stat(batch.db["ready"])["entries"]


def test_a_task_taken_in_the_batch_that_queued_it_never_touches_ready(store):
    batch = store.begin()
    add_in(batch, "quick", payload=b"body")
    assert batch.take_ready("celery", 5) == [("quick", make_header("quick")[1], b"body")]
    assert ready_entries(batch) == 0
    batch.commit()
    assert store.ready_counts["celery"] == 0
    assert raw_items(store, "ready") == [] and read(store, "task", "quick") is not None


def test_ready_entries_kept_in_memory_are_written_at_commit_in_order(store):
    batch = store.begin()
    for task_id, priority in [("low", 0), ("high", 9), ("mid", 5), ("low2", None)]:
        add_in(batch, task_id, priority=priority)
    assert ready_entries(batch) == 0
    assert batch.take_ready("celery", 1) == [("high", make_header("high", priority=9)[1], b"payload")]
    batch.commit()
    assert store.ready_counts["celery"] == 3 and len(raw_items(store, "ready")) == 3
    assert take(store) == ["mid", "low", "low2"]


def test_a_new_task_is_ordered_with_those_already_in_lmdb(store):
    add(store, "old", priority=1)
    batch = store.begin()
    add_in(batch, "urgent", priority=9)
    add_in(batch, "later", priority=1)
    assert [t for t, _, _ in batch.take_ready("celery", 2)] == ["urgent", "old"]
    batch.commit()
    assert take(store) == ["later"]


def test_peek_ready_sees_the_entries_kept_in_memory(store):
    batch = store.begin()
    add_in(batch, "new", priority=9)
    assert batch.peek_ready("celery")[0] == 255 - 9
    batch.abort()


def test_a_new_task_settled_before_dispatch_is_skipped(store):
    batch = store.begin()
    add_in(batch, "revoked-at-once")
    add_in(batch, "kept")
    batch.settle("revoked-at-once", result_header("revoked-at-once", state="REVOKED"), b"", None)
    assert [t for t, _, _ in batch.take_ready("celery", 5)] == ["kept"]
    batch.commit()
    assert store.ready_counts["celery"] == 0 and raw_items(store, "ready") == []


def test_an_aborted_batch_writes_none_of_its_ready_entries(store):
    batch = store.begin()
    add_in(batch, "never")
    batch.abort()
    assert store.ready_counts["celery"] == 0 and raw_items(store, "ready") == []
    assert take(store) == []


# -- leases and requeue ------------------------------------------------------------------------
def test_lease_round_trip(store):
    add(store, "t")
    take(store)
    token = lease(store, "t", node="worker@h#1.ab/0", now=NOW)
    found = read(store, "get_lease", "t")
    assert (found.task_id, found.token, found.node) == ("t", token, "worker@h#1.ab/0")
    assert found.since == pytest.approx(NOW, abs=1e-5)
    assert read(store, "has_lease", "t")
    assert [(l.task_id, l.token) for l in store.leases()] == [("t", token)]
    assert read(store, "get_lease", "other") is None


def test_requeue_puts_a_task_back_at_its_original_place(store):
    for task_id in ("first", "second", "third"):
        add(store, task_id)
    assert take(store, limit=1) == ["first"]
    lease(store, "first")
    add(store, "fourth")
    batch = store.begin()
    assert batch.requeue("first") is True
    batch.commit()
    assert not read(store, "has_lease", "first")
    assert store.ready_counts["celery"] == 4
    assert take(store) == ["first", "second", "third", "fourth"]


def test_requeue_keeps_priority_and_queue(store):
    add(store, "plain", queue="q")
    add(store, "urgent", queue="q", priority=50)
    assert take(store, "q", limit=1) == ["urgent"]
    lease(store, "urgent")
    add(store, "urgent-later", queue="q", priority=50)
    batch = store.begin()
    batch.requeue("urgent")
    batch.commit()
    assert take(store, "q") == ["urgent", "urgent-later", "plain"]
    assert take(store, "celery") == []


def test_requeue_of_a_settled_task_only_drops_the_lease(store):
    add(store, "t")
    take(store)
    lease(store, "t")
    batch = store.begin()
    batch.txn.delete(b"t", db=store.db["tasks"])  # the task record is gone (settled elsewhere)
    assert batch.requeue("t") is False
    batch.commit()
    assert not read(store, "has_lease", "t")
    assert take(store) == []


# -- settle, results, expiry -------------------------------------------------------------------
def test_settle_removes_task_and_lease_and_stores_the_result(store):
    add(store, "t")
    take(store)
    token = lease(store, "t")
    raw = settle(store, "t", payload=b"\x80pickled", expires_at=NOW + 60, token=token)
    assert read(store, "task", "t") is None
    assert not read(store, "has_lease", "t") and store.leases() == []
    assert read(store, "result", "t") == (raw, b"\x80pickled")
    assert read(store, "is_known", "t")
    assert raw_items(store, "expiry") == [(struct.pack(">Q", int((NOW + 60) * 1e6)) + b"t", b"")]


def test_settle_drops_progress_and_revocation_records_also_after_a_reopen(data_dir):
    store = Store(data_dir)
    assert store.side_records is False  # nothing to drop: settling skips those lookups
    for task_id in ("started", "revoked"):
        add(store, task_id)
    batch = store.begin()
    batch.set_progress("started", {"state": "STARTED"})
    batch.mark_revoked("revoked", {"reason": "revoked"})
    batch.commit()
    assert store.side_records is True
    store.close()
    store = Store(data_dir)  # a restarted broker finds them
    try:
        assert store.side_records is True
        settle(store, "started")
        settle(store, "revoked")
        assert raw_items(store, "progress") == [] and raw_items(store, "revoked") == []
    finally:
        store.close()


def test_settle_without_expiry_keeps_the_result_forever(store):
    add(store, "t")
    settle(store, "t", expires_at=None)
    assert raw_items(store, "expiry") == []
    batch = store.begin()
    assert batch.expire_results(NOW * 10) == 0
    batch.commit()
    assert read(store, "result", "t") is not None


def test_expire_results_removes_due_results_in_expiry_order(store):
    for i, ttl in enumerate([30, 10, 20, 40]):
        add(store, f"r{i}")
        settle(store, f"r{i}", expires_at=NOW + ttl)
    batch = store.begin()
    assert batch.expire_results(NOW + 5) == 0
    assert batch.expire_results(NOW + 20) == 2        # due at exactly now counts as expired
    batch.commit()
    assert read(store, "result", "r1") is None and read(store, "result", "r2") is None
    assert read(store, "result", "r0") is not None and read(store, "result", "r3") is not None
    assert not read(store, "is_known", "r1")
    batch = store.begin()
    assert batch.expire_results(NOW + 100, limit=1) == 1  # limit bounds one sweep
    assert batch.expire_results(NOW + 100) == 1
    batch.commit()
    assert raw_items(store, "results") == [] and raw_items(store, "expiry") == []


def test_expire_results_after_forget_is_harmless(store):
    add(store, "t")
    settle(store, "t", expires_at=NOW + 1)
    batch = store.begin()
    batch.forget("t")
    batch.commit()
    batch = store.begin()
    batch.expire_results(NOW + 2)  # an expiry entry left by forget() is cleaned up when due
    batch.commit()
    assert raw_items(store, "expiry") == [] and raw_items(store, "results") == []
    assert add(store, "t") is True


def test_a_resubmitted_result_lives_its_own_lifetime(store):
    """forget() removes the expiry entry too, so an old entry cannot delete a newer result."""
    add(store, "again")
    settle(store, "again", payload=b"old", expires_at=NOW + 10)
    batch = store.begin()
    batch.forget("again")
    batch.commit()
    assert add(store, "again") is True
    settle(store, "again", payload=b"new", expires_at=NOW + 1000)
    batch = store.begin()
    batch.expire_results(NOW + 20)
    batch.commit()
    assert read(store, "result", "again") is not None  # due at NOW + 1000, not NOW + 10


# -- ETA tasks ---------------------------------------------------------------------------------
def test_eta_task_is_scheduled_not_ready(store):
    add(store, "later", eta=NOW + 10)
    add(store, "past", eta=NOW - 10)  # an ETA already passed is ready at once
    assert store.ready_counts["celery"] == 1
    assert take(store) == ["past"]
    assert read(store, "next_due") == pytest.approx(NOW + 10, abs=1e-5)


def test_promote_due_moves_tasks_whose_time_has_come(store):
    add(store, "a", eta=NOW + 30)
    add(store, "b", eta=NOW + 10, priority=1)
    add(store, "c", eta=NOW + 20, queue="other")
    batch = store.begin()
    assert batch.promote_due(NOW + 5) == pytest.approx(NOW + 10, abs=1e-5)  # nothing due yet
    assert batch.promote_due(NOW + 20) == pytest.approx(NOW + 30, abs=1e-5)
    batch.commit()
    assert store.ready_counts == {"celery": 1, "other": 1}
    assert take(store, "celery") == ["b"] and take(store, "other") == ["c"]
    batch = store.begin()
    assert batch.promote_due(NOW + 30) is None  # the last one: nothing scheduled any more
    batch.commit()
    assert take(store) == ["a"]
    assert raw_items(store, "scheduled") == []


def test_promoted_task_keeps_its_submit_order_and_priority(store):
    add(store, "scheduled-first", eta=NOW + 1)
    add(store, "ready-later")
    add(store, "ready-urgent", priority=9)
    batch = store.begin()
    batch.promote_due(NOW + 1)
    batch.commit()
    # promoted with its original sequence number: older than "ready-later"
    assert take(store) == ["ready-urgent", "scheduled-first", "ready-later"]


def test_promote_due_limit_and_stale_entries(store):
    for i in range(3):
        add(store, f"s{i}", eta=NOW + 1 + i)
    settle(store, "s0")  # settled (e.g. revoked) while scheduled: its entry is stale
    batch = store.begin()
    next_due = batch.promote_due(NOW + 10, limit=2)
    assert next_due == pytest.approx(NOW + 3, abs=1e-5)  # s2 still waits: the limit stopped us
    assert batch.promote_due(NOW + 10) is None
    batch.commit()
    assert take(store) == ["s1", "s2"]


# -- durability: close and reopen ---------------------------------------------------------------
def test_everything_survives_close_and_reopen(data_dir):
    store = Store(data_dir, durability="fsync")
    add(store, "queued", priority=2)
    add(store, "queued-low")
    add(store, "scheduled", eta=NOW + 100)
    add(store, "leased")
    assert take(store, limit=1) == ["queued"]
    token = lease(store, "queued", node="n1/0")
    add(store, "done", queue="other")
    assert take(store, "other") == ["done"]
    raw = settle(store, "done", payload=b"value", expires_at=NOW + 60)
    reserved = store.reserved
    store.close()

    store = Store(data_dir, durability="fsync")
    try:
        assert store.seq == reserved  # (numbers reserved before may be out in deliveries)
        assert store.ready_counts == {"celery": 2}  # counted from the ready index at open
        assert [(l.task_id, l.token, l.node) for l in store.leases()] == [("queued", token, "n1/0")]
        assert read(store, "result", "done") == (raw, b"value")
        assert read(store, "next_due") == pytest.approx(NOW + 100, abs=1e-5)
        batch = store.begin()
        assert batch.next_seq() == reserved + 1  # delivery tokens are never reused after a restart
        batch.abort()
        assert add(store, "done") is False and add(store, "queued") is False
        assert take(store) == ["queued-low", "leased"]
    finally:
        store.close()


def test_durability_modes_set_lmdb_sync_flags(tmp_path):
    for durability, synced in [("fsync", True), ("process", False)]:
        store = Store(str(tmp_path / durability), durability=durability)
        try:
            flags = store.env.flags()
            assert flags["sync"] is synced and flags["metasync"] is synced
            assert flags["writemap"] is False
        finally:
            store.close()


def test_schema_version_is_recorded(store):
    from embedq.store import SCHEMA_VERSION

    with store.env.begin() as txn:
        assert txn.get(b"version", db=store.db["meta"]) == SCHEMA_VERSION
    add(store, "x")
    with store.env.begin() as txn:  # the reservation: every number handed out is below it
        assert struct.unpack(">Q", txn.get(b"seq", db=store.db["meta"]))[0] == store.reserved > store.seq


def test_key_layout_matches_the_documented_schema(store):
    add(store, "t1", queue="q", priority=5)
    add(store, "t2", queue="q", eta=NOW + 2)
    (ready_key, ready_value), = raw_items(store, "ready")
    seq1 = read(store, "task", "t1")[0]
    assert ready_key == b"q\x00" + struct.pack(">BQ", 250, seq1) and ready_value == b"t1"
    (due_key, due_value), = raw_items(store, "scheduled")
    seq2 = read(store, "task", "t2")[0]
    assert due_key == struct.pack(">QQ", int((NOW + 2) * 1e6), seq2) and due_value == b"t2"
    tasks = dict(raw_items(store, "tasks"))
    _, raw = make_header("t1", queue="q", priority=5)
    assert tasks[b"t1"] == struct.pack(">QI", seq1, len(raw)) + raw + b"payload"
    take(store, "q")
    token = lease(store, "t1", node="nd/3", now=NOW)
    (lease_key, lease_value), = raw_items(store, "leases")
    assert lease_key == b"t1"
    assert lease_value == struct.pack(">QQ", token, int(NOW * 1e6)) + b"nd/3"
    raw_result = settle(store, "t1", payload=b"R", expires_at=NOW + 5)
    assert dict(raw_items(store, "results"))[b"t1"] == (
        struct.pack(">QI", int((NOW + 5) * 1e6), len(raw_result)) + raw_result + b"R")
    assert raw_items(store, "expiry") == [(struct.pack(">Q", int((NOW + 5) * 1e6)) + b"t1", b"")]
    add(store, "t2")
    kept = settle(store, "t2", payload=b"", expires_at=None)  # kept forever: expires_us 0
    assert dict(raw_items(store, "results"))[b"t2"] == struct.pack(">QI", 0, len(kept)) + kept


def test_record_helpers_round_trip():
    record = join_record(b'{"a":1}', b"\x00payload")
    assert split_record(record) == (b'{"a":1}', b"\x00payload")
    assert split_record(b"xx" + record, offset=2) == (b'{"a":1}', b"\x00payload")
    assert split_record(join_record(b"", b"")) == (b"", b"")


# -- the lock file -----------------------------------------------------------------------------
def test_second_store_on_the_same_dir_is_refused(store, data_dir):
    with pytest.raises(DataDirLocked) as caught:
        Store(data_dir)
    message = str(caught.value)
    assert repr(data_dir) in message
    assert f"pid {os.getpid()}" in message
    assert isinstance(caught.value, EmbedqError)
    # the refused attempt did not break the owner, nor its lock
    assert add(store, "still-mine") is True
    with open(os.path.join(data_dir, "broker.lock")) as handle:
        assert handle.read().strip() == str(os.getpid())
    with pytest.raises(DataDirLocked):
        Store(data_dir)


def test_lock_is_released_on_close(data_dir):
    first = Store(data_dir)
    first.close()
    second = Store(data_dir)
    second.close()


def test_lock_is_released_when_the_owner_is_killed(data_dir):
    code = ("import sys; from embedq.store import Store; s = Store(sys.argv[1]); "
            "print('locked', flush=True); sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", code, data_dir], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        assert owner.stdout.readline().strip() == b"locked"
        with pytest.raises(DataDirLocked, match=f"pid {owner.pid}"):
            Store(data_dir)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        store = Store(data_dir)  # the OS dropped the flock with the process
        store.close()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        owner.stdin.close()
        owner.stdout.close()


# -- map growth --------------------------------------------------------------------------------
SMALL_MAP = 1 << 20  # 1 MiB
PAYLOAD = b"x" * (64 << 10)


@pytest.fixture
def small_map(monkeypatch):
    monkeypatch.setattr(store_module, "INITIAL_MAP_SIZE", SMALL_MAP)


def map_size(store):
    return store.env.info()["map_size"]


def fill_until_map_full(store, prefix, limit=1000):
    """Add tasks one batch each until LMDB raises MapFullError; return how many were stored."""
    for i in range(limit):
        header, raw = make_header(f"{prefix}{i}")
        batch = store.begin()
        try:
            batch.add_task(header, raw, PAYLOAD, NOW)
            batch.commit()
        except lmdb.MapFullError:
            batch.abort()
            return i
    raise AssertionError("the map never filled up")


def test_store_starts_with_the_initial_map_size(small_map, data_dir):
    store = Store(data_dir, max_size=64 << 20)
    try:
        assert map_size(store) == SMALL_MAP
    finally:
        store.close()
    capped = Store(data_dir + "-capped", max_size=SMALL_MAP // 2)
    try:
        assert map_size(capped) == SMALL_MAP // 2  # never above the cap
    finally:
        capped.close()


def test_grow_doubles_the_map_after_map_full(small_map, data_dir):
    store = Store(data_dir, durability="process", max_size=8 * SMALL_MAP)
    try:
        stored = fill_until_map_full(store, "a")
        assert 0 < stored < 16
        assert store.grow() is True
        assert map_size(store) == 2 * SMALL_MAP
        more = fill_until_map_full(store, "b")
        assert more > 0  # the retried write fits now
        for i in range(stored):  # nothing stored before the MapFullError was harmed
            assert read(store, "task", f"a{i}")[2] == PAYLOAD
    finally:
        store.close()


def test_grow_to_fit_doubles_before_the_map_is_full(small_map, data_dir):
    store = Store(data_dir, durability="process", max_size=64 * SMALL_MAP)
    try:
        used_limit = SMALL_MAP * store_space.GROW_THRESHOLD
        i = 0
        while True:  # fill past the growth threshold, but not to MapFullError
            info = store.env.info()
            if (info["last_pgno"] + 1) * store.env.stat()["psize"] > used_limit:
                break
            add(store, f"t{i}", payload=PAYLOAD)
            i += 1
        assert map_size(store) == SMALL_MAP
        store.grow_to_fit()
        assert map_size(store) == 2 * SMALL_MAP
        store.grow_to_fit()  # already roomy enough: no further growth
        assert map_size(store) == 2 * SMALL_MAP
    finally:
        store.close()


def test_grow_to_fit_on_reopen_makes_room_for_existing_data(small_map, data_dir):
    store = Store(data_dir, durability="process", max_size=64 * SMALL_MAP)
    stored = fill_until_map_full(store, "a")
    assert store.grow() and store.grow()  # 4 MiB
    stored += fill_until_map_full(store, "b")
    store.close()
    # reopened with a 1 MiB initial size, a store holding ~4 MiB must come back big enough
    store = Store(data_dir, durability="process", max_size=64 * SMALL_MAP)
    try:
        info = store.env.info()
        used = (info["last_pgno"] + 1) * store.env.stat()["psize"]
        assert used > 2 * SMALL_MAP
        assert used <= map_size(store) * store_space.GROW_THRESHOLD
        assert len(raw_items(store, "tasks")) == stored
        assert add(store, "one-more", payload=PAYLOAD) is True
    finally:
        store.close()


def test_grow_stops_at_max_size(small_map, data_dir):
    cap = 3 * SMALL_MAP  # not a power of two: the last step is clamped to the cap
    store = Store(data_dir, durability="process", max_size=cap)
    try:
        stored = fill_until_map_full(store, "a")
        assert store.grow() is True and map_size(store) == 2 * SMALL_MAP
        stored += fill_until_map_full(store, "b")
        assert store.grow() is True and map_size(store) == cap
        stored += fill_until_map_full(store, "c")
        assert store.grow() is False  # at the cap: the broker refuses submits from here on
        assert map_size(store) == cap
        store.grow_to_fit()
        assert map_size(store) == cap
        assert len(raw_items(store, "tasks")) == stored  # nothing already stored was lost
        assert take(store, limit=1000) != []  # and the full store still works (reads, deletes)
    finally:
        store.close()


def test_expiry_of_an_overwritten_result_spares_the_newer_one(store):
    add(store, "twice")
    settle(store, "twice", payload=b"first", expires_at=NOW + 10)
    settle(store, "twice", payload=b"second", expires_at=NOW + 100)  # same id settled again
    batch = store.begin()
    assert batch.expire_results(NOW + 50) == 1  # the stale entry goes, the result stays
    batch.commit()
    assert read(store, "result", "twice")[1] == b"second"
    batch = store.begin()
    batch.expire_results(NOW + 100)
    batch.commit()
    assert read(store, "result", "twice") is None and raw_items(store, "expiry") == []


# -- the broker loop's use of the store ----------------------------------------------------------
def test_map_full_retry_does_not_lose_due_tasks(tmp_path, monkeypatch):
    import zmq

    from embedq.broker import Broker

    clock = [NOW]
    context = zmq.Context()
    broker = Broker(str(tmp_path / "data"), "tcp://127.0.0.1:0", durability="process",
                    heartbeat=0.2, clock=lambda: clock[0], context=context)
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(broker.endpoint)
    try:
        header, raw = make_header("later", queue="q", eta=NOW + 10)
        client.send_multipart([P.PROTOCOL, P.SUBMIT, P.encode({"req": 1}), raw, b"payload"])
        while not client.poll(0):
            broker.poll_once(max_wait=0.05)
        assert P.decode(client.recv_multipart()[2])["ok"] == 1
        assert broker.store.ready_counts["q"] == 0  # scheduled, not ready

        clock[0] = NOW + 20  # now it is due
        real_commit = store_module.Batch.commit
        failures = []

        def commit_once_map_full(batch):  # LMDB may report MDB_MAP_FULL at commit
            if batch.dirty and not failures:
                failures.append(1)
                raise lmdb.MapFullError("simulated: map full at commit")
            return real_commit(batch)

        monkeypatch.setattr(store_module.Batch, "commit", commit_once_map_full)
        for _ in range(5):
            broker.poll_once(max_wait=0.01)
        assert failures == [1]
        assert broker.store.ready_counts["q"] == 1, "the due task was never promoted"
    finally:
        client.close(linger=0)
        broker.close()
        context.destroy(linger=0)



def test_an_iteration_the_disk_refuses_answers_submitters_and_drops_the_rest(tmp_path, monkeypatch):
    """Every commit fails (a full disk): a SUBMIT is answered with StorageFull even when the
    iteration also holds other writes (a FORGET); those are dropped for their senders to resend,
    and nothing of either is stored. Once commits succeed, the resent FORGET works."""
    import zmq

    from embedq.broker import Broker

    context = zmq.Context()
    broker = Broker(str(tmp_path / "data"), "tcp://127.0.0.1:0", durability="process",
                    heartbeat=0.2, clock=lambda: NOW, context=context)
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(broker.endpoint)

    def reply():
        while not client.poll(0):
            broker.poll_once(max_wait=0.05)
        return client.recv_multipart()

    try:
        batch = broker.store.begin()
        batch.settle("done", P.encode({"id": "done", "state": "SUCCESS"}), b"", None)
        batch.commit()
        real_commit = store_module.Batch.commit
        failed = []

        def disk_full(batch):
            if batch.dirty:
                failed.append(1)
                raise lmdb.Error("mdb_txn_commit: Input/output error")
            return real_commit(batch)

        monkeypatch.setattr(store_module.Batch, "commit", disk_full)
        _, raw = make_header("new")
        client.send_multipart([P.PROTOCOL, P.FORGET, P.encode({"req": 1, "ids": ["done"]})])
        client.send_multipart([P.PROTOCOL, P.SUBMIT, P.encode({"req": 2}), raw, b"payload"])
        while len(failed) < 2:  # both messages in one iteration: it fails, then fails without the submit
            broker.poll_once(max_wait=0.05)
        answer = P.decode(reply()[2])
        assert answer["req"] == 2 and answer["error"] == "StorageFull"
        assert "cannot be written" in answer["message"] and "free disk space" in answer["message"]
        assert not client.poll(100)  # the FORGET was dropped: no ACK, its sender resends
        with broker.store.env.begin() as txn:
            assert txn.get(b"new", db=broker.store.db["tasks"]) is None
            assert txn.get(b"done", db=broker.store.db["results"]) is not None

        monkeypatch.setattr(store_module.Batch, "commit", real_commit)
        client.send_multipart([P.PROTOCOL, P.FORGET, P.encode({"req": 3, "ids": ["done"]})])
        assert P.decode(reply()[2]) == {"req": 3, "ok": 1}
        with broker.store.env.begin() as txn:
            assert txn.get(b"done", db=broker.store.db["results"]) is None
        assert broker.write_failure is None  # a commit with writes went through
    finally:
        client.close(linger=0)
        broker.close()
        context.destroy(linger=0)

def test_a_data_dir_of_another_layout_is_refused_with_the_fix(tmp_path):
    from embedq.errors import ConfigurationError

    first = Store(str(tmp_path / "old"), durability="process")
    with first.env.begin(write=True) as txn:
        txn.put(b"version", b"0", db=first.db["meta"])
    first.close()
    with pytest.raises(ConfigurationError, match="new --data-dir"):
        Store(str(tmp_path / "old"), durability="process")
    lifecycle.lock_data_dir(str(tmp_path / "old")).close()  # the refusal released the lock
