"""TASK deliveries leave before their iteration's commit (broker.py), and what that must not break.

An in-process broker on a real LMDB store and real sockets, driven one loop iteration at a time,
with raw DEALER sockets as a worker node, its pool process and a client. A failing commit is
injected (LMDB reports MDB_MAP_FULL or an I/O error at commit in the field), because that is the
one way a delivery can leave for a lease that is never stored short of killing the broker.
"""

import lmdb
import pytest

from embedq import protocol as P
from embedq import states
from embedq import store as store_module

pytestmark = pytest.mark.timeout(30)


def fail_first_commit(monkeypatch, error):
    """Make the next commit that writes fail with ``error``; later ones succeed."""
    real_commit = store_module.Batch.commit
    failures = []

    def commit(batch):
        if batch.dirty and not failures:
            failures.append(error)
            raise error
        return real_commit(batch)

    monkeypatch.setattr(store_module.Batch, "commit", commit)
    return failures


def take_task(loop):
    frames = loop.recv(loop.pool)
    assert frames[1] == P.TASK and len(frames) == 6, frames
    return int(frames[3]), P.decode(frames[4])["id"]


def watch_pool_during_commits(loop, monkeypatch, timeout_ms):
    """A list that gets, at each commit that writes, whether a message waits at the pool."""
    polls = []
    real_commit = store_module.Batch.commit

    def commit(batch):
        if batch.dirty:
            polls.append(bool(loop.pool.poll(timeout_ms)))
        return real_commit(batch)

    monkeypatch.setattr(store_module.Batch, "commit", commit)
    return polls


def test_a_task_is_on_its_way_to_the_pool_before_the_commit(loop, monkeypatch):
    polls = watch_pool_during_commits(loop, monkeypatch, 200)
    loop.submit("t")
    assert loop.recv(loop.client)[1] == P.ACK
    assert polls == [True]  # the TASK was readable at the pool while the broker committed
    assert take_task(loop)[1] == "t"


def test_a_task_whose_token_needs_a_new_reservation_waits_for_the_commit(loop, monkeypatch):
    """Early deliveries carry only reserved numbers: the batch that goes past the reservation
    commits a new one first, and its TASKs leave after that commit."""
    store = loop.broker.store
    store.reserved = store.seq  # as if the reserved block were used up
    polls = watch_pool_during_commits(loop, monkeypatch, 100)
    loop.submit("t")
    assert loop.recv(loop.client)[1] == P.ACK
    token, task_id = take_task(loop)
    assert polls == [False] and task_id == "t"  # not on its way during the commit
    assert store.reserved == token + store_module.SEQ_BLOCK


def test_a_delivery_whose_commit_failed_runs_twice_and_stores_one_result(loop, monkeypatch):
    """MDB_MAP_FULL at commit: the map grows and the iteration is redone, so the task goes out
    again under a new token. The first delivery is a phantom: its result matches no lease and
    is discarded; the stored result is the second delivery's."""
    failures = fail_first_commit(monkeypatch, lmdb.MapFullError("simulated: map full at commit"))
    loop.submit("t")
    assert loop.recv(loop.client)[1] == P.ACK
    assert len(failures) == 1
    phantom, task_id = take_task(loop)
    real, again = take_task(loop)
    assert task_id == again == "t" and real > phantom  # a token is never handed out twice

    loop.result("t", phantom, "phantom")
    assert loop.state("t")["state"] == states.RECEIVED  # discarded: still leased to `real`
    loop.result("t", real, "real")
    assert loop.recv(loop.client, skip=(P.ACK, P.STATE))[1] == P.RESULT
    assert loop.state("t")["state"] == states.SUCCESS
    assert loop.stored_result("t") == "real"


def test_a_delivery_whose_commit_the_disk_refused_is_discarded(loop, monkeypatch):
    """An I/O error at commit: the submit is refused (StorageFull), nothing is stored, and the
    delivery that already left is a phantom whose result is discarded."""
    fail_first_commit(monkeypatch, lmdb.Error("mdb_txn_commit: Input/output error"))
    loop.submit("t")
    ack = P.decode(loop.recv(loop.client)[2])
    assert ack["error"] == "StorageFull"
    phantom, task_id = take_task(loop)
    assert task_id == "t"
    loop.result("t", phantom, "phantom")
    assert loop.state("t")["state"] == states.UNKNOWN
    assert loop.stored_result("t") is None
