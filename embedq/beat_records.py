"""Periodic entries in the store (beat.py's state). A mixin of :class:`embedq.store.Batch`.

    beat       entry name  -> hlen u32 | entry JSON | args payload

The entry JSON holds the schedule, the task header template and the run state (last and next
slot); it is rewritten in the transaction that enqueues the run it produces (docs/storage.md).
"""

from .records import join_record, split_record


class BeatRecords:
    def beat_entry(self, name):
        """(entry JSON, payload) of a periodic entry, or None."""
        value = self.txn.get(name.encode(), db=self.db["beat"])
        return None if value is None else split_record(value)

    def put_beat_entry(self, name, entry, payload):
        self.dirty = True
        self.txn.put(name.encode(), join_record(entry, payload), db=self.db["beat"])

    def delete_beat_entry(self, name):
        self.dirty = True
        return self.txn.delete(name.encode(), db=self.db["beat"])

    def beat_names(self):
        return [key.decode() for key in self.txn.cursor(db=self.db["beat"]).iternext(values=False)]
