"""TASK deliveries leave before their iteration's commit (broker.py), and what that must not break.

An in-process broker on a real LMDB store and real sockets, driven one loop iteration at a time,
with raw DEALER sockets as a worker node, its pool process and a client. A failing commit is
injected (LMDB reports MDB_MAP_FULL or an I/O error at commit in the field), because that is the
one way a delivery can leave for a lease that is never stored short of killing the broker.
"""

import pickle

import lmdb
import pytest
import zmq

from embedq import protocol as P
from embedq import states
from embedq import store as store_module
from embedq.broker import Broker

pytestmark = pytest.mark.timeout(30)

REPLY_TIMEOUT = 5.0


class Loop:
    """The broker and its raw peers, pumped by hand."""

    def __init__(self, tmp_path):
        self.context = zmq.Context()
        self.broker = Broker(str(tmp_path / "data"), "tcp://127.0.0.1:0", durability="process",
                             heartbeat=5.0, context=self.context)
        self.sockets = []
        self.node = self.dealer(b"n:raw")
        self.node.send_multipart([P.PROTOCOL, P.READY, P.encode({"node": "raw", "queues": ["q"],
                                                                 "running": []})])
        assert self.recv(self.node)[1] == P.WELCOME
        self.pool = self.dealer(b"p:raw/0/x")
        self.pool.send_multipart([P.PROTOCOL, P.JOIN, P.encode({"node": "raw", "index": 0,
                                                                "capacity": 1, "held": []})])
        assert self.recv(self.pool)[1] == P.WELCOME
        self.client = self.dealer(b"c:raw")

    def dealer(self, identity):
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(self.broker.endpoint)
        self.sockets.append(sock)
        return sock

    def recv(self, sock, skip=(P.HEARTBEAT, P.SETTLED)):
        """The next message on ``sock`` that is not in ``skip``, running the loop meanwhile."""
        for _ in range(int(REPLY_TIMEOUT / 0.01)):
            while sock.poll(0):
                frames = sock.recv_multipart()
                if frames[1] not in skip:
                    return frames
            self.broker.poll_once(max_wait=0.01)
        raise AssertionError("no message from the broker in time")

    def submit(self, task_id):
        self.client.send_multipart([P.PROTOCOL, P.SUBMIT, P.encode({"req": 1}),
                                    P.encode({"id": task_id, "task": "t.task", "queue": "q"}), b"args"])

    def result(self, task_id, token, value):
        header = P.encode({"id": task_id, "token": token, "state": states.SUCCESS, "codec": "pickle",
                           "task": "t.task"})
        self.pool.send_multipart([P.PROTOCOL, P.RESULT, header, pickle.dumps(value)])

    def state(self, task_id):
        self.client.send_multipart([P.PROTOCOL, P.STATUS, P.encode({"req": 2, "ids": [task_id]})])
        return P.decode(self.recv(self.client, skip=(P.ACK, P.RESULT))[2])["states"][task_id]

    def stored_result(self, task_id):
        with self.broker.store.env.begin() as txn:
            value = txn.get(task_id.encode(), db=self.broker.store.db["results"])
        return None if value is None else pickle.loads(store_module.split_record(value[8:])[1])

    def close(self):
        for sock in self.sockets:
            sock.close(linger=0)
        self.broker.close()
        self.context.destroy(linger=0)


@pytest.fixture
def loop(tmp_path):
    handle = Loop(tmp_path)
    yield handle
    handle.close()


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
