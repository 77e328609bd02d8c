"""The wire protocol against a real broker process, spoken by hand over raw DEALER sockets.

The rule under test (docs/protocol.md): any message the broker cannot parse is dropped, the peer
is sent DISCONNECT, and the broker carries on. Every test ends by checking that the broker process
is alive and still runs a normal round trip (a task submitted through the App, run by a real
worker node, result returned). Raw peers that register as worker nodes keep heartbeating while
they wait, so the broker does not evict them in the middle of a test.
"""

import json
import pickle
import random
import selectors
import socket
import time
from urllib.parse import urlparse

import psutil
import pytest
import zmq

import embedq
from embedq import protocol as P
from embedq import states

pytestmark = pytest.mark.timeout(60)

#: How long a raw peer waits for an answer it expects (the broker replies within milliseconds).
REPLY_TIMEOUT = 5.0
#: A registered raw node heartbeats this often (the test broker evicts after 0.2 s * 3 of silence).
RAW_HEARTBEAT = 0.1
MISSING = object()


# -- raw peers ---------------------------------------------------------------------------------
class BrokerDied(AssertionError):
    pass


class Peer:
    """One raw DEALER socket on the broker's ROUTER."""

    def __init__(self, context, broker, identity=None):
        self.broker = broker
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.connect(broker.url)
        #: heartbeat while waiting (set once registered as a worker node)
        self.heartbeating = False
        self.last_beat = 0.0
        self.requests = 0
        #: messages received while waiting for another one (e.g. a TASK ahead of the WELCOME)
        self.stashed = []

    def close(self):
        self.socket.close(linger=0)

    def send(self, *frames):
        self.socket.send_multipart(list(frames))

    def command(self, command, *body):
        self.send(P.PROTOCOL, command, *body)

    def _beat(self):
        if self.heartbeating and time.monotonic() - self.last_beat >= RAW_HEARTBEAT:
            self.command(P.HEARTBEAT)
            self.last_beat = time.monotonic()

    def recv(self, timeout=REPLY_TIMEOUT, skip=(P.HEARTBEAT,)):
        """The next message (broker HEARTBEATs skipped); fails fast if the broker process died."""
        if self.stashed:
            return self.stashed.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            self._beat()
            if self.socket.poll(20):
                frames = self.socket.recv_multipart()
                if len(frames) >= 2 and frames[1] in skip:
                    continue
                return frames
            code = self.broker.process.poll()
            if code is not None:
                raise BrokerDied(f"the broker process died (exit code {code})")
            if time.monotonic() > deadline:
                raise AssertionError(f"no message from the broker within {timeout}s")

    def expect(self, command, timeout=REPLY_TIMEOUT, skip=(P.HEARTBEAT,)):
        frames = self.recv(timeout, skip)
        assert frames[:2] == [P.PROTOCOL, command], f"expected {command!r}, got {frames!r}"
        return frames[2:]

    def expect_disconnect(self, reason):
        body = self.expect(P.DISCONNECT)
        assert len(body) == 1
        text = P.decode(body[0])["reason"]
        assert reason in text, f"DISCONNECT reason {text!r} lacks {reason!r}"
        return text

    def keep_alive(self, seconds):
        """Stay registered for a while, answering nothing (bounded by ``seconds``)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._beat()
            self.socket.poll(20)

    # -- client requests ---------------------------------------------------------------------
    def request(self, command, body, reply_command):
        self.requests += 1
        req = self.requests
        self.command(command, P.encode({"req": req, **body}))
        while True:  # pushed RESULT/STATE messages may arrive in between: skip them
            frames = self.recv(skip=(P.HEARTBEAT, P.RESULT, P.TASK))
            if frames[1] == reply_command:
                reply = P.decode(frames[2])
                if reply.get("req") == req:
                    return reply
            elif frames[1] not in (P.STATE, P.SETTLED):
                raise AssertionError(f"unexpected reply {frames!r}")

    def submit(self, *tasks):
        """tasks: (header bytes, payload bytes) pairs -> the ACK."""
        self.requests += 1
        req = self.requests
        self.command(P.SUBMIT, P.encode({"req": req}), *[frame for task in tasks for frame in task])
        reply = P.decode(self.expect(P.ACK)[0])
        assert reply["req"] == req
        return reply

    def states(self, *task_ids):
        return self.request(P.STATUS, {"ids": list(task_ids)}, P.STATE)["states"]

    def state(self, task_id):
        return self.states(task_id)[task_id]["state"]

    # -- worker node ---------------------------------------------------------------------------
    def register(self, node="raw-node", queues=("raw",), slots=1, held=(), **extra):
        self.command(P.READY, P.encode({"node": node, "slots": slots, "queues": list(queues),
                                        "held": list(held), **extra}))
        # TASK deliveries of the same broker iteration are flushed ahead of the WELCOME
        early = []
        while True:
            frames = self.recv()
            if frames[1] != P.TASK:
                break
            early.append(frames)
        assert frames[:2] == [P.PROTOCOL, P.WELCOME], frames
        self.stashed = early + self.stashed
        self.heartbeating = True
        return P.decode(frames[2])

    def take_task(self):
        """The next TASK delivery: (token, header bytes, payload bytes)."""
        body = self.expect(P.TASK)
        assert len(body) == 3, "one delivery per TASK expected here"
        return int(body[0]), body[1], body[2]


def header(task_id="bad-task", task="testapp.add", queue="celery", **fields):
    obj = {"id": task_id, "task": task, "queue": queue, **fields}
    return P.encode({key: value for key, value in obj.items() if value is not MISSING})


def raw_header(text):
    return text.encode()


ARGS_2_3 = pickle.dumps(((2, 3), {}))


def add_task(task_id, queue="celery", **fields):
    """A well-formed testapp.add(2, 3) message."""
    return header(task_id, queue=queue, codec="pickle", **fields), ARGS_2_3


def success_result(task_id, token, value):
    return P.encode({"id": task_id, "token": token, "state": states.SUCCESS, "codec": "pickle",
                     "task": "testapp.add"}), pickle.dumps(value)


def submit_frames(*headers, payload=b"payload"):
    frames = [P.PROTOCOL, P.SUBMIT, P.encode({"req": 1})]
    for item in headers:
        frames += [item, payload]
    return frames


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def peers(context, broker):
    made = []

    def make(identity=None):
        peer = Peer(context, broker, identity)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def worker(start_worker):
    """A real worker node, started at once so it is ready by the time the test needs it."""
    return start_worker(concurrency=1)


@pytest.fixture
def assert_serves(broker, app, peers, worker):
    """Check the broker survived: alive, answering, and running a real round trip."""

    def check():
        assert broker.process.poll() is None, "broker process exited"
        probe = peers()
        assert probe.state("never-seen") == states.UNKNOWN
        import testapp

        assert testapp.add.delay(20, 22).get(timeout=30) == 42
        assert broker.process.poll() is None and psutil.pid_exists(broker.pid)

    return check


# -- malformed messages: DISCONNECT, nothing stored, broker carries on -------------------------
GOOD = header("good-task")

MALFORMED = {
    # framing and commands
    "no protocol frame": ([P.SUBMIT, P.encode({"req": 1}), GOOD, b"p"], "protocol frame"),
    "wrong protocol version": ([b"EQ2", P.STATUS, P.encode({"req": 1, "ids": []})], "protocol frame"),
    "protocol frame only": ([P.PROTOCOL], "protocol frame"),
    "a single empty frame": ([b""], "protocol frame"),
    "unknown command": ([P.PROTOCOL, b"FROBNICATE", b"{}"], "unknown worker: send READY"),
    "command in lower case": ([P.PROTOCOL, b"submit", P.encode({"req": 1}), GOOD, b"p"],
                              "unknown worker"),
    "broker-only command sent to the broker": ([P.PROTOCOL, P.WELCOME, b"{}"], "unknown worker"),
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
    # worker commands from a peer that never sent READY
    "HEARTBEAT from an unregistered peer": (
        [P.PROTOCOL, P.HEARTBEAT, P.encode({"held": [], "seen": 0})], "unknown worker"),
    "RESULT from an unregistered peer": (
        [P.PROTOCOL, P.RESULT, *success_result("good-task", 1, 5)], "unknown worker"),
    "SETTLED from a peer": ([P.PROTOCOL, P.SETTLED, b"1"], "unknown worker"),
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


READY_FIELDS = {"node": "raw-node", "slots": 1, "queues": ["raw"], "held": []}
BAD_READY = {
    "no body": None,
    "node missing": {"node": MISSING},
    "node not a string": {"node": 42},
    "node empty": {"node": ""},
    "node too long": {"node": "n" * 256},
    "slots zero": {"slots": 0},
    "slots negative": {"slots": -1},
    "slots a string": {"slots": "2"},
    "slots a float": {"slots": 1.5},
    "slots missing": {"slots": MISSING},
    "slots above capacity": {"slots": 4, "capacity": 2},
    "capacity a string": {"capacity": "4"},
    "queues missing": {"queues": MISSING},
    "queues a string": {"queues": "raw"},
    "queue empty": {"queues": ["raw", ""]},
    "queue not a string": {"queues": [1]},
    "queue too long": {"queues": ["q" * 256]},
    "held not a list": {"held": {"1": True}},
}


@pytest.mark.parametrize("fields", BAD_READY.values(), ids=BAD_READY.keys())
def test_ready_with_bad_fields_registers_nothing(peers, assert_serves, fields):
    peer = peers()
    if fields is None:
        peer.command(P.READY)
    else:
        info = {key: value for key, value in {**READY_FIELDS, **fields}.items() if value is not MISSING}
        peer.command(P.READY, P.encode(info))
    peer.expect_disconnect("")
    # not registered: a heartbeat now is refused, and no task is delivered to this socket
    peer.command(P.HEARTBEAT)
    peer.expect_disconnect("unknown worker")
    assert_serves()


def test_ready_control_frame_not_json(peers, assert_serves):
    peer = peers()
    peer.command(P.READY, b"node=raw")
    peer.expect_disconnect("not JSON")
    assert_serves()


# -- a registered raw worker node --------------------------------------------------------------
def test_worker_conversation_frame_by_frame(peers, assert_serves, broker):
    """READY/WELCOME, TASK, RESULT/SETTLED and the client's ACK, STATE and RESULT, by hand."""
    node, client = peers(), peers()
    welcome = node.register(node="raw-1", queues=["raw"], slots=1)
    assert set(welcome) == {"broker", "heartbeat", "drop"}
    assert welcome["heartbeat"] == broker.heartbeat and welcome["drop"] == []

    task_header, payload = add_task("conv-1", queue="raw", priority=3)
    assert client.submit((task_header, payload)) == {"req": 1, "ok": 1, "dup": []}
    token, delivered_header, delivered_payload = node.take_task()
    assert delivered_header == task_header and delivered_payload == payload  # forwarded verbatim
    assert client.state("conv-1") == states.RECEIVED

    result = success_result("conv-1", token, 5)
    node.command(P.RESULT, *result)
    assert node.expect(P.SETTLED) == [str(token).encode()]
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


