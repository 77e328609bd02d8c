"""What the store keeps about a task besides its place in a queue: outcomes and side records.

A mixin of :class:`embedq.store.Batch` (one write transaction), split out so that the queue
mechanics (store.py) and the records of how a task ended or is doing (here) each read in one
sitting. Databases (integers big-endian, see docs/storage.md)::

    results    id                      -> expires_us u64 | hlen u32 | header JSON | payload
    expiry     expires_us u64 | id     -> b""        result clean-up order
    progress   id                      -> state JSON  STARTED / RETRY / custom (update_state),
                                                      until the task settles
    revoked    id                      -> reason JSON a revoked task that was leased at the time:
                                                      settled REVOKED if it comes back unfinished
    dead       id                      -> rlen u32 | reason JSON | task record (as in ``tasks``)
                                          tasks that kept killing their workers (dead letters)
    expiring   expires_us u64 | id     -> b""        waiting tasks with an ``expires`` time
"""

import json
import struct

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def us(seconds):
    return int(seconds * 1_000_000)


def split_record(value, offset=0):
    """``len u32 | first | rest`` (at ``offset``) -> (first, rest)."""
    (length,) = _U32.unpack_from(value, offset)
    start = offset + 4
    return value[start:start + length], value[start + length:]


def _task_record(record):
    """``seq u64 | hlen u32 | header | payload`` (a ``tasks`` value) -> (header, payload)."""
    return split_record(record, 8)


def join_record(first, rest):
    return _U32.pack(len(first)) + first + rest


class OutcomeRecords:
    """Results, progress, revocations and dead letters (needs ``self.txn``, ``self.db``, ``self.store``)."""

    # -- results ---------------------------------------------------------------------------
    def settle(self, task_id, raw_header, payload, expires_at):
        """Store a final result and drop the task and everything about it, in this transaction."""
        self.dirty = True
        key = task_id.encode()
        txn, db = self.txn, self.db
        txn.delete(key, db=db["tasks"])
        txn.delete(key, db=db["leases"])
        if self.store.side_records:  # (two lookups fewer per task in a store that never had any)
            txn.delete(key, db=db["progress"])
            txn.delete(key, db=db["revoked"])
        expires = _U64.pack(us(expires_at) if expires_at is not None else 0)
        txn.put(key, expires + join_record(raw_header, payload), db=db["results"])
        if expires_at is not None:
            txn.put(expires + key, b"", db=db["expiry"])

    def result(self, task_id):
        value = self.txn.get(task_id.encode(), db=self.db["results"])
        return None if value is None else split_record(value, 8)

    def forget(self, task_id):
        """Drop a stored result and its expiry entry."""
        key = task_id.encode()
        value = self.txn.get(key, db=self.db["results"])
        if value is None:
            return False
        self.dirty = True
        self.txn.delete(value[:8] + key, db=self.db["expiry"])
        return self.txn.delete(key, db=self.db["results"])

    def expire_results(self, now, limit=1000):
        cursor = self.txn.cursor(db=self.db["expiry"])
        bound = _U64.pack(us(now))
        removed = 0
        if not cursor.first():
            return 0
        while removed < limit:
            key = cursor.key()
            if not key or key[:8] > bound:
                break
            self.dirty = True
            value = self.txn.get(key[8:], db=self.db["results"])
            if value is not None and value[:8] == key[:8]:  # not a newer result under that id
                self.txn.delete(key[8:], db=self.db["results"])
            cursor.delete()
            removed += 1
        return removed

    # -- progress (non-final states) ---------------------------------------------------------
    def set_progress(self, task_id, info):
        self.dirty = True
        self.store.side_records = True
        self.txn.put(task_id.encode(), json.dumps(info, separators=(",", ":")).encode(),
                     db=self.db["progress"])

    def progress(self, task_id):
        value = self.txn.get(task_id.encode(), db=self.db["progress"])
        return None if value is None else json.loads(value)

    def clear_progress(self, task_id):
        if self.txn.delete(task_id.encode(), db=self.db["progress"]):
            self.dirty = True

    # -- revocations of leased tasks ----------------------------------------------------------
    def mark_revoked(self, task_id, reason):
        self.dirty = True
        self.store.side_records = True
        self.txn.put(task_id.encode(), json.dumps(reason).encode(), db=self.db["revoked"])

    def revoked(self, task_id):
        """The reason a leased task was revoked, or None."""
        value = self.txn.get(task_id.encode(), db=self.db["revoked"])
        return None if value is None else json.loads(value)

    # -- dead letters --------------------------------------------------------------------------
    def bury(self, task_id, reason):
        """Move an unsettled task's record to ``dead`` (the caller then settles it FAILURE)."""
        key = task_id.encode()
        record = self.txn.get(key, db=self.db["tasks"])
        if record is None:
            return False
        self.dirty = True
        self.txn.put(key, join_record(json.dumps(reason).encode(), record), db=self.db["dead"])
        return True

    def dead_letters(self, limit=1000):
        """[(task id, reason dict, raw header)] oldest id first."""
        found = []
        for key, value in self.txn.cursor(db=self.db["dead"]):
            reason, record = split_record(value)
            found.append((key.decode(), json.loads(reason), _task_record(record)[0]))
            if len(found) >= limit:
                break
        return found

    def exhume(self, task_id):
        """Remove a dead letter; returns its (header, payload) for resubmission, or None."""
        key = task_id.encode()
        value = self.txn.get(key, db=self.db["dead"])
        if value is None:
            return None
        self.dirty = True
        self.txn.delete(key, db=self.db["dead"])
        _, record = split_record(value)
        return _task_record(record)

    # -- expiry of waiting tasks --------------------------------------------------------------
    def watch_expiry(self, task_id, expires):
        self.txn.put(_U64.pack(us(expires)) + task_id.encode(), b"", db=self.db["expiring"])

    def pop_expired(self, now, limit=1000):
        """Ids whose ``expires`` has passed (removed from the index). Returns (ids, next time)."""
        cursor = self.txn.cursor(db=self.db["expiring"])
        bound = _U64.pack(us(now))
        ids = []
        while cursor.first() and len(ids) < limit:
            key = cursor.key()
            if key[:8] > bound:
                return ids, _U64.unpack(key[:8])[0] / 1e6
            self.dirty = True
            ids.append(key[8:].decode())
            cursor.delete()
        return ids, self.next_expiry()

    def next_expiry(self):
        cursor = self.txn.cursor(db=self.db["expiring"])
        return _U64.unpack(cursor.key()[:8])[0] / 1e6 if cursor.first() else None
