"""The wire protocol against a real broker process, spoken by hand over raw DEALER sockets.

The rule under test (docs/protocol.md): any message the broker cannot parse is dropped, the peer
is sent DISCONNECT, and the broker carries on. Every test ends by checking that the broker process
is alive and still runs a normal round trip (a task submitted through the App, run by a real
worker node, result returned).

Raw peers play all three roles: a client (SUBMIT/WAIT/STATUS/FORGET), a worker node's supervisor
(READY, heartbeats, LOST) and a pool process (JOIN, TASK in, RESULT out). A raw node keeps
heartbeating whenever the test waits on any raw peer, so the broker does not evict it mid-test.
"""

import random
import selectors
import socket
import time
from urllib.parse import urlparse

import pytest
import zmq

import embedq
from embedq import protocol as P
from embedq import states

from raw_peers import (
    MISSING, REPLY_TIMEOUT, Peer, add_task, header, raw_header, submit_frames, success_result,
    wait_for_state)

pytestmark = pytest.mark.timeout(60)

# -- malformed messages: DISCONNECT, nothing stored, broker carries on -------------------------
GOOD = header("good-task")

MALFORMED = {
    # framing and commands
    "no protocol frame": ([P.SUBMIT, P.encode({"req": 1}), GOOD, b"p"], "protocol frame"),
    "wrong protocol version": ([b"EQ2", P.STATUS, P.encode({"req": 1, "ids": []})], "protocol frame"),
    "protocol frame only": ([P.PROTOCOL], "protocol frame"),
    "a single empty frame": ([b""], "protocol frame"),
    "unknown command": ([P.PROTOCOL, b"FROBNICATE", b"{}"], "unknown command"),
    "command in lower case": ([P.PROTOCOL, b"submit", P.encode({"req": 1}), GOOD, b"p"],
                              "unknown command"),
    "broker-only command WELCOME": ([P.PROTOCOL, P.WELCOME, b"{}"], "unknown command"),
    "broker-only command TASK": ([P.PROTOCOL, P.TASK, b"1", GOOD, b"p"], "unknown command"),
    "broker-only command SETTLED": ([P.PROTOCOL, P.SETTLED, b"1"], "unknown command"),
    "broker-only command ACK": ([P.PROTOCOL, P.ACK, b'{"req":1}'], "unknown command"),
    # control frames
    "control frame not JSON": ([P.PROTOCOL, P.SUBMIT, b"{req: 1", GOOD, b"p"], "not JSON"),
    "control frame not UTF-8": ([P.PROTOCOL, P.STATUS, b"\xff\xfe\x00\x80"], "not JSON"),
    "control frame empty": ([P.PROTOCOL, P.STATUS, b""], "not JSON"),
    "control frame a JSON list": ([P.PROTOCOL, P.STATUS, b"[1, 2]"], "JSON object"),
    "control frame a JSON string": ([P.PROTOCOL, P.WAIT, b'"ids"'], "JSON object"),
    "control frame JSON null": ([P.PROTOCOL, P.FORGET, b"null"], "JSON object"),
    # SUBMIT framing
    "SUBMIT without control frame": ([P.PROTOCOL, P.SUBMIT], "without a control frame"),
    "SUBMIT without tasks": ([P.PROTOCOL, P.SUBMIT, P.encode({"req": 1})], "groups of 2"),
    "SUBMIT header without payload": ([P.PROTOCOL, P.SUBMIT, P.encode({"req": 1}), GOOD],
                                      "groups of 2"),
    "SUBMIT odd frames after a good task": (
        [P.PROTOCOL, P.SUBMIT, P.encode({"req": 1}), GOOD, b"p", header("second")], "groups of 2"),
    # WAIT / STATUS / FORGET ids
    "WAIT without body": ([P.PROTOCOL, P.WAIT], "ids must be a list"),
    "WAIT without ids": ([P.PROTOCOL, P.WAIT, b"{}"], "ids must be a list"),
    "STATUS ids a string": ([P.PROTOCOL, P.STATUS, b'{"req":1,"ids":"abc"}'], "ids must be a list"),
    "STATUS id not a string": ([P.PROTOCOL, P.STATUS, b'{"req":1,"ids":[1]}'], "task id"),
    "FORGET empty id": ([P.PROTOCOL, P.FORGET, b'{"req":1,"ids":[""]}'], "task id"),
    "FORGET id too long": ([P.PROTOCOL, P.FORGET, P.encode({"req": 1, "ids": ["f" * 256]})],
                           "task id"),
    # worker commands from a peer that is neither a registered node nor a joined pool process
    "HEARTBEAT from an unregistered peer": (
        [P.PROTOCOL, P.HEARTBEAT, P.encode({"held": [], "seen": 0})], "unknown peer"),
    "empty HEARTBEAT from an unregistered peer": ([P.PROTOCOL, P.HEARTBEAT], "unknown peer"),
    "RESULT from an unregistered peer": (
        [P.PROTOCOL, P.RESULT, *success_result("good-task", 1, 5)], "unknown peer"),
    "LOST from an unregistered peer": ([P.PROTOCOL, P.LOST, b'{"index":0}'], "unknown peer"),
    "JOIN for a node that never sent READY": (
        [P.PROTOCOL, P.JOIN, b'{"node":"nobody","index":0,"capacity":1,"held":[]}'], "unknown peer"),
}