def test_submit_dedupes_and_answers_duplicates_with_the_result(peers, assert_serves):
    node, client = peers(), peers()
    node.register(queues=["raw"])
    first = client.submit(add_task("d-1", queue="raw"), add_task("d-2", queue="raw", notify=False))
    assert first == {"req": 1, "ok": 2, "dup": []}
    again = client.submit(add_task("d-1", queue="raw"))
    assert again == {"req": 2, "ok": 0, "dup": ["d-1"]}
    token, _, _ = node.take_task()
    node.command(P.RESULT, *success_result("d-1", token, 5))
    node.expect(P.SETTLED)
    assert P.decode(client.expect(P.RESULT)[0])["id"] == "d-1"
    late = peers()  # a resend after the result exists: ACK (dup) and the stored result at once
    late.command(P.SUBMIT, P.encode({"req": 9}), *add_task("d-1", queue="raw"))
    replies = [late.recv(), late.recv()]
    assert replies[0][1] == P.RESULT and P.decode(replies[0][2])["id"] == "d-1"
    assert P.decode(replies[1][2]) == {"req": 9, "ok": 0, "dup": ["d-1"]}
    assert_serves()


def test_result_with_a_token_that_is_not_the_lease_is_discarded(peers, assert_serves, app):
    node, client = peers(), peers()
    node.register(queues=["raw"])
    client.submit(add_task("lease-1", queue="raw"))
    token, _, _ = node.take_task()
    for wrong in (token + 1000, token - 1, 0):
        node.command(P.RESULT, *success_result("lease-1", wrong, "forged"))
        assert node.expect(P.SETTLED) == [str(wrong).encode()]  # acknowledged, not stored
        assert client.state("lease-1") == states.RECEIVED
    # a result for a task this node was never given is discarded the same way
    node.command(P.RESULT, *success_result("not-delivered", token, "forged"))
    node.expect(P.SETTLED)
    assert client.state("not-delivered") == states.UNKNOWN
    node.command(P.RESULT, *success_result("lease-1", token, "genuine"))
    node.expect(P.SETTLED)
    assert embedq.AsyncResult("lease-1", app=app).get(timeout=10) == "genuine"
    assert_serves()


