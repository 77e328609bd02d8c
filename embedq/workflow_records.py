"""Workflow state in the store: tasks waiting for their parent, and chord counters.

A mixin of :class:`embedq.store.Batch`. Databases (see docs/storage.md)::

    waiting    id                     -> seq u64 | hlen u32 | header JSON | payload
               a chain's next step, a callback or a chord body, submitted with the workflow and
               activated (moved to ``tasks``) by the broker when its parent settles
    chords     chord id | 0x00 | b"n" -> remaining u32 | failed u8
               chord id | 0x00 | b"m" -> JSON list of the member (header tail) task ids, in order
               chord id | 0x00 | b"b" -> JSON list of the body's root task ids
"""

import json
import struct

_COUNTER = struct.Struct(">IB")
_SEQ = struct.Struct(">QI")


class WorkflowRecords:
    # -- waiting tasks ---------------------------------------------------------------------------
    def add_waiting(self, task_id, raw_header, payload):
        """Put-if-absent, like a submit: False if the id is known in any form."""
        key = task_id.encode()
        if self.is_known(task_id):
            return False
        seq = self.next_seq()
        return self.txn.put(key, _SEQ.pack(seq, len(raw_header)) + raw_header + payload,
                            db=self.db["waiting"], overwrite=False)

    def waiting(self, task_id):
        """(header, payload) of a waiting task, or None."""
        value = self.txn.get(task_id.encode(), db=self.db["waiting"])
        if value is None:
            return None
        _, hlen = _SEQ.unpack_from(value)
        return value[_SEQ.size:_SEQ.size + hlen], value[_SEQ.size + hlen:]

    def take_waiting(self, task_id):
        found = self.waiting(task_id)
        if found is not None:
            self.dirty = True
            self.txn.delete(task_id.encode(), db=self.db["waiting"])
        return found

    # -- chords ----------------------------------------------------------------------------------
    def add_chord(self, chord_id, members, body):
        key = chord_id.encode() + b"\0"
        if self.txn.get(key + b"n", db=self.db["chords"]) is not None:
            return False  # a resent submit
        self.dirty = True
        self.txn.put(key + b"n", _COUNTER.pack(len(members), 0), db=self.db["chords"])
        self.txn.put(key + b"m", json.dumps(members).encode(), db=self.db["chords"])
        self.txn.put(key + b"b", json.dumps(body).encode(), db=self.db["chords"])
        return True

    def chord_member_done(self, chord_id, failed):
        """Count one member's final result. Returns ``"complete"`` when the last member succeeded,
        ``"failed"`` the first time a member fails, else None (also for unknown chords)."""
        key = chord_id.encode() + b"\0n"
        value = self.txn.get(key, db=self.db["chords"])
        if value is None:
            return None
        remaining, already_failed = _COUNTER.unpack(value)
        remaining = max(0, remaining - 1)
        self.dirty = True
        self.txn.put(key, _COUNTER.pack(remaining, already_failed or failed), db=self.db["chords"])
        if already_failed:
            return None
        if failed:
            return "failed"
        return "complete" if remaining == 0 else None

    def chord(self, chord_id):
        """(member ids, body root ids) of a chord."""
        key = chord_id.encode() + b"\0"
        return (json.loads(self.txn.get(key + b"m", db=self.db["chords"])),
                json.loads(self.txn.get(key + b"b", db=self.db["chords"])))

    def drop_chord(self, chord_id):
        key = chord_id.encode() + b"\0"
        self.dirty = True
        for suffix in (b"n", b"m", b"b"):
            self.txn.delete(key + suffix, db=self.db["chords"])
