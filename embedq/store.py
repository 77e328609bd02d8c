"""The broker's LMDB store: the one place task state lives. Opened only by the broker process.

Named databases and their keys (integers are big-endian so byte order is numeric order)::

    tasks      id                                  -> seq u64 | hlen u32 | header JSON | payload
               every accepted task until it settles (queued, scheduled or leased)
    ready      queue | 0x00 | 255-priority u8 | seq u64   -> id
               deliverable now; a cursor walk gives priority (high first), then submit order
    scheduled  due_us u64 | seq u64               -> id     (countdown/ETA/retry: held until due)
    leases     id                                  -> token u64 | since_us u64 | node id
               delivered to a worker node; the token names this delivery, so a late result from
               an evicted node is recognised and discarded
    meta       b"seq" -> u64 (sequence numbers / delivery tokens reserved); b"version" -> b"2";
               b"rate" 0x00 task name -> f64: when the next task of a rate-limited type may start

    results, expiry, progress, revoked, dead, expiring: how tasks ended or are doing, see records.py
    waiting, chords: workflow steps not yet activated and chord counters, see workflow_records.py
    beat: periodic entries and their run state, see beat_records.py

One write transaction per broker loop iteration (group commit). ``fsync`` durability opens LMDB
with ``sync=True`` (a committed transaction survives power loss); ``process`` with ``sync=False``
(it survives any process crash; the OS flushes later). Never ``writemap=True``: a full disk would
kill the broker with SIGBUS instead of failing the commit with ``lmdb.Error``, which the broker
turns into StorageFull for submitters (see ``Broker._iterate``). LMDB does not stop two
processes from opening one directory, so the broker holds an exclusive ``flock`` on ``broker.lock``.
"""

import os
import struct
from collections import Counter, defaultdict

import lmdb

from .beat_records import BeatRecords
from .errors import ConfigurationError
from .lifecycle import lock_data_dir
from .protocol import TaskHeader
from .records import OutcomeRecords, join_record, split_record, us
from .store_space import MapSpace
from .workflow_records import WorkflowRecords

#: First map size; it doubles on demand up to the configured cap.
INITIAL_MAP_SIZE = 64 << 20
#: Layout version in ``meta``; a directory written with another layout is refused.
SCHEMA_VERSION = b"2"
#: Sequence numbers reserved at a time (``meta`` b"seq"). A TASK leaves before its commit
#: (broker.py) only if its token is within the committed reservation, and a store opened again
#: continues after it: no number a delivery may carry is handed out twice, even after a crash.
SEQ_BLOCK = 1 << 20

_U64 = struct.Struct(">Q")
_TASK_PREFIX = struct.Struct(">QI")       # seq, header length
_LEASE = struct.Struct(">QQ")              # token, since (µs)
_READY_SUFFIX = struct.Struct(">BQ")      # 255 - priority, seq
_DUE = struct.Struct(">QQ")                # due (µs), seq
_F64 = struct.Struct(">d")
#: ``meta`` keys of rate limits: prefix | task name -> next free start (f64 seconds)
_RATE_PREFIX = b"rate\0"


class Lease:
    __slots__ = ("task_id", "token", "since", "node")

    def __init__(self, task_id, token, since, node):
        self.task_id, self.token, self.since, self.node = task_id, token, since, node