def test_result_of_a_delivery_taken_back_is_discarded(peers, assert_serves, app):
    """A node that re-registers without a delivery loses it; its late result for it is ignored."""
    node, client = peers(), peers()
    node.register(node="forgetful", queues=["raw"])
    client.submit(add_task("taken-back", queue="raw"))
    old_token, _, _ = node.take_task()
    welcome = node.register(node="forgetful", queues=["raw"], held=[])  # "I hold nothing"
    assert welcome["drop"] == []
    new_token, _, _ = node.take_task()  # requeued and delivered again, under a new token
    assert new_token > old_token
    node.command(P.RESULT, *success_result("taken-back", old_token, "stale"))
    node.expect(P.SETTLED)
    assert client.state("taken-back") == states.RECEIVED
    node.command(P.RESULT, *success_result("taken-back", new_token, "fresh"))
    node.expect(P.SETTLED)
    assert embedq.AsyncResult("taken-back", app=app).get(timeout=10) == "fresh"
    assert_serves()


def test_held_deliveries_are_adopted_and_unknown_ones_dropped(peers, assert_serves, app):
    node, client = peers(), peers()
    node.register(node="keeper", queues=["raw"])
    client.submit(add_task("kept", queue="raw"))
    token, _, _ = node.take_task()
    welcome = node.register(node="keeper", queues=["raw"], held=[token, 999_999])
    assert welcome["drop"] == [999_999]  # never ours: drop it; ours: adopted, not redelivered
    node.command(P.RESULT, *success_result("kept", token, "adopted"))
    node.expect(P.SETTLED)  # no second TASK came before this
    assert embedq.AsyncResult("kept", app=app).get(timeout=10) == "adopted"
    assert_serves()


