"""The client side of the wire: submit tasks, wait for results, ask for states.

Each thread gets its own DEALER socket (ZeroMQ sockets are not thread-safe), so a single-threaded
``add.delay(1, 2).get()`` costs exactly two socket round trips with no thread hand-off. A submit
subscribes its socket to the task's result, which the broker pushes the moment it is committed.

ZeroMQ reconnects by itself but silently loses what was in flight when a broker dies, so every
request is resent after ``broker_resend_interval`` of silence. That is harmless: task ids are
chosen here and the broker deduplicates on them; WAIT and STATUS are idempotent.
"""

import collections
import itertools
import logging
import os
import threading
import time
import uuid
import weakref

import zmq  # noqa: F401  (Context.instance)

from . import protocol as P
from . import states
from .errors import BrokerUnavailable, StorageFull, TimeoutError, UnknownTaskError
from .transport import dealer, receive, send_frames, wait_readable

log = logging.getLogger(__name__)

#: Results pushed to this process and not yet claimed by a ``get()``; oldest dropped first
#: (a dropped one is fetched again from the broker's store when asked for).
RESULT_CACHE_SIZE = 100_000
#: Milliseconds a closing client socket may linger to deliver what it sent.
LINGER_MS = 1000
#: Most ids remembered as owed to this process (oldest forgotten; they can still be waited for).
OUTSTANDING_LIMIT = 100_000
#: Most ids one bulk WAIT asks for.
BULK_WAIT = 10_000
#: Group submit: SUBMITs of this process's threads in flight at once. Two keep the broker fed
#: (the next group is there while it commits the last) without splitting groups.
GROUP_SUBMITS_IN_FLIGHT = 2
#: Messages a client socket queues while the broker is away (resends cover what is dropped).
HIGH_WATER_MARK = 100_000


class ResultCache:
    """Results received by any of this process's sockets, shared by all threads."""

    def __init__(self, size=RESULT_CACHE_SIZE):
        self.size = size
        self.lock = threading.Lock()
        self.items = collections.OrderedDict()

    def put(self, task_id, header, payload):
        with self.lock:
            self.items[task_id] = (header, payload)
            if len(self.items) > self.size:
                self.items.popitem(last=False)

    def pop(self, task_id):
        with self.lock:
            return self.items.pop(task_id, None)


class _SubmitGroup:
    def __init__(self):
        self.lock = threading.Lock()
        self.queue = []        # _GroupedSubmit entries waiting for a SUBMIT to carry them
        self.sending = 0       # SUBMITs in flight (each sent by one thread, its lead)


class _GroupedSubmit:
    __slots__ = ("conn", "messages", "woken", "batch", "outcome")

    def __init__(self, conn, messages):
        self.conn, self.messages = conn, messages
        #: for an entry that queues: a held lock, released when its SUBMIT is answered or when
        #: it is to lead the next one (a thread that leads at once needs none). A bare lock, not
        #: an Event: Event and Condition are Python code, paid on every delay() of a thread
        self.woken = None
        self.batch = None      # the entries this one leads (itself first), once it leads
        self.outcome = None    # the ACK (or the exception) of the SUBMIT that carried it


class Connection:
    """One DEALER socket owned by one thread."""

    def __init__(self, client, identity=None):
        self.client = client
        self.identity = identity or b"c:" + uuid.uuid4().hex.encode()
        self.socket = dealer(client.context, client.url, self.identity, LINGER_MS, HIGH_WATER_MARK)
        self.replies = {}
        #: it has sent a request (so the broker can route pushed results to it)
        self.used = False
        #: the number (``Client.outstanding``) of the newest owed result it has WAITed for
        self.asked_through = 0

    def close(self):
        self.socket.close(linger=LINGER_MS)

    def send(self, frames):
        send_frames(self.socket, frames, 0)
        self.used = True

    def pump(self, timeout):
        """Wait up to ``timeout`` seconds for a message and file it. True if one came.

        One message per call: the callers loop until theirs is filed, and a poll that finds
        the next one already queued costs no more than asking the socket whether it is."""
        if not wait_readable(self.socket, timeout):
            return False
        try:
            self.client.file_message(self, *P.split(receive(self.socket)))
        except Exception as exc:  # never let one bad message break a waiting caller
            log.warning("dropped malformed message from broker: %s", exc)
        return True

    def request(self, frames, req, timeout):
        """Send and wait for the reply carrying ``req``, resending on silence."""
        resend = self.client.resend_interval
        sent = time.monotonic()
        deadline = None if timeout is None else sent + timeout
        self.send(frames)
        while True:
            if req in self.replies:
                return self.replies.pop(req)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise BrokerUnavailable(
                    f"no answer from the broker at {self.client.url} within {timeout:.0f}s; is it "
                    "running? (start one with embedq.start() or python -m embedq.broker)")
            if now - sent >= resend:
                self.send(frames)
                sent = now
            wait = sent + resend - now
            self.pump(wait if deadline is None else min(wait, deadline - now))


