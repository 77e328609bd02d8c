"""The store's map size and its cap: growing the LMDB map, and when to refuse submits.

A mixin of :class:`embedq.store.Store` (needs ``env``, ``db``, ``path``, ``max_size``). LMDB
fails a transaction that outgrows its map with MapFullError; the broker grows the map ahead of
that (``grow_to_fit``), doubles it after one (``grow``), and refuses submits with StorageFull
near ``broker_max_store_size`` (``refusal``) instead of failing in the middle of a commit. See
docs/storage.md, "Map growth and StorageFull".
"""

import logging

log = logging.getLogger(__name__)

#: Fraction of ``broker_max_store_size`` above which submits are refused with StorageFull.
FULL_THRESHOLD = 0.9
#: Grow the map before a transaction when more than this fraction of it is in use.
GROW_THRESHOLD = 0.6


class MapSpace:
    def grow_to_fit(self):
        info, stat = self.env.info(), self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        size = info["map_size"]
        while used > size * GROW_THRESHOLD and size < self.max_size:
            size = min(size * 2, self.max_size)
        if size != info["map_size"]:
            log.info("growing LMDB map to %d MiB", size >> 20)
            self.env.set_mapsize(size)

    def grow(self):
        """After MapFullError: double the map if under the cap. False means we are at the cap."""
        size = self.env.info()["map_size"]
        if size >= self.max_size:
            return False
        self.env.set_mapsize(min(size * 2, self.max_size))
        return True

    def refusal(self):
        """The StorageFull message if the store is near its cap, else False (pages counted only if high)."""
        psize = self.env.stat()["psize"]
        limit = self.max_size * FULL_THRESHOLD
        if (self.env.info()["last_pgno"] + 1) * psize <= limit:
            return False
        with self.env.begin() as txn:  # pages actually in use (freed pages are reused by LMDB)
            pages = 0
            for db in self.db.values():
                stat = txn.stat(db)
                pages += stat["leaf_pages"] + stat["branch_pages"] + stat["overflow_pages"]
        return self.cap_reached() if pages * psize > limit else False

    def cap_reached(self):
        return (f"broker store {self.path!r} is at its size cap ({self.max_size >> 20} MiB): let "
                "results expire or raise broker_max_store_size")