def test_lost_result_and_lost_delivery_are_redelivered(peers, assert_serves):
    node, client = peers(), peers()
    node.register(queues=["raw"])
    client.submit(add_task("again", queue="raw"))
    first, _, _ = node.take_task()
    node.command(P.RESULT, P.encode({"id": "again", "token": first, "state": "LOST"}), b"")
    node.expect(P.SETTLED)
    second, _, _ = node.take_task()  # the pool child died: delivered again
    assert second > first
    # a heartbeat that has seen this token but does not hold it: lost in transit, requeued
    node.command(P.HEARTBEAT, P.encode({"held": [], "seen": second}))
    third, _, _ = node.take_task()
    assert third > second
    assert client.state("again") == states.RECEIVED
    assert_serves()


def test_malformed_worker_messages_from_a_registered_node(peers, assert_serves):
    node, client = peers(), peers()
    node.register(queues=["raw"])
    client.submit(add_task("w-1", queue="raw"))
    token, _, _ = node.take_task()
    bad = [
        ([P.PROTOCOL, b"FROBNICATE"], "unknown command"),
        ([P.PROTOCOL, P.RESULT], "groups of 2"),
        ([P.PROTOCOL, P.RESULT, success_result("w-1", token, 1)[0]], "groups of 2"),
        ([P.PROTOCOL, P.RESULT, b"not json", b""], "not JSON"),
        ([P.PROTOCOL, P.RESULT, P.encode({"id": "w-1", "token": str(token), "state": "SUCCESS"}), b""],
         "token must be an integer"),
        ([P.PROTOCOL, P.RESULT, P.encode({"id": "w-1", "token": True, "state": "SUCCESS"}), b""],
         "token must be an integer"),
        ([P.PROTOCOL, P.RESULT, P.encode({"id": "w-1", "token": token}), b""], "state must be a string"),
        ([P.PROTOCOL, P.RESULT, P.encode({"token": token, "state": "SUCCESS"}), b""], "task id"),
        ([P.PROTOCOL, P.HEARTBEAT, b"\xff"], "not JSON"),
        ([P.PROTOCOL, P.HEARTBEAT, b"[]"], "JSON object"),
        ([P.PROTOCOL, P.READY, P.encode({"node": "raw-node", "slots": 0, "queues": []})], "READY needs"),
    ]
    for frames, reason in bad:
        node.send(*frames)
        node.expect_disconnect(reason)
    assert client.state("w-1") == states.RECEIVED  # none of it settled the task
    # heartbeat fields of the wrong type are ignored (no DISCONNECT): the next reply is the STATE
    node.command(P.HEARTBEAT, P.encode({"held": "all", "seen": "everything"}))
    node.command(P.STATUS, P.encode({"req": 1, "ids": ["w-1"]}))
    assert P.decode(node.expect(P.STATE)[0])["states"]["w-1"]["state"] == states.RECEIVED
    node.command(P.RESULT, *success_result("w-1", token, 5))
    node.expect(P.SETTLED)
    assert client.state("w-1") == states.SUCCESS
    assert_serves()


