"""An in-process broker on a real LMDB store and real sockets, driven one loop iteration at a
time, with raw DEALER sockets as a worker node (queue ``q``), its one pool process and a client:
the ``loop`` fixture (a pytest plugin loaded by conftest.py), for tests that look inside the
broker between iterations (test_early_delivery, test_waits).
"""

import pickle

import pytest
import zmq

from embedq import protocol as P
from embedq import states
from embedq import store as store_module
from embedq.broker import Broker

#: Seconds a raw peer waits for a message it expects (the loop is pumped meanwhile).
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