class Client:
    """Everything one process says to one broker. Create through ``App.client``."""

    def __init__(self, url, conf):
        self.url = url
        self.pid = os.getpid()
        self.resend_interval = conf.broker_resend_interval
        self.connection_timeout = conf.broker_connection_timeout
        #: the process-wide context: a private one would be terminated by the garbage collector,
        #: which blocks while any thread's socket is still open
        self.context = zmq.Context.instance()
        self.results = ResultCache()
        self.local = threading.local()
        self.requests = itertools.count(1)
        self.connections = weakref.WeakSet()  # a thread's socket closes when the thread ends
        self.lock = threading.Lock()
        #: ids submitted from this process whose results have not arrived yet, each with a
        #: number in submit order; a WAIT from a thread that did not submit them asks for all
        #: of them at once (bulk fetch)
        self.outstanding = collections.OrderedDict()
        self.owed_numbers = itertools.count(1)
        #: optional hook (task id, header, payload) for results pushed to other identities' owners
        self.on_result = None
        #: submits of concurrent threads waiting to share one SUBMIT (see submit)
        self.group = _SubmitGroup()
        #: when a WAIT last asked for every outstanding result, and when any socket of this
        #: process last heard from the broker (see wait)
        self.last_bulk_wait = self.last_heard = float("-inf")

    def connection(self):
        conn = getattr(self.local, "connection", None)
        if conn is None:
            conn = self.local.connection = Connection(self)
            with self.lock:
                self.connections.add(conn)
        return conn

    def close(self):
        with self.lock:
            for conn in list(self.connections):
                conn.close()
            self.connections = weakref.WeakSet()
        self.local = threading.local()

    def file_message(self, conn, command, body):
        self.last_heard = time.monotonic()
        if command == P.RESULT:
            for raw, payload in P.pairs(body):
                header = P.decode(raw)
                self.results.put(header["id"], header, payload)
                self.outstanding.pop(header["id"], None)
        elif command == P.STATE and body:
            info = P.decode(body[0])
            if "req" in info:
                conn.replies[info["req"]] = info
            elif info.get("state") == states.UNKNOWN:
                self.results.put(info["id"], info, b"")
        elif command == P.ACK and body:
            info = P.decode_ack(body[0])
            conn.replies[info.get("req")] = info
        elif command == P.DISCONNECT:
            log.warning("broker refused a message: %s", body[0][:200] if body else b"")

    # -- requests ----------------------------------------------------------------------------
    def submit(self, messages, timeout=None, chords=None):
        """Send (task id, header JSON, payload) triples in one message; return once committed.
        ``chords``: the chord counters of a workflow (canvas.py), stored in the same commit.

        Submits from several threads at once share SUBMITs (group submit): while one thread's
        SUBMIT is in flight, the others queue theirs, and the first of them sends all that
        queued in one message (one broker commit) for everyone, each result routed to its own
        thread's socket. A lone thread sends at once, as before."""
        conn = self.connection()
        if chords or not conn.used:
            # a socket's first request goes itself: the broker can route results to a socket
            # only once it has heard from it
            return conn, self._send_submit(conn, [(conn, messages)], timeout, chords)
        entry = _GroupedSubmit(conn, messages)
        group = self.group
        with group.lock:
            if group.sending < GROUP_SUBMITS_IN_FLIGHT:
                group.sending += 1
                entry.batch, group.queue = [entry, *group.queue], []
            else:
                entry.woken = threading.Lock()
                entry.woken.acquire()
                group.queue.append(entry)
        if entry.batch is None:
            entry.woken.acquire()  # one wake-up: answered, or handed the lead of what queued
        if entry.batch is not None:
            self._lead(conn, entry.batch, timeout)
        if isinstance(entry.outcome, BaseException):
            raise entry.outcome
        return conn, entry.outcome

    def _lead(self, conn, batch, timeout):
        """Send one SUBMIT for ``batch``; then give its outcome to each entry and the lead of
        whatever queued meanwhile to the first of those (each waiting thread wakes once)."""
        outcome = None
        try:
            outcome = self._send_submit(conn, [(e.conn, e.messages) for e in batch], timeout)
        except Exception as exc:
            outcome = exc
        except BaseException:  # (KeyboardInterrupt): the others get an error they can handle
            outcome = BrokerUnavailable("the thread sending this submit was interrupted; "
                                        "resubmit with the same task_id (it is idempotent)")
            raise
        finally:
            group = self.group
            with group.lock:
                following, group.queue = group.queue, []
                if following:
                    following[0].batch = following  # the slot in flight passes to it
                else:
                    group.sending -= 1
            for waiting in batch:
                waiting.outcome = outcome
            for waiting in batch[1:]:  # (the first is this thread)
                waiting.woken.release()
            if following:
                following[0].woken.release()

    def _send_submit(self, conn, parts, timeout, chords=None):
        """One SUBMIT on ``conn`` carrying ``parts``: (owner connection, messages) pairs."""
        req = next(self.requests)
        control = {"req": req}
        if chords:
            control["chords"] = chords
        if len(parts) > 1 and any(owner is not conn for owner, _ in parts):
            control["owners"] = [owner.identity.decode() if owner is not conn else None
                                 for owner, messages in parts for _ in messages]
        frames = [P.PROTOCOL, P.SUBMIT, P.encode(control) if len(control) > 1 else b'{"req":%d}' % req]
        for _, messages in parts:
            for _, header, payload in messages:
                frames += (header, payload)
        reply = conn.request(frames, req, self.connection_timeout if timeout is None else timeout)
        if reply.get("error") == "StorageFull":
            raise StorageFull(reply.get("message", "broker store is full"))
        with self.lock:
            for _, messages in parts:
                for task_id, _, _ in messages:
                    self.outstanding.setdefault(task_id, next(self.owed_numbers))
            while len(self.outstanding) > OUTSTANDING_LIMIT:
                self.outstanding.popitem(last=False)
        return reply

    def status(self, task_ids):
        conn = self.connection()
        req = next(self.requests)
        reply = conn.request(P.message(P.STATUS, P.encode({"req": req, "ids": list(task_ids)})),
                             req, self.connection_timeout)
        return reply["states"]

    def control(self, op, **fields):
        """A CONTROL request (revoke, dead letters, stats); returns the broker's reply."""
        conn = self.connection()
        req = next(self.requests)
        return conn.request(P.message(P.CONTROL, P.encode({"req": req, "op": op, **fields})),
                            req, self.connection_timeout)

    def forget(self, task_ids):
        conn = self.connection()
        req = next(self.requests)
        conn.request(P.message(P.FORGET, P.encode({"req": req, "ids": list(task_ids)})),
                     req, self.connection_timeout)

    def wait(self, task_id, timeout=None, subscribed=None):
        """Block until the result of ``task_id`` arrives; return (header, payload).

        ``subscribed`` is the connection that submitted the task (already subscribed to the
        result); from any other thread, or after a silent spell, a WAIT is (re)sent.
        """
        found = self.results.pop(task_id)
        conn = self.connection()
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = time.monotonic()
        if found is None and subscribed is not conn:
            # Another thread submitted it: subscribe this socket to every result still owed to
            # this process, so the get()s that follow find theirs already here.
            self._wait_for_all(conn, task_id)
        while found is None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"task {task_id} did not finish within {timeout}s")
            if now - sent >= self.resend_interval:
                # The broker may have restarted and forgotten its waiters: this one and, as
                # likely, every other result owed to this process. After a silence on all our
                # sockets for an interval, asking for all of them (at most once per interval)
                # spares each later get() an interval of its own. While results keep coming, a
                # WAIT of thousands of ids would only stall the broker's loop every interval
                # (scheduled tasks started up to 40 ms late): this id alone is asked for again,
                # which subscribes it either way.
                if (now - self.last_bulk_wait >= self.resend_interval
                        and now - self.last_heard >= self.resend_interval):
                    self.last_bulk_wait = now
                    self._wait_for_all(conn, task_id, again=True)
                else:
                    conn.send(P.message(P.WAIT, P.encode({"ids": [task_id]})))
                sent = now
            wait = sent + self.resend_interval - now
            conn.pump(wait if deadline is None else min(wait, deadline - now))
            found = self.results.pop(task_id)
        header, payload = found
        if header.get("state") == states.UNKNOWN:
            raise UnknownTaskError(task_id)
        return header, payload

    def _wait_for_all(self, conn, task_id, again=False):
        """WAIT for ``task_id`` and the other results still owed to this process that ``conn``
        has not asked for yet (``again``: all of them, for a broker that may have forgotten).
        Only what is new: a thread that get()s a backlog in order would otherwise send the whole
        backlog with each get() that waits, and the broker would look up n²/2 ids."""
        with self.lock:
            since = 0 if again else conn.asked_through
            newer = []
            for owed in reversed(self.outstanding):  # newest first, down to what was asked
                if self.outstanding[owed] <= since:
                    break
                newer.append(owed)
            newer = newer[::-1][:BULK_WAIT]  # oldest first, as many as one WAIT holds
            if newer:
                conn.asked_through = self.outstanding[newer[-1]]
        conn.send(P.message(P.WAIT, P.encode({"ids": list(dict.fromkeys([task_id, *newer]))})))