def test_disconnect_from_an_unregistered_peer_is_ignored(peers, assert_serves):
    peer = peers()
    peer.command(P.DISCONNECT, P.encode({"reason": "bye"}))
    peer.command(P.STATUS, P.encode({"req": 1, "ids": []}))
    assert peer.expect(P.STATE) == [P.encode({"req": 1, "states": {}})]  # no DISCONNECT before it
    assert_serves()


def test_disconnect_from_a_node_hands_its_tasks_back(peers, assert_serves):
    node, client = peers(), peers()
    node.register(node="leaving", queues=["raw"])
    client.submit(add_task("handed-back", queue="raw"))
    node.take_task()
    node.command(P.DISCONNECT, P.encode({"reason": "shutdown"}))
    node.heartbeating = False
    wait_for = time.monotonic() + REPLY_TIMEOUT
    while client.state("handed-back") != states.PENDING:
        assert time.monotonic() < wait_for, "the task was not requeued"
    other = peers()
    other.register(node="taker", queues=["raw"])
    token, delivered, _ = other.take_task()
    assert P.decode(delivered)["id"] == "handed-back"
    assert_serves()


def test_silent_node_is_evicted_and_its_late_result_refused(peers, assert_serves, app, start_worker):
    node, client = peers(), peers()
    node.register(node="sleepy", queues=["q-evict"])
    client.submit(add_task("evicted", queue="q-evict"))
    token, _, _ = node.take_task()
    node.heartbeating = False  # silence: evicted after heartbeat * liveness, task requeued
    start_worker(concurrency=1, queues=["q-evict"])
    assert embedq.AsyncResult("evicted", app=app).get(timeout=30) == 5
    node.command(P.RESULT, *success_result("evicted", token, "late"))
    node.expect_disconnect("unknown worker")  # the broker forgot the node: re-register
    assert embedq.AsyncResult("evicted", app=app).get(timeout=10) == 5
    assert_serves()