@pytest.mark.parametrize("frames, reason", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_is_answered_with_disconnect(peers, assert_serves, frames, reason):
    peer = peers()
    peer.send(*frames)
    peer.expect_disconnect(reason)
    assert peer.state("good-task") == states.UNKNOWN  # nothing of a refused message was stored
    assert_serves()


BAD_HEADERS = {
    "priority 999": header(priority=999),
    "priority 256": header(priority=256),
    "priority -1": header(priority=-1),
    "priority a string": header(priority="5"),
    "priority a float": header(priority=2.5),
    "priority true": header(priority=True),
    "id not a string": header(task_id=42),
    "id a list": header(task_id=["bad-task"]),
    "id missing": header(task_id=MISSING),
    "id empty": header(task_id=""),
    "id longer than 255 characters": header(task_id="i" * 256),
    "id with a NUL": header(task_id="bad\x00task"),
    "task name missing": header(task=MISSING),
    "task name not a string": header(task=7),
    "queue empty": header(queue=""),
    "queue missing": header(queue=MISSING),
    "queue longer than 255 characters": header(queue="q" * 256),
    "queue not a string": header(queue=["celery"]),
    "eta a string": header(eta="tomorrow"),
    "eta true": header(eta=True),
    "expires a string": header(expires="never"),
    "header not JSON": b"{'id': 'bad-task'}",
    "header a JSON list": b'["bad-task", "testapp.add", "celery"]',
}


@pytest.mark.parametrize("bad", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_bad_task_header_refuses_the_whole_submit(peers, assert_serves, bad):
    peer = peers()
    # a good task first: the refusal is all or nothing, so it must not be stored either
    peer.send(*submit_frames(header("good-task"), bad))
    peer.expect_disconnect("")
    assert peer.states("good-task", "bad-task") == {
        "good-task": {"state": states.UNKNOWN}, "bad-task": {"state": states.UNKNOWN}}
    assert_serves()


def test_limits_are_inclusive(peers, assert_serves):
    """255-character ids and queues and priority 255 are accepted (the limits are inclusive)."""
    peer = peers()
    long_id, long_queue = "i" * 255, "q" * 255
    ack = peer.submit((header(long_id, queue=long_queue, priority=255), b"p"),
                      (header("zero", priority=0), b"p"))
    assert ack == {"req": 1, "ok": 2, "dup": []}
    assert peer.state(long_id) == states.PENDING
    assert_serves()


READY_FIELDS = {"node": "raw-node", "queues": ["raw"]}
BAD_READY = {
    "no body": None,
    "control frame not JSON": b"node=raw-node",
    "node missing": {"node": MISSING},
    "node not a string": {"node": 42},
    "node empty": {"node": ""},
    "node too long": {"node": "n" * 256},
    "node with a NUL": {"node": "raw\x00node"},
    "queues missing": {"queues": MISSING},
    "queues empty": {"queues": []},
    "queues a string": {"queues": "raw"},
    "queue empty": {"queues": ["raw", ""]},
    "queue not a string": {"queues": [1]},
    "queue too long": {"queues": ["q" * 256]},
}


@pytest.mark.parametrize("fields", BAD_READY.values(), ids=BAD_READY.keys())
def test_ready_with_bad_fields_registers_nothing(peers, assert_serves, fields):
    peer, pool = peers(), peers()
    if fields is None:
        peer.command(P.READY)
    elif isinstance(fields, bytes):
        peer.command(P.READY, fields)
    else:
        info = {key: value for key, value in {**READY_FIELDS, **fields}.items() if value is not MISSING}
        peer.command(P.READY, P.encode(info))
    peer.expect_disconnect("")
    # not registered: its heartbeat is refused, and no pool process can join it
    peer.command(P.HEARTBEAT)
    peer.expect_disconnect("unknown peer")
    pool.command(P.JOIN, P.encode({"node": "raw-node", "index": 0, "capacity": 1, "held": []}))
    pool.expect_disconnect("unknown peer")
    assert_serves()


JOIN_FIELDS = {"node": "raw-node", "index": 0, "capacity": 1, "held": []}
BAD_JOIN = {
    "no body": None,
    "control frame not JSON": b"index=0",
    "index missing": {"index": MISSING},
    "index a string": {"index": "0"},
    "index a float": {"index": 0.5},
    "index negative": {"index": -1},
    "index true": {"index": True},
    "capacity missing": {"capacity": MISSING},
    "capacity zero": {"capacity": 0},
    "capacity negative": {"capacity": -2},
    "capacity a string": {"capacity": "1"},
    "held not a list": {"held": {"1": True}},
    "node unknown": {"node": "someone-else"},
    "node missing": {"node": MISSING},
}


@pytest.mark.parametrize("fields", BAD_JOIN.values(), ids=BAD_JOIN.keys())
def test_join_with_bad_fields_joins_nothing(peers, assert_serves, fields):
    supervisor, pool, client = peers(), peers(), peers()
    supervisor.register(node="raw-node", queues=["raw"])
    if fields is None:
        pool.command(P.JOIN)
    elif isinstance(fields, bytes):
        pool.command(P.JOIN, fields)
    else:
        info = {key: value for key, value in {**JOIN_FIELDS, **fields}.items() if value is not MISSING}
        pool.command(P.JOIN, P.encode(info))
    pool.expect_disconnect("")
    # not joined: a task for its node's queue is not delivered to it, and its RESULT is refused
    client.submit(add_task("not-for-you", queue="raw"))
    pool.command(P.RESULT, *success_result("not-for-you", 1, 5))
    pool.expect_disconnect("unknown peer")
    assert client.state("not-for-you") == states.PENDING
    assert_serves()


# -- the worker side, by hand ------------------------------------------------------------------
def test_worker_conversation_frame_by_frame(peers, raw_worker, assert_serves, broker):
    """READY/WELCOME, JOIN/WELCOME, TASK, RESULT/SETTLED and the client's ACK, STATE and RESULT."""
    supervisor, pool = raw_worker()
    client = peers()
    task_header, payload = add_task("conv-1", queue="raw", priority=3)
    assert client.submit((task_header, payload)) == {"req": 1, "ok": 1, "dup": []}
    token, delivered_header, delivered_payload = pool.take_task()
    assert delivered_header == task_header and delivered_payload == payload  # forwarded verbatim
    assert client.state("conv-1") == states.RECEIVED

    result = success_result("conv-1", token, 5)
    pool.command(P.RESULT, *result)
    assert pool.expect(P.SETTLED) == [str(token).encode()]
    assert client.expect(P.RESULT) == list(result)  # pushed to the submitter, unchanged
    info = client.states("conv-1")["conv-1"]
    assert info["state"] == states.SUCCESS and info["token"] == token

    client.command(P.WAIT, P.encode({"ids": ["conv-1", "never-seen"]}))
    replies = [client.recv(), client.recv()]
    assert [P.PROTOCOL, P.RESULT, *result] in replies
    assert [P.PROTOCOL, P.STATE, P.encode({"id": "never-seen", "state": states.UNKNOWN})] in replies

    assert client.request(P.FORGET, {"ids": ["conv-1"]}, P.ACK)["ok"] == 1
    assert client.state("conv-1") == states.UNKNOWN
    assert_serves()


def test_welcome_carries_the_brokers_heartbeat_and_instance(peers, assert_serves, broker):
    first, second = peers(), peers()
    welcome = first.register(node="a")
    assert welcome["heartbeat"] == broker.heartbeat
    assert second.register(node="b")["broker"] == welcome["broker"]  # one broker instance id
    assert len(welcome["broker"]) == 12
    assert_serves()


def test_submit_dedupes_and_answers_duplicates_with_the_result(peers, raw_worker, assert_serves):
    _, pool = raw_worker()
    client = peers()
    first = client.submit(add_task("d-1", queue="raw"), add_task("d-2", queue="raw", notify=False))
    assert first == {"req": 1, "ok": 2, "dup": []}
    again = client.submit(add_task("d-1", queue="raw"))
    assert again == {"req": 2, "ok": 0, "dup": ["d-1"]}
    token, _, _ = pool.take_task()
    pool.command(P.RESULT, *success_result("d-1", token, 5))
    pool.expect(P.SETTLED)
    assert P.decode(client.expect(P.RESULT)[0])["id"] == "d-1"
    late = peers()  # a resend after the result exists: the stored result and ACK (dup) at once
    late.command(P.SUBMIT, P.encode({"req": 9}), *add_task("d-1", queue="raw"))
    replies = [late.recv(), late.recv()]
    assert replies[0][1] == P.RESULT and P.decode(replies[0][2])["id"] == "d-1"
    assert P.decode(replies[1][2]) == {"req": 9, "ok": 0, "dup": ["d-1"]}
    assert_serves()


def test_capacity_is_credit_and_one_message_may_carry_several_deliveries(peers, raw_worker,
                                                                        assert_serves):
    _, pool = raw_worker(capacity=3)
    client = peers()
    client.submit(*[add_task(f"c-{i}", queue="raw", notify=False) for i in range(5)])
    delivered = []
    while len(delivered) < 3:
        settled, *body = pool.expect(P.TASK)
        assert settled == b"" and len(body) % 3 == 0
        delivered += [(int(body[i]), P.decode(body[i + 1])["id"]) for i in range(0, len(body), 3)]
    assert [task_id for _, task_id in delivered] == ["c-0", "c-1", "c-2"]  # submit order
    tokens = [token for token, _ in delivered]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    assert client.states("c-3", "c-4") == {"c-3": {"state": states.PENDING},
                                           "c-4": {"state": states.PENDING}}  # no credit left
    pool.command(P.RESULT, *success_result("c-0", tokens[0], 0))
    pool.expect(P.SETTLED)
    token, raw, _ = pool.take_task()  # one credit back: one more delivery
    assert P.decode(raw)["id"] == "c-3" and token > tokens[-1]
    assert_serves()


def test_result_with_a_token_that_is_not_the_lease_is_discarded(peers, raw_worker, assert_serves,
                                                                app):
    _, pool = raw_worker()
    client = peers()
    client.submit(add_task("lease-1", queue="raw"))
    token, _, _ = pool.take_task()
    for wrong in (token + 1000, token - 1, 0):
        pool.command(P.RESULT, *success_result("lease-1", wrong, "forged"))
        assert pool.expect(P.SETTLED) == [str(wrong).encode()]  # acknowledged, not stored
        assert client.state("lease-1") == states.RECEIVED
    # a result for a task this process was never given is discarded the same way
    pool.command(P.RESULT, *success_result("not-delivered", token, "forged"))
    pool.expect(P.SETTLED)
    assert client.state("not-delivered") == states.UNKNOWN
    pool.command(P.RESULT, *success_result("lease-1", token, "genuine"))
    pool.expect(P.SETTLED)
    assert embedq.AsyncResult("lease-1", app=app).get(timeout=10) == "genuine"
    assert_serves()


def test_result_of_a_delivery_taken_back_is_discarded(peers, raw_worker, assert_serves, app):
    """A process that re-joins without a delivery loses it; its late result for it is ignored."""
    _, pool = raw_worker()
    client = peers()
    client.submit(add_task("taken-back", queue="raw"))
    old_token, _, _ = pool.take_task()
    assert pool.join(index=0, held=[])["drop"] == []  # "I hold nothing"
    new_token, _, _ = pool.take_task()  # requeued and delivered again, under a new token
    assert new_token > old_token
    pool.command(P.RESULT, *success_result("taken-back", old_token, "stale"))
    pool.expect(P.SETTLED)
    assert client.state("taken-back") == states.RECEIVED
    # the same pool position re-joining on a new socket: the old socket is nobody now
    newcomer = peers()
    newcomer.join(index=0, held=[new_token])
    pool.command(P.RESULT, *success_result("taken-back", new_token, "from the old socket"))
    pool.expect_disconnect("unknown peer")
    newcomer.command(P.RESULT, *success_result("taken-back", new_token, "fresh"))
    newcomer.expect(P.SETTLED)
    assert embedq.AsyncResult("taken-back", app=app).get(timeout=10) == "fresh"
    assert_serves()


def test_held_deliveries_are_adopted_and_unknown_ones_dropped(peers, raw_worker, assert_serves, app):
    _, pool = raw_worker()
    client = peers()
    client.submit(add_task("kept", queue="raw"))
    token, _, _ = pool.take_task()
    assert pool.join(index=0, held=[token, 999_999])["drop"] == [999_999]  # not ours: drop it
    pool.command(P.RESULT, *success_result("kept", token, "adopted"))
    pool.expect(P.SETTLED)  # adopted: accepted under the old token, and no second TASK came first
    assert embedq.AsyncResult("kept", app=app).get(timeout=10) == "adopted"
    assert_serves()


def test_node_re_registering_keeps_what_its_processes_run(peers, raw_worker, assert_serves, app):
    """A node back on a new socket: leases of processes that re-join holding them are adopted."""
    supervisor, pool = raw_worker()
    client = peers()
    client.submit(add_task("survivor", queue="raw"))
    token, _, _ = pool.take_task()
    supervisor.heartbeating = False
    again = peers()
    again.register(node="raw-node", queues=["raw"], running=[token])  # new socket, same node id
    again.running = [token]
    pool.command(P.RESULT, *success_result("survivor", token, "early"))
    pool.expect_disconnect("unknown peer")  # its slot went with the old node entry: re-join first
    rejoined = peers()
    assert rejoined.join(index=0, held=[token])["drop"] == []
    rejoined.command(P.RESULT, *success_result("survivor", token, "kept"))
    rejoined.expect(P.SETTLED)
    assert embedq.AsyncResult("survivor", app=app).get(timeout=10) == "kept"
    assert_serves()


def test_delivery_lost_in_transit_is_redelivered(peers, raw_worker, assert_serves):
    _, pool = raw_worker()
    client = peers()
    client.submit(add_task("again", queue="raw"))
    second, _, _ = pool.take_task()
    # an idle heartbeat that has seen this token but does not hold it: lost in transit, requeued
    pool.command(P.HEARTBEAT, P.encode({"held": [], "seen": second}))
    third, _, _ = pool.take_task()
    assert third > second
    # one that still holds it, or has not seen it yet, changes nothing
    pool.command(P.HEARTBEAT, P.encode({"held": [third], "seen": third}))
    pool.command(P.HEARTBEAT, P.encode({"held": [], "seen": third - 1}))
    assert client.state("again") == states.RECEIVED
    pool.command(P.RESULT, *success_result("again", third, 5))
    assert pool.expect(P.SETTLED) == [str(third).encode()]
    assert not pool.stashed  # no TASK came with it: the task was not delivered a fourth time
    assert client.state("again") == states.SUCCESS
    assert_serves()


def test_lost_pool_process_reported_by_its_node(peers, raw_worker, assert_serves):
    supervisor, pool = raw_worker()
    client, other = peers(), peers()
    client.submit(add_task("orphaned", queue="raw"))
    token, _, _ = pool.take_task()
    assert other.join(index=1)["drop"] == []  # a second process of the same node, idle
    supervisor.command(P.LOST, P.encode({"index": 0, "running": token, "reason": "killed"}))
    new_token, raw, _ = other.take_task()  # redelivered to the other process at once
    assert P.decode(raw)["id"] == "orphaned" and new_token > token
    pool.command(P.RESULT, *success_result("orphaned", token, "ghost"))
    pool.expect_disconnect("unknown peer")  # the dead process's socket is nobody now
    supervisor.command(P.LOST, P.encode({"index": 7}))  # an index that never joined: harmless
    supervisor.command(P.STATUS, P.encode({"req": 1, "ids": ["orphaned"]}))
    assert P.decode(supervisor.expect(P.STATE)[0])["states"]["orphaned"]["state"] == states.RECEIVED
    assert_serves()


def test_malformed_worker_messages_from_registered_peers(peers, raw_worker, assert_serves):
    supervisor, pool = raw_worker()
    client = peers()
    client.submit(add_task("w-1", queue="raw"))
    token, _, _ = pool.take_task()
    for peer, frames, reason in [
        (supervisor, [P.PROTOCOL, b"FROBNICATE"], "unknown command"),
        (supervisor, [P.PROTOCOL, P.HEARTBEAT, b"\xff"], "not JSON"),
        (supervisor, [P.PROTOCOL, P.HEARTBEAT, b"[]"], "JSON object"),
        (supervisor, [P.PROTOCOL, P.LOST, b"index 0"], "not JSON"),
        (supervisor, [P.PROTOCOL, P.READY, P.encode({"node": "raw-node", "queues": []})], "READY needs"),
        (supervisor, [P.PROTOCOL, P.RESULT, *success_result("w-1", token, 1)], "unknown peer"),
        (pool, [P.PROTOCOL, b"FROBNICATE"], "unknown command"),
        (pool, [P.PROTOCOL, P.LOST, b'{"index":0}'], "unknown peer"),  # only nodes report LOST
        (pool, [P.PROTOCOL, P.RESULT], "groups of 2"),
        (pool, [P.PROTOCOL, P.RESULT, success_result("w-1", token, 1)[0]], "groups of 2"),
        (pool, [P.PROTOCOL, P.RESULT, b"not json", b""], "not JSON"),
        (pool, [P.PROTOCOL, P.RESULT, P.encode({"id": "w-1", "token": str(token), "state": "SUCCESS"}),
                b""], "token must be an integer"),
        (pool, [P.PROTOCOL, P.RESULT, P.encode({"id": "w-1", "token": True, "state": "SUCCESS"}), b""],
         "token must be an integer"),
        (pool, [P.PROTOCOL, P.RESULT, P.encode({"id": "w-1", "token": token}), b""],
         "result state must be RETRY or one of"),
        (pool, [P.PROTOCOL, P.RESULT, P.encode({"token": token, "state": "SUCCESS"}), b""], "task id"),
        (pool, [P.PROTOCOL, P.HEARTBEAT, b"{"], "not JSON"),
        (pool, [P.PROTOCOL, P.JOIN, b'{"node":"raw-node","index":0,"capacity":0,"held":[]}'],
         "JOIN needs"),
    ]:
        peer.send(*frames)
        peer.expect_disconnect(reason)
    assert client.state("w-1") == states.RECEIVED  # none of it settled or released the task
    # heartbeat fields of the wrong type are ignored (no DISCONNECT): the next reply is the STATE
    pool.command(P.HEARTBEAT, P.encode({"held": "all", "seen": "everything"}))
    supervisor.command(P.HEARTBEAT, P.encode({"running": "all"}))
    for peer in (pool, supervisor):
        peer.command(P.STATUS, P.encode({"req": 1, "ids": ["w-1"]}))
        assert P.decode(peer.expect(P.STATE)[0])["states"]["w-1"]["state"] == states.RECEIVED
    pool.command(P.RESULT, *success_result("w-1", token, 5))
    pool.expect(P.SETTLED)
    assert client.state("w-1") == states.SUCCESS
    assert_serves()


def test_disconnect_from_an_unregistered_peer_is_ignored(peers, assert_serves):
    peer = peers()
    peer.command(P.DISCONNECT, P.encode({"reason": "bye"}))
    peer.command(P.DISCONNECT)
    peer.command(P.STATUS, P.encode({"req": 1, "ids": []}))
    assert peer.expect(P.STATE) == [P.encode({"req": 1, "states": {}})]  # no DISCONNECT before it
    assert_serves()


def test_disconnect_from_a_node_hands_its_tasks_back(peers, raw_worker, assert_serves):
    supervisor, pool = raw_worker(node="leaving")
    client = peers()
    client.submit(add_task("handed-back", queue="raw"))
    pool.take_task()
    supervisor.command(P.DISCONNECT, P.encode({"reason": "shutdown"}))
    supervisor.heartbeating = False
    wait_for_state(client, "handed-back", states.PENDING)
    pool.command(P.HEARTBEAT, P.encode({"held": [], "seen": 0}))
    pool.expect_disconnect("unknown peer")  # its processes left with it
    _, taker = raw_worker(node="taker")
    _, delivered, _ = taker.take_task()
    assert P.decode(delivered)["id"] == "handed-back"
    assert_serves()


def test_disconnect_from_a_pool_process_hands_its_tasks_back(peers, raw_worker, assert_serves):
    _, pool = raw_worker(capacity=2)
    client = peers()
    client.submit(add_task("p-1", queue="raw"), add_task("p-2", queue="raw"))
    first = [pool.take_task()[0]]
    while len(first) < 2:
        first.append(pool.take_task()[0])
    pool.command(P.DISCONNECT)
    wait_for_state(client, "p-1", states.PENDING)
    assert client.state("p-2") == states.PENDING
    successor = peers()
    successor.join(index=0, capacity=2)
    tokens = sorted([successor.take_task()[0], successor.take_task()[0]])
    assert tokens[0] > max(first)
    assert_serves()


def test_silent_node_is_evicted_and_its_processes_late_result_refused(peers, raw_worker, app,
                                                                     assert_serves, start_worker):
    supervisor, pool = raw_worker(node="sleepy", queues=["q-evict"])
    client = peers()
    client.submit(add_task("evicted", queue="q-evict"))
    token, _, _ = pool.take_task()
    supervisor.heartbeating = False  # silence: evicted after heartbeat * liveness, task requeued
    start_worker(concurrency=1, queues=["q-evict"])
    assert embedq.AsyncResult("evicted", app=app).get(timeout=30) == 5
    pool.command(P.RESULT, *success_result("evicted", token, "late"))
    pool.expect_disconnect("unknown peer")  # the broker forgot the node and its processes
    supervisor.command(P.HEARTBEAT)
    supervisor.expect_disconnect("unknown peer")
    assert embedq.AsyncResult("evicted", app=app).get(timeout=10) == 5
    assert_serves()


def test_pool_processes_do_not_keep_their_node_alive(peers, raw_worker, assert_serves):
    """Liveness is the supervisor's: a chatty pool process of a silent node is evicted with it."""
    supervisor, pool = raw_worker(node="mute")
    supervisor.heartbeating = False
    deadline = time.monotonic() + REPLY_TIMEOUT
    while True:
        pool.command(P.HEARTBEAT, P.encode({"held": [], "seen": 0}))  # no reply while known
        frames = pool.try_recv(timeout=0.1)
        if frames is not None:
            assert frames[1] == P.DISCONNECT and b"unknown peer" in frames[2], frames
            break
        assert time.monotonic() < deadline, "the node was never evicted"
    assert_serves()


def test_broker_heartbeats_an_idle_node(peers, assert_serves, broker):
    node = peers()
    node.register(queues=["raw"])
    node.heartbeating = False
    started = time.monotonic()
    node.expect(P.HEARTBEAT, skip=())  # within about one heartbeat interval of silence
    assert time.monotonic() - started < broker.heartbeat * 5
    node.command(P.HEARTBEAT)
    assert_serves()
# -- payloads are opaque -----------------------------------------------------------------------
GARBAGE = b"\x00\xffnot a pickle\x13\x37" + bytes(range(256))


def test_garbage_payload_is_stored_and_fails_in_the_worker(peers, assert_serves, app, start_worker):
    client = peers()
    ack = client.submit((header("garbage", task="testapp.add", queue="q-garbage"), GARBAGE))
    assert ack == {"req": 1, "ok": 1, "dup": []}  # the broker never unpickles: accepted
    assert client.state("garbage") == states.PENDING
    start_worker(concurrency=1, queues=["q-garbage"])
    pushed = client.expect(P.RESULT, timeout=30)
    info = P.decode(pushed[0])
    assert info["id"] == "garbage" and info["state"] == states.FAILURE
    assert "Unpickling" in info["exc_type"]
    result = embedq.AsyncResult("garbage", app=app)
    with pytest.raises(Exception) as caught:
        result.get(timeout=10)
    assert "pickle" in type(caught.value).__module__ or "Unpickling" in type(caught.value).__name__
    assert result.state == states.FAILURE
    assert_serves()


def test_payload_is_forwarded_byte_for_byte(peers, raw_worker, assert_serves):
    payloads = [GARBAGE, b"", b"\x00" * 100_000]
    _, pool = raw_worker(capacity=len(payloads))  # credit for all of them
    client = peers()
    for i, payload in enumerate(payloads):
        client.submit((header(f"opaque-{i}", queue="raw", notify=False), payload))
        _, delivered_header, delivered = pool.take_task()
        assert P.decode(delivered_header)["id"] == f"opaque-{i}"
        assert delivered == payload
    assert_serves()


# -- raw TCP garbage ---------------------------------------------------------------------------
def _read_all(connections, deadline):
    """Read every connection until it is closed by the broker or the deadline passes."""
    received = {conn: b"" for conn in connections}
    closed = set()
    selector = selectors.DefaultSelector()
    for conn in connections:
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ)
    try:
        while len(closed) < len(connections) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                except BlockingIOError:
                    continue
                if data:
                    received[conn] += data
                else:
                    closed.add(conn)
                    selector.unregister(conn)
    finally:
        selector.close()
    return received, closed


def _send_quietly(conn, data):
    try:
        conn.sendall(data)
    except (ConnectionResetError, BrokenPipeError):
        pass  # the broker already hung up: fine


def test_raw_tcp_garbage_produces_no_messages(broker, assert_serves):
    url = urlparse(broker.url)
    rng = random.Random(20240601)
    # ZMTP/1.0 framing of a real message [EQ1, WAIT]: a ROUTER without ZAP_DOMAIN would accept
    # it as a message, and the broker would answer DISCONNECT on this very connection
    zmtp10 = b"\x01\x00" + b"\x04\x01EQ1" + b"\x05\x00WAIT"
    blobs = [zmtp10] * 5 + [rng.randbytes(rng.randint(1, 4096)) for _ in range(100)]
    blobs += [b"\xff" + rng.randbytes(rng.randint(9, 512)) for _ in range(20)]  # ZMTP/2+ lookalikes
    connections = []
    try:
        for blob in blobs:
            conn = socket.create_connection((url.hostname, url.port), timeout=REPLY_TIMEOUT)
            connections.append(conn)
            _send_quietly(conn, blob)
        received, closed = _read_all(connections, time.monotonic() + 3.0)
        for data in received.values():
            assert b"DISCONNECT" not in data and P.PROTOCOL not in data
        assert set(connections[:5]) <= closed  # ZMTP/1.0 peers are refused outright
        assert broker.process.poll() is None
    finally:
        for conn in connections:
            conn.close()
    assert_serves()


def test_oversized_frame_counts_and_sizes(peers, assert_serves):
    """Many frames, a long command and a 1 MiB control frame: refused or served, never fatal."""
    peer = peers()
    peer.send(P.PROTOCOL, P.STATUS, P.encode({"req": 1, "ids": ["x"] * 10_000}))
    assert len(P.decode(peer.expect(P.STATE)[0])["states"]) == 1
    peer.send(P.PROTOCOL, b"C" * 100_000)
    assert len(peer.expect_disconnect("unknown command")) < 300  # the reason is truncated
    peer.send(P.PROTOCOL, P.STATUS, b" " * (1 << 20))
    peer.expect_disconnect("not JSON")
    peer.send(*submit_frames(*[header(f"many-{i}") for i in range(500)], payload=b""))
    assert P.decode(peer.expect(P.ACK)[0])["ok"] == 500
    assert_serves()


# -- hostile input (each of these once killed the broker process) ------------------------------
HOSTILE = {
    "lone surrogate in a task id": (
        submit_frames(raw_header('{"id":"\\ud800","task":"testapp.add","queue":"celery"}')), "task id"),
    "lone surrogate in a queue name": (
        submit_frames(raw_header('{"id":"s-q","task":"testapp.add","queue":"\\udfff"}')), "queue"),
    "lone surrogate in a STATUS id": (
        [P.PROTOCOL, P.STATUS, raw_header('{"req":1,"ids":["\\ud800"]}')], "task id"),
    "lone surrogate in a WAIT id": ([P.PROTOCOL, P.WAIT, raw_header('{"ids":["\\ud800"]}')], "task id"),
    "255 three-byte characters as task id (765 bytes)": (
        submit_frames(P.encode({"id": "\u20ac" * 255, "task": "testapp.add", "queue": "celery"})),
        "task id"),
    "255 three-byte characters as queue (765 bytes)": (
        submit_frames(P.encode({"id": "q3", "task": "testapp.add", "queue": "\u20ac" * 255})), "queue"),
    "256 bytes of two-byte characters as task id": (
        submit_frames(P.encode({"id": "\u00e9" * 128, "task": "testapp.add", "queue": "celery"})),
        "task id"),
    "eta Infinity": (
        submit_frames(raw_header('{"id":"inf","task":"testapp.add","queue":"celery","eta":Infinity}')),
        "eta"),
    "eta -Infinity": (
        submit_frames(raw_header('{"id":"inf","task":"testapp.add","queue":"celery","eta":-Infinity}')),
        "eta"),
    "eta NaN": (
        submit_frames(raw_header('{"id":"nan","task":"testapp.add","queue":"celery","eta":NaN}')), "eta"),
    "eta beyond 2**64 microseconds": (submit_frames(header("far", eta=1e20)), "eta"),
    "eta before the epoch": (submit_frames(header("early", eta=-5)), "eta"),
    "expires NaN": (
        submit_frames(raw_header('{"id":"x","task":"testapp.add","queue":"celery","expires":NaN}')),
        "expires"),
    "deeply nested JSON control frame": ([P.PROTOCOL, P.STATUS, b"[" * 100_000], "not JSON"),
    "deeply nested JSON task header": (submit_frames(b'{"id":' * 50_000), "not JSON"),
    "JOIN with a list as node id": (
        [P.PROTOCOL, P.JOIN, b'{"node":["x"],"index":0,"capacity":1,"held":[]}'], "node id"),
    "JOIN with a lone surrogate node id": (
        [P.PROTOCOL, P.JOIN, raw_header('{"node":"\\ud800","index":0,"capacity":1,"held":[]}')],
        "node id"),
    "READY with a lone surrogate node id": (
        [P.PROTOCOL, P.READY, raw_header('{"node":"\\ud800","queues":["raw"]}')], "node id"),
}


@pytest.mark.parametrize("frames, reason", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_is_refused(peers, assert_serves, frames, reason):
    peer = peers()
    peer.send(*frames)
    peer.expect_disconnect(reason)
    assert_serves()


def test_unhashable_token_lists_are_ignored(raw_worker, peers, assert_serves):
    supervisor, pool = raw_worker()
    client = peers()
    client.submit(add_task("h-1", queue="raw"))
    token, _, _ = pool.take_task()
    # non-integers in held/running are ignored: no DISCONNECT, and the lease is untouched
    pool.command(P.HEARTBEAT, P.encode({"held": [[token], {"a": 1}, str(token), True], "seen": 1}))
    supervisor.command(P.HEARTBEAT, P.encode({"running": [[1], {"a": 1}, None]}))
    for peer in (pool, supervisor):
        peer.command(P.STATUS, P.encode({"req": 1, "ids": ["h-1"]}))
        assert P.decode(peer.expect(P.STATE)[0])["states"]["h-1"]["state"] == states.RECEIVED
    pool.command(P.RESULT, *success_result("h-1", token, 5))
    assert pool.expect(P.SETTLED) == [str(token).encode()]
    assert_serves()


def test_lost_with_a_non_integer_index_is_refused(raw_worker, peers, assert_serves):
    supervisor, pool = raw_worker()
    client = peers()
    client.submit(add_task("l-1", queue="raw"))
    token, _, _ = pool.take_task()
    for index in ([0], "0", None, True, 0.0):
        supervisor.command(P.LOST, P.encode({"index": index, "reason": "?"}))
        supervisor.expect_disconnect("index must be an integer")
    assert client.state("l-1") == states.RECEIVED  # pool process 0 was not declared dead
    pool.command(P.RESULT, *success_result("l-1", token, 5))
    pool.expect(P.SETTLED)
    assert_serves()


def test_refused_nan_eta_does_not_stall_the_scheduler(peers, assert_serves, app):
    """A NaN ETA once became the broker's next due time and stopped all scheduling."""
    import testapp

    peer = peers()
    peer.send(*submit_frames(raw_header('{"id":"nan","task":"testapp.noop","queue":"q-nan","eta":NaN}')))
    peer.expect_disconnect("eta")
    result = testapp.add.apply_async((1, 2), countdown=0.2)
    assert result.get(timeout=10) == 3
    assert_serves()


def test_socket_reregistering_under_another_node_id_does_not_strand_tasks(raw_worker, peers, app,
                                                                         assert_serves,
                                                                         start_worker):
    """READY again on one socket under a new node id: the old node left, its tasks go elsewhere."""
    supervisor, pool = raw_worker(node="first-name", queues=["q-strand"])
    client = peers()
    client.submit(add_task("stranded", queue="q-strand"))
    pool.take_task()
    supervisor.register(node="second-name", queues=["elsewhere"])
    wait_for_state(client, "stranded", states.PENDING)  # handed back at once
    pool.command(P.RESULT, *success_result("stranded", 1, "ghost"))
    pool.expect_disconnect("unknown peer")  # its processes went with the old name
    start_worker(concurrency=1, queues=["q-strand"])
    assert embedq.AsyncResult("stranded", app=app).get(timeout=30) == 5
    assert_serves()


# -- maximum message size ------------------------------------------------------------------------
SMALL_LIMIT = 4096


@pytest.fixture
def small_broker(tmp_path):
    """A broker with ``--max-message-size 4096`` (the default, 64 MiB, is too big to test cheaply)."""
    from conftest import TEST_HEARTBEAT

    from embedq.embedded import start_broker_process

    class Handle:
        heartbeat = TEST_HEARTBEAT

    handle = Handle()
    handle.process, handle.url = start_broker_process(
        "tcp://127.0.0.1:0", str(tmp_path / "small"), durability="process",
        extra_args=["--heartbeat", str(TEST_HEARTBEAT), "--max-message-size", str(SMALL_LIMIT),
                    "--loglevel", "ERROR"])
    handle.pid = handle.process.pid
    yield handle
    handle.process.kill()
    handle.process.wait(10)


def test_oversized_frame_drops_the_connection(context, small_broker):
    peer = Peer(context, small_broker, [])
    monitor = peer.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        assert peer.state("before") == states.UNKNOWN
        peer.send(*submit_frames(header("too-big"), payload=b"x" * (SMALL_LIMIT + 1)))
        # ZeroMQ drops the connection before the broker sees anything (no DISCONNECT message)
        assert monitor.poll(REPLY_TIMEOUT * 1000), "the broker did not drop the connection"
        # the DEALER reconnects by itself; the broker is alive and nothing was stored
        assert peer.state("too-big") == states.UNKNOWN
        assert small_broker.process.poll() is None
    finally:
        peer.socket.disable_monitor()
        monitor.close(linger=0)
        peer.close()


def test_message_over_the_limit_in_several_frames_is_refused(context, small_broker):
    peer = Peer(context, small_broker, [])
    try:
        # libzmq's MAXMSGSIZE limits each frame; the broker checks the total itself
        half = b"x" * (SMALL_LIMIT // 2 + 100)
        peer.send(*submit_frames(header("part-1"), header("part-2"), payload=half))
        peer.expect_disconnect(f"message larger than {SMALL_LIMIT} bytes")
        assert peer.states("part-1", "part-2") == {"part-1": {"state": states.UNKNOWN},
                                                   "part-2": {"state": states.UNKNOWN}}
    finally:
        peer.close()


def test_task_ids_are_time_ordered_uuid7_strings():
    import uuid

    before = time.time_ns() // 1_000_000
    ids = [P.new_task_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 2000
    for task_id in ids[:200]:
        parsed = uuid.UUID(task_id)
        assert str(parsed) == task_id
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after  # the leading 48 bits: Unix milliseconds
    # ids made a tick apart sort in creation order (the store's B-tree locality rests on it)
    spaced = []
    for _ in range(20):
        spaced.append(P.new_task_id())
        tick = time.perf_counter()
        while time.perf_counter() - tick < 2e-6:
            pass
    assert spaced == sorted(spaced)


def test_encode_writes_what_the_json_encoder_writes_and_names_a_cycle():
    import json

    full = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    for value in ({"id": "a", "token": 12, "runtime": 1.2e-05, "date_done": 1764130000.123456},
                  {"meta": {"nested": [1, None, True, False]}, "text": "é\n\"q\"", "nan": float("nan")},
                  {1: "int key", "inf": float("inf")}, []):
        assert P.encode(value) == full.encode(value).encode()
    cyclic = {"meta": {}}
    cyclic["meta"]["back"] = cyclic
    with pytest.raises(ValueError, match="Circular reference"):
        P.encode(cyclic)
    with pytest.raises(TypeError, match="not JSON serializable"):
        P.encode({"x": object()})


def test_the_plain_ack_is_read_without_json_and_any_other_as_json():
    assert P.decode_ack(b'{"req":12,"ok":3,"dup":[]}') == {"req": 12, "ok": 3, "dup": []}
    assert P.decode_ack(b'{"req":1,"ok":0,"dup":["a"]}') == {"req": 1, "ok": 0, "dup": ["a"]}
    refused = b'{"req":2,"ok":0,"dup":[],"error":"StorageFull","message":"full"}'
    assert P.decode_ack(refused)["error"] == "StorageFull"
    with pytest.raises(embedq.errors.ProtocolError):
        P.decode_ack(b'{"req":')


def test_decode_accepts_what_json_accepts_and_nothing_else():
    """``decode`` takes the C scanner's shortcut only for a bare object; anything else gets the
    full decoder's answer."""
    assert P.decode(b'{"a":[1,{"b":null}]}') == {"a": [1, {"b": None}]}
    assert P.decode(b' \n{"a": 1}\t ') == {"a": 1}
    assert P.decode('{"é":"ü"}'.encode()) == {"é": "ü"}
    for bad, reason in [(b'{"a":1}x', "not JSON"), (b'{"a":1}{}', "not JSON"), (b"", "not JSON"),
                        (b'{"a":', "not JSON"), (b"\xff{}", "not JSON"), (b"[1]", "JSON object"),
                        (b'"text"', "JSON object"), (b"[" * 100_000, "not JSON")]:
        with pytest.raises(embedq.errors.ProtocolError, match=reason):
            P.decode(bad)