class Store(MapSpace):
    def __init__(self, path, durability="fsync", max_size=4 << 30):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.max_size = max_size
        self._lock_file = lock_data_dir(path)
        self.env = lmdb.open(
            path, map_size=min(INITIAL_MAP_SIZE, max_size), max_dbs=16, subdir=True,
            sync=(durability == "fsync"), metasync=(durability == "fsync"),
            writemap=False, readahead=False, max_readers=64,
        )
        self.env.reader_check()
        self.grow_to_fit()
        names = ("tasks", "ready", "scheduled", "leases", "results", "expiry", "meta", "progress",
                 "revoked", "dead", "expiring", "beat", "waiting", "chords")
        self.db = {name: self.env.open_db(name.encode()) for name in names}
        with self.env.begin(write=True) as txn:
            meta = self.db["meta"]
            txn.put(b"version", SCHEMA_VERSION, db=meta, overwrite=False)
            found = txn.get(b"version", db=meta)
            raw = txn.get(b"seq", db=meta)
            self.seq = _U64.unpack(raw)[0] if raw else 0
            #: every sequence number up to this one may be in use (stored, or in a delivery)
            self.reserved = self.seq + SEQ_BLOCK
            if found == SCHEMA_VERSION:
                txn.put(b"seq", _U64.pack(self.reserved), db=meta)
            #: ``progress`` or ``revoked`` may hold a record (settling skips them while not)
            self.side_records = any(txn.stat(self.db[name])["entries"] for name in ("progress", "revoked"))
        if found != SCHEMA_VERSION:
            self.close()
            raise ConfigurationError(
                f"data dir {path!r} has store layout {found.decode()!r}; this embedq writes "
                f"{SCHEMA_VERSION.decode()!r}: drain it with the embedq that wrote it, or use a "
                "new --data-dir")
        #: ready tasks per queue, so dispatch skips empty queues without touching LMDB
        self.ready_counts = self._count_ready()

    # -- lifecycle -------------------------------------------------------------------------
    def close(self):
        self.env.close()
        self._lock_file.close()

    def _count_ready(self):
        counts = Counter()
        with self.env.begin() as txn:
            for key in txn.cursor(db=self.db["ready"]).iternext(values=False):
                counts[key[:key.index(b"\0")].decode()] += 1
        return counts

    def begin(self):
        return Batch(self)

    # -- reads outside the loop's transaction (startup) ---------------------------------------
    def leases(self):
        with self.env.begin() as txn:
            return [_parse_lease(k, v) for k, v in txn.cursor(db=self.db["leases"])]

    def rate_marks(self):
        """{task name: earliest start of its next task} as last committed (rate limits)."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.db["meta"])
            marks = {}
            if cursor.set_range(_RATE_PREFIX):
                for key, value in cursor:
                    if not key.startswith(_RATE_PREFIX):
                        break
                    marks[key[len(_RATE_PREFIX):].decode()] = _F64.unpack(value)[0]
            return marks

    def beat_entries(self):
        """Every periodic entry as (name, entry JSON, payload), in name order."""
        with self.env.begin() as txn:
            return [(k.decode(), *split_record(v)) for k, v in txn.cursor(db=self.db["beat"])]


def _parse_lease(key, value):
    token, since = _LEASE.unpack_from(value)
    return Lease(key.decode(), token, since / 1e6, value[_LEASE.size:].decode())


class Batch(OutcomeRecords, WorkflowRecords, BeatRecords):
    """One write transaction: everything a loop iteration changes, committed at once."""

    def __init__(self, store):
        self.store = store
        self.db = store.db
        self.txn = store.env.begin(write=True)
        self.seq = store.seq
        self.ready_delta = defaultdict(int)  # queue -> ready tasks added - taken
        #: queue -> [(key suffix: 255-priority | seq, task id)] made ready in this batch and not
        #: written to ``ready`` yet: a task dispatched in the iteration that queued it never
        #: touches that database (two writes and a cursor walk fewer per round trip); the rest is
        #: written before the commit, or as soon as the queue must be read from LMDB
        self.fresh = defaultdict(list)
        #: whether anything was written; an idle iteration then costs no commit (and no fsync)
        self.dirty = False

    def next_seq(self):
        self.seq += 1
        self.dirty = True
        return self.seq

    @property
    def numbers_reserved(self):
        """Every number this batch handed out is within the committed reservation, so its
        deliveries may leave before its commit."""
        return self.seq <= self.store.reserved

    def commit(self):
        if not self.dirty:
            self.txn.abort()
            return
        for queue in list(self.fresh):
            self._store_fresh(queue)
        reserve = not self.numbers_reserved
        if reserve:
            self.txn.put(b"seq", _U64.pack(self.seq + SEQ_BLOCK), db=self.db["meta"])
        self.txn.commit()
        if reserve:
            self.store.reserved = self.seq + SEQ_BLOCK
        self.store.seq = self.seq
        counts = self.store.ready_counts
        for queue, change in self.ready_delta.items():
            counts[queue] += change

    def abort(self):
        self.txn.abort()
        self.store.seq = max(self.store.seq, self.seq)  # its tokens may be out in deliveries

    # -- tasks ---------------------------------------------------------------------------
    def add_task(self, header, raw_header, payload, now):
        """Put-if-absent on the id. Returns False for a duplicate (queued, running or settled)."""
        key = header.id.encode()
        if (self.txn.get(key, db=self.db["results"]) is not None
                or self.txn.get(key, db=self.db["waiting"]) is not None):
            return False
        seq = self.next_seq()
        value = _TASK_PREFIX.pack(seq, len(raw_header)) + raw_header + payload
        if not self.txn.put(key, value, db=self.db["tasks"], overwrite=False):
            return False
        if header.eta is not None and header.eta > now:
            self.schedule(key, seq, header.eta)
        else:
            self._make_ready(key, header.queue, header.priority, seq)
        if header.expires is not None:
            self.watch_expiry(header.id, header.expires)
        return True

    def schedule(self, key, seq, due):
        """Hold a task (its id as bytes) until ``due``; ``promote_due`` makes it ready then."""
        self.dirty = True
        self.txn.put(_DUE.pack(us(due), seq), key, db=self.db["scheduled"])

    def rewrite_header(self, task_id, raw_header, payload=None):
        """Replace an unsettled task's header (retry count, eta...), keeping its seq and (unless
        given a new one) its payload. Returns the seq, or None if the task is not here."""
        key = task_id.encode()
        value = self.txn.get(key, db=self.db["tasks"])
        if value is None:
            return None
        seq, hlen = _TASK_PREFIX.unpack_from(value)
        if payload is None:
            payload = value[_TASK_PREFIX.size + hlen:]
        self.dirty = True
        self.txn.put(key, _TASK_PREFIX.pack(seq, len(raw_header)) + raw_header + payload, db=self.db["tasks"])
        return seq

    def _make_ready(self, key, queue, priority, seq):
        self.fresh[queue].append((_READY_SUFFIX.pack(255 - priority, seq), key))
        self.ready_delta[queue] += 1

    def _store_fresh(self, queue):
        """Write the ready entries of ``queue`` this batch still holds in memory."""
        entries = self.fresh.pop(queue, None)
        if entries:
            prefix, db = queue.encode() + b"\0", self.db["ready"]
            for suffix, key in entries:
                self.txn.put(prefix + suffix, key, db=db)

    def task(self, task_id):
        """(seq, header, payload) of an unsettled task, or None."""
        value = self.txn.get(task_id.encode(), db=self.db["tasks"])
        if value is None:
            return None
        seq, hlen = _TASK_PREFIX.unpack_from(value)
        start = _TASK_PREFIX.size
        return seq, value[start:start + hlen], value[start + hlen:]

    def take_ready(self, queue, limit):
        """Remove and return up to ``limit`` (id, header, payload) from a queue, best first."""
        fresh = self.fresh.get(queue)
        if fresh and self.store.ready_counts[queue] + self.ready_delta[queue] == len(fresh):
            return self._take_fresh(queue, fresh, limit)  # LMDB holds none of this queue's
        self._store_fresh(queue)
        prefix = queue.encode() + b"\0"
        cursor = self.txn.cursor(db=self.db["ready"])
        taken = []
        if not cursor.set_range(prefix):
            return taken
        while len(taken) < limit:
            key = cursor.key()
            if not key.startswith(prefix):
                break
            self.dirty = True
            task_id = cursor.value()
            record = self.task(task_id.decode())
            cursor.delete()
            self.ready_delta[queue] -= 1
            if record is not None:  # a stale index entry (task settled meanwhile) is skipped
                taken.append((task_id.decode(), record[1], record[2]))
            if not cursor.key():
                break
        return taken

    def _take_fresh(self, queue, fresh, limit):
        fresh.sort(reverse=True)  # the best last, where popping is cheap
        taken = []
        while fresh and len(taken) < limit:
            task_id = fresh.pop()[1].decode()
            self.ready_delta[queue] -= 1
            record = self.task(task_id)
            if record is not None:  # (settled in this batch: skipped, as a stale entry is)
                taken.append((task_id, record[1], record[2]))
        return taken

    def peek_ready(self, queue):
        """Sort key (255-priority, seq) of the best ready task in ``queue``, or None."""
        self._store_fresh(queue)
        prefix = queue.encode() + b"\0"
        cursor = self.txn.cursor(db=self.db["ready"])
        if cursor.set_range(prefix) and cursor.key().startswith(prefix):
            return cursor.key()[len(prefix):]
        return None

    def requeue(self, task_id, raw_header=None):
        """Put a leased task back at its original place in its queue (it goes first again),
        optionally with a rewritten header."""
        record = self.task(task_id)
        self.dirty = True
        self.txn.delete(task_id.encode(), db=self.db["leases"])
        self.clear_progress(task_id)
        if record is None:
            return False
        seq, stored_header, _ = record
        if raw_header is not None:
            self.rewrite_header(task_id, raw_header)
        header = TaskHeader.parse(raw_header or stored_header)
        self._make_ready(task_id.encode(), header.queue, header.priority, seq)
        return True

    def promote_due(self, now, limit=10000):
        """Move scheduled tasks whose time has come to their ready queue. Returns the next due time."""
        cursor = self.txn.cursor(db=self.db["scheduled"])
        bound = us(now)
        moved = 0
        while cursor.first() and moved < limit:
            due_us, seq = _DUE.unpack(cursor.key())
            if due_us > bound:
                return due_us / 1e6
            self.dirty = True
            task_id = cursor.value()
            cursor.delete()
            record = self.task(task_id.decode())
            if record is not None:
                header = TaskHeader.parse(record[1])
                self._make_ready(task_id, header.queue, header.priority, seq)
            moved += 1
        return self.next_due()

    def next_due(self):
        cursor = self.txn.cursor(db=self.db["scheduled"])
        return _DUE.unpack(cursor.key())[0] / 1e6 if cursor.first() else None

    # -- leases ----------------------------------------------------------------------------
    def lease(self, task_id, token, node, now):
        self.dirty = True
        self.txn.put(task_id.encode(), _LEASE.pack(token, us(now)) + node.encode(), db=self.db["leases"])

    def get_lease(self, task_id):
        value = self.txn.get(task_id.encode(), db=self.db["leases"])
        return None if value is None else _parse_lease(task_id.encode(), value)

    def is_known(self, task_id):
        key = task_id.encode()
        return (self.txn.get(key, db=self.db["tasks"]) is not None
                or self.txn.get(key, db=self.db["results"]) is not None
                or self.txn.get(key, db=self.db["waiting"]) is not None)

    def set_rate_mark(self, name, next_free):
        """Remember when the next task of a rate-limited type may start (survives a restart)."""
        self.dirty = True
        self.txn.put(_RATE_PREFIX + name.encode(), _F64.pack(next_free), db=self.db["meta"])

    def drop_lease(self, task_id):
        if self.txn.delete(task_id.encode(), db=self.db["leases"]):
            self.dirty = True

    def has_lease(self, task_id):
        return self.txn.get(task_id.encode(), db=self.db["leases"]) is not None


__all__ = ["Store", "Batch", "Lease", "split_record", "join_record"]