def test_broker_heartbeats_an_idle_node(peers, assert_serves, broker):
    node = peers()
    node.register(queues=["raw"])
    node.heartbeating = False
    started = time.monotonic()
    node.expect(P.HEARTBEAT, skip=())
    assert time.monotonic() - started < broker.heartbeat * 3
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


def test_payload_is_forwarded_byte_for_byte(peers, assert_serves):
    node, client = peers(), peers()
    payloads = [GARBAGE, b"", b"\x00" * 100_000]
    node.register(queues=["raw"], slots=len(payloads))  # credit for all of them
    for i, payload in enumerate(payloads):
        client.submit((header(f"opaque-{i}", queue="raw", notify=False), payload))
        _, delivered_header, delivered = node.take_task()
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
    peer.expect_disconnect("unknown worker")
    peer.send(P.PROTOCOL, P.STATUS, b" " * (1 << 20))
    peer.expect_disconnect("not JSON")
    peer.send(*submit_frames(*[header(f"many-{i}") for i in range(500)], payload=b""))
    assert P.decode(peer.expect(P.ACK)[0])["ok"] == 500
    assert_serves()


# -- input that crashes the broker today (bugs: see the reasons) ------------------------------
CRASHERS = {
    "lone surrogate in a task id": (
        submit_frames(raw_header('{"id":"\\ud800","task":"testapp.add","queue":"celery"}')),
        "protocol.check_name accepts lone surrogates; store.Batch.add_task's id.encode() raises "
        "UnicodeEncodeError, which broker._handle does not catch"),
    "lone surrogate in a queue name": (
        submit_frames(raw_header('{"id":"s-q","task":"testapp.add","queue":"\\udfff"}')),
        "UnicodeEncodeError from queue.encode() in store.Batch._make_ready kills the broker"),
    "lone surrogate in a STATUS id": (
        [P.PROTOCOL, P.STATUS, raw_header('{"req":1,"ids":["\\ud800"]}')],
        "UnicodeEncodeError from task_id.encode() in store.Batch.result kills the broker"),
    "lone surrogate in a WAIT id": (
        [P.PROTOCOL, P.WAIT, raw_header('{"ids":["\\ud800"]}')],
        "UnicodeEncodeError from task_id.encode() in store.Batch.result kills the broker"),
    "255 three-byte characters as task id": (
        submit_frames(P.encode({"id": "\u20ac" * 255, "task": "testapp.add", "queue": "celery"})),
        "check_name counts characters, LMDB keys are limited to 511 bytes: lmdb.BadValsizeError"),
    "255 three-byte characters as queue": (
        submit_frames(P.encode({"id": "q3", "task": "testapp.add", "queue": "\u20ac" * 255})),
        "the ready key (queue + 10 bytes) exceeds LMDB's 511-byte key limit: BadValsizeError"),
    "eta Infinity": (
        submit_frames(raw_header('{"id":"inf","task":"testapp.add","queue":"celery","eta":Infinity}')),
        "json accepts Infinity; store._us(inf) raises OverflowError in Batch.add_task"),
    "eta beyond 2**64 microseconds": (
        submit_frames(header("far", eta=1e20)),
        "struct.error packing the due time in Batch.add_task kills the broker"),
    "deeply nested JSON control frame": (
        [P.PROTOCOL, P.STATUS, b"[" * 100_000],
        "protocol.decode lets RecursionError through (it catches only ValueError)"),
}


