"""Result subscriptions at the broker: who is owed which RESULT, and what a WAIT costs.

Waiters live in the broker's memory (task id -> client sockets), filled by SUBMIT and WAIT and
emptied when the task settles; the in-process ``loop`` (broker_loop.py) shows them directly.
"""

import pytest

from embedq import protocol as P
from embedq import store as store_module

pytestmark = pytest.mark.timeout(30)


def run_to_result(loop, task_id, value):
    """Submit ``task_id`` to the raw pool's queue, run it there and return the client's RESULT."""
    loop.submit(task_id)
    assert loop.recv(loop.client)[1] == P.ACK
    frames = loop.recv(loop.pool)
    assert frames[1] == P.TASK
    loop.result(task_id, int(frames[3]), value)
    return loop.recv(loop.client)


def test_a_resubmitted_settled_task_is_answered_and_leaves_no_waiter(loop):
    assert run_to_result(loop, "t", 5)[1] == P.RESULT
    loop.submit("t")  # a client resending after the broker committed: a duplicate
    replies = [loop.recv(loop.client), loop.recv(loop.client)]
    assert sorted(frames[1] for frames in replies) == sorted([P.ACK, P.RESULT])
    loop.broker.poll_once(max_wait=0.01)
    assert "t" not in loop.broker.waiters  # (it stayed, for a task that will never settle again)


def test_a_wait_from_a_subscribed_socket_costs_no_store_reads(loop, monkeypatch):
    """A bulk WAIT (a client that may have lost the broker asks for every result it is owed)
    from a socket already subscribed reads nothing from LMDB; any other socket's still does."""
    ids = [f"w{i}" for i in range(50)]
    headers = [P.encode({"id": task_id, "task": "t.task", "queue": "nobody"}) for task_id in ids]
    loop.client.send_multipart([P.PROTOCOL, P.SUBMIT, P.encode({"req": 7}),
                                *[frame for h in headers for frame in (h, b"args")]])
    assert loop.recv(loop.client)[1] == P.ACK  # queued where no worker consumes: all pending
    reads = []

    def counted(name):
        real = getattr(store_module.Batch, name)

        def read(batch, task_id):
            reads.append(name)
            return real(batch, task_id)
        return read

    for name in ("result", "is_known"):
        monkeypatch.setattr(store_module.Batch, name, counted(name))
    loop.client.send_multipart([P.PROTOCOL, P.WAIT, P.encode({"ids": ids})])
    for _ in range(5):
        loop.broker.poll_once(max_wait=0.01)
    assert reads == []
    other = loop.dealer(b"c:other")
    other.send_multipart([P.PROTOCOL, P.WAIT, P.encode({"ids": ids})])
    for _ in range(5):
        loop.broker.poll_once(max_wait=0.01)
    assert reads.count("is_known") == len(ids)
    assert all(loop.broker.waiters[task_id] == {b"c:raw", b"c:other"} for task_id in ids)


def test_a_subscribed_socket_that_waits_again_still_gets_the_result(loop):
    loop.submit("s")
    assert loop.recv(loop.client)[1] == P.ACK
    frames = loop.recv(loop.pool)
    loop.client.send_multipart([P.PROTOCOL, P.WAIT, P.encode({"ids": ["s"]})])  # skipped: subscribed
    loop.broker.poll_once(max_wait=0.01)
    loop.result("s", int(frames[3]), 9)
    result = loop.recv(loop.client)
    assert result[1] == P.RESULT and P.decode(result[2])["id"] == "s"
