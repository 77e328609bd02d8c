"""Raw peers for protocol tests: a client, a worker node's supervisor and a pool process spoken
by hand over DEALER sockets against a real broker process (the fixtures ``peers``, ``raw_worker``,
``assert_serves``; a pytest plugin loaded by conftest.py).

A raw node keeps heartbeating whenever the test waits on any raw peer, so the broker does not
evict it mid-test.
"""

import pickle
import time

import psutil
import pytest
import zmq

from embedq import protocol as P
from embedq import states

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

    def __init__(self, context, broker, group, identity=None):
        self.broker = broker
        self.group = group  # every peer of the test: registered nodes among them heartbeat
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.connect(broker.url)
        #: heartbeat while any peer of the test waits (set once registered as a worker node)
        self.heartbeating = False
        self.running = []
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

    def beat(self):
        if self.heartbeating and time.monotonic() - self.last_beat >= RAW_HEARTBEAT:
            self.command(P.HEARTBEAT, P.encode({"running": self.running}))
            self.last_beat = time.monotonic()

    def recv(self, timeout=REPLY_TIMEOUT, skip=(P.HEARTBEAT,), split_settled=True):
        """The next message (broker HEARTBEATs skipped); fails fast if the broker process died.

        A TASK carrying settled tokens (its first body frame) is returned with that frame
        emptied and followed by a SETTLED message of those tokens (``split_settled``): tests
        then see settling the same way whether it rode on a TASK or came alone."""
        if self.stashed:
            return self.stashed.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            for peer in self.group:
                peer.beat()
            if self.socket.poll(20):
                frames = self.socket.recv_multipart()
                if len(frames) >= 2 and frames[1] in skip:
                    continue
                if split_settled and frames[1:2] == [P.TASK] and len(frames) > 2 and frames[2]:
                    self.stashed.insert(0, [P.PROTOCOL, P.SETTLED, *frames[2].split(b",")])
                    frames = [*frames[:2], b"", *frames[3:]]
                return frames
            code = self.broker.process.poll()
            if code is not None:
                raise BrokerDied(f"the broker process died (exit code {code})")
            if time.monotonic() > deadline:
                raise AssertionError(f"no message from the broker within {timeout}s")

    def expect(self, command, timeout=REPLY_TIMEOUT, skip=(P.HEARTBEAT,)):
        frames = self.recv(timeout, skip)
        early = []
        while command == P.SETTLED and frames[1] == P.TASK:
            # a deferred SETTLED leaves right behind the next TASK to the same process: keep
            # that TASK for take_task()
            early.append(frames)
            frames = self.recv(timeout, skip)
        self.stashed = early + self.stashed
        assert frames[:2] == [P.PROTOCOL, command], f"expected {command!r}, got {frames!r}"
        return frames[2:]

    def expect_disconnect(self, reason):
        body = self.expect(P.DISCONNECT)
        assert len(body) == 1
        text = P.decode(body[0])["reason"]
        assert reason in text, f"DISCONNECT reason {text!r} lacks {reason!r}"
        return text

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

    # -- worker roles --------------------------------------------------------------------------
    def _welcome(self):
        # TASK deliveries of the same broker iteration are flushed ahead of the WELCOME
        early = []
        while True:
            frames = self.recv()
            if frames[1] != P.TASK:
                break
            early.append(frames)
        assert frames[:2] == [P.PROTOCOL, P.WELCOME], frames
        self.stashed = early + self.stashed
        return P.decode(frames[2])

    def register(self, node="raw-node", queues=("raw",), running=(), **extra):
        """Act as a worker node's supervisor: READY -> WELCOME, then heartbeat."""
        self.command(P.READY, P.encode({"node": node, "queues": list(queues),
                                        "running": list(running), **extra}))
        welcome = self._welcome()
        self.heartbeating = True
        return welcome

    def join(self, node="raw-node", index=0, capacity=1, held=(), **extra):
        """Act as pool process ``index`` of ``node``: JOIN -> WELCOME."""
        self.command(P.JOIN, P.encode({"node": node, "index": index, "capacity": capacity,
                                       "held": list(held), **extra}))
        return self._welcome()

    def take_task(self):
        """The next delivery: (token, header bytes, payload bytes). A TASK message may carry
        several ``(token, header, payload)`` triples; the rest are kept for the next call."""
        settled, *body = self.expect(P.TASK)
        assert settled == b"" and body and len(body) % 3 == 0, body
        if len(body) > 3:
            self.stashed.insert(0, [P.PROTOCOL, P.TASK, b"", *body[3:]])
        return int(body[0]), body[1], body[2]

    def try_recv(self, timeout):
        """The next message within ``timeout`` seconds, or None."""
        try:
            return self.recv(timeout)
        except BrokerDied:
            raise
        except AssertionError:
            return None


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
        peer = Peer(context, broker, made, identity)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def raw_worker(peers):
    """A raw worker node (supervisor socket) with one raw pool process (index 0)."""

    def make(node="raw-node", queues=("raw",), capacity=1):
        supervisor, pool = peers(), peers()
        welcome = supervisor.register(node=node, queues=queues)
        assert set(welcome) == {"broker", "heartbeat"}
        welcome = pool.join(node=node, index=0, capacity=capacity)
        assert set(welcome) == {"broker", "drop"} and welcome["drop"] == []
        return supervisor, pool

    return make


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


def wait_for_state(client, task_id, state):
    deadline = time.monotonic() + REPLY_TIMEOUT
    while client.state(task_id) != state:
        assert time.monotonic() < deadline, f"{task_id} never became {state}"