@pytest.mark.parametrize("frames, reason", [
    pytest.param(frames, reason, marks=pytest.mark.xfail(strict=True, raises=BrokerDied, reason=reason))
    for frames, reason in CRASHERS.values()], ids=CRASHERS.keys())
def test_input_that_crashes_the_broker(peers, assert_serves, frames, reason):
    peer = peers()
    peer.send(*frames)
    reply = peer.recv()  # refused (DISCONNECT) or served: either is fine, dying is not
    assert reply[1] in (P.DISCONNECT, P.ACK, P.STATE)
    assert_serves()


@pytest.mark.xfail(strict=True, raises=BrokerDied, reason=(
    "broker._on_heartbeat does set(held) on untrusted JSON: a list inside 'held' raises TypeError"))
def test_heartbeat_with_unhashable_held_entries(peers, assert_serves):
    node = peers()
    node.register(queues=["raw"])
    node.command(P.HEARTBEAT, P.encode({"held": [[1], {"a": 1}], "seen": 1}))
    node.command(P.STATUS, P.encode({"req": 1, "ids": []}))
    node.expect(P.STATE)
    assert_serves()


@pytest.mark.xfail(strict=True, raises=BrokerDied, reason=(
    "READY accepts a node id with a lone surrogate; the first dispatch to it calls "
    "node.encode() in store.Batch.lease and the UnicodeEncodeError kills the broker"))
def test_ready_with_a_lone_surrogate_node_id(peers, assert_serves):
    node, client = peers(), peers()
    node.command(P.READY, raw_header('{"node":"\\ud800","slots":1,"queues":["raw"],"held":[]}'))
    reply = node.recv()
    if reply[1] == P.WELCOME:  # accepted: then delivering to it must work too
        node.heartbeating = True
        client.submit(add_task("to-surrogate", queue="raw"))
        node.take_task()
    else:
        assert reply[1] == P.DISCONNECT
    assert_serves()


@pytest.mark.xfail(strict=True, raises=embedq.TimeoutError, reason=(
    "an ETA of NaN is accepted and sets Broker.next_due to NaN; every later comparison with it "
    "is False, so no scheduled task is ever promoted again (until a restart)"))
def test_nan_eta_does_not_stall_the_scheduler(peers, assert_serves, app):
    import testapp

    peer = peers()
    ack = peer.submit((raw_header('{"id":"nan","task":"testapp.noop","queue":"q-nan","eta":NaN}'), b""))
    assert ack["ok"] + len(ack["dup"]) <= 1  # accepted or not, the scheduler must keep working
    result = testapp.add.apply_async((1, 2), countdown=0.2)
    assert result.get(timeout=5) == 3
    assert_serves()


@pytest.mark.xfail(strict=True, raises=embedq.TimeoutError, reason=(
    "peers.WorkerTable.register replaces only by node id: a socket that sends READY again under "
    "another node id orphans the first entry (out of by_identity, so never expired) and the "
    "tasks leased to it are never redelivered"))
def test_socket_reregistering_under_another_node_id_does_not_strand_tasks(peers, assert_serves, app,
                                                                         start_worker):
    node, client = peers(), peers()
    node.register(node="first-name", queues=["q-strand"])
    client.submit(add_task("stranded", queue="q-strand"))
    node.take_task()
    node.register(node="second-name", queues=["elsewhere"])
    node.heartbeating = False  # now silent: evicted, and whatever it held must be redelivered
    start_worker(concurrency=1, queues=["q-strand"])
    assert embedq.AsyncResult("stranded", app=app).get(timeout=8) == 5
    assert_serves()
