"""The broker's table of worker nodes and their pool processes. Pure logic, clock passed in.

A *node* is one worker supervisor: it heartbeats, and its liveness is the liveness of every lease
its pool processes hold (Paranoid Pirate, not a visibility timeout). A *slot* is one pool process
of a node: it has its own socket, receives tasks and sends results directly, and has credit for
``capacity`` deliveries at a time (one running plus prefetch). Slots never heartbeat for liveness;
a node that falls silent takes all its slots with it.
"""


class Node:
    __slots__ = ("identity", "node_id", "queues", "slots", "last_seen", "last_sent", "info", "running",
                 "leaving")

    def __init__(self, identity, node_id, queues, now, info=None):
        self.identity = identity
        self.node_id = node_id
        self.queues = tuple(queues)
        #: pool index -> Slot
        self.slots = {}
        self.last_seen = now
        self.last_sent = now
        self.info = info or {}
        #: delivery tokens its pool processes are running (from READY and node heartbeats)
        self.running = set()
        #: evicted or gone: its leases are being requeued and it gets no more work
        self.leaving = False

    def leases(self):
        return [(slot, token, task_id) for slot in self.slots.values()
                for token, task_id in slot.leases.items()]

    def __repr__(self):
        return f"<Node {self.node_id} slots={len(self.slots)}>"


#: Tasks that ran in less than this (seconds, as the pool process measured) may widen the window...
SHORT_TASK = 0.002
#: ...tasks that ran longer than this shrink it back to the process's own capacity.
LONG_TASK = 0.02
#: The widest window, as a multiple of the capacity the process asked for.
MAX_WINDOW_FACTOR = 4


class Slot:
    """One pool process, addressed by the routing id of its current socket.

    Its credit is ``window - held``. The window starts at the capacity the process joined with
    (one running plus ``worker_prefetch_multiplier - 1`` prefetched) and adapts to task length:
    when dispatch had to leave ready work behind because the process had no credit, and the
    results it then sends were of tasks under ``SHORT_TASK``, it ran dry faster than the broker
    commits (an fsync takes longer than such tasks): the window doubles, up to
    ``MAX_WINDOW_FACTOR`` times the capacity. A task longer than ``LONG_TASK`` puts it back at
    the capacity at once. Prefetch thus stays small
    in *time*: a wide window only ever holds tasks that each took a couple of milliseconds.
    """

    __slots__ = ("identity", "node", "index", "key", "capacity", "leases", "leaving", "window", "limited",
                 "settles", "settle_due")

    def __init__(self, identity, node, index, capacity):
        self.identity = identity
        self.node = node
        self.index = index
        #: stable name of this pool position, recorded in leases so a restarted broker can
        #: hand them back to the process that re-joins in the same place
        self.key = f"{node.node_id}/{index}"
        self.capacity = capacity
        #: token -> task id of every delivery this process holds
        self.leases = {}
        #: died or unreachable: no more work for it
        self.leaving = False
        #: deliveries it may hold at once (see the class docstring)
        self.window = capacity
        #: since its last results, dispatch left ready work behind because it had no credit
        self.limited = False
        #: tokens of committed results not yet confirmed with SETTLED (they ride on the next
        #: TASK to this process, or leave at ``settle_due``, see DeferredSettles)
        self.settles = []
        self.settle_due = None

    @property
    def credit(self):
        return self.window - len(self.leases)

    def observe(self, runtime):
        """Adapt the window after settled results whose longest task ran ``runtime`` seconds."""
        if runtime > LONG_TASK:
            self.window = self.capacity
        elif self.limited and runtime < SHORT_TASK:
            self.window = min(self.window * 2, self.capacity * MAX_WINDOW_FACTOR)
        self.limited = False

    @property
    def queues(self):
        return self.node.queues

    def __repr__(self):
        return f"<Slot {self.key} {len(self.leases)}/{self.capacity}>"


#: Seconds a SETTLED may wait to ride along in the next TASK to the same pool process (one
#: message and one wake-up of that process per task instead of two). A process resends a result
#: that stays unsettled for three heartbeats, far longer.
SETTLE_DELAY = 0.05


class DeferredSettles:
    """SETTLED confirmations held back until a TASK goes to the same process, or ``delay``.

    Only committed results are held here (the broker adds them after its commit), so sending
    them later never confirms anything that is not stored. A process that is leaving gets its
    confirmations at once: it waits for them before it exits.
    """

    def __init__(self, workers, delay=SETTLE_DELAY):
        self.workers = workers
        self.delay = delay
        self.pending = set()   # slots with tokens held back
        #: earliest ``settle_due`` of a pending slot (a loop timer), or None
        self.next_due = None

    def add(self, settled, now):
        """``settled``: slot -> tokens whose results were just committed."""
        for slot, tokens in settled.items():
            if not slot.settles:
                slot.settle_due = now + self.delay
                self.pending.add(slot)
            slot.settles += tokens
        if settled:
            self._update()

    def take(self, identity):
        """The tokens held for the process on ``identity`` (now sent with its TASK), maybe none."""
        slot = self.workers.slots.get(identity)
        if slot is None or not slot.settles:
            return []
        tokens, slot.settles, slot.settle_due = slot.settles, [], None
        self.pending.discard(slot)
        self._update()
        return tokens

    def due(self, now):
        """(identity, tokens) of the SETTLED messages to send now: those that waited ``delay``,
        and any for a process that is leaving or already gone from the table (no TASK will go
        to it to carry them; a retiring process waits for them before it exits)."""
        if not self.pending:
            return []
        out = []
        for slot in list(self.pending):
            if (slot.settle_due <= now or slot.leaving
                    or self.workers.slots.get(slot.identity) is not slot):
                out.append((slot.identity, slot.settles))
                slot.settles, slot.settle_due = [], None
                self.pending.discard(slot)
        if out:
            self._update()
        return out

    def _update(self):
        self.next_due = min((s.settle_due for s in self.pending), default=None)


class WorkerTable:
    def __init__(self, heartbeat_interval, liveness):
        self.heartbeat_interval = heartbeat_interval
        #: silence (seconds) after which a node is declared dead and its leases redelivered
        self.timeout = heartbeat_interval * liveness
        self.nodes = {}       # identity -> Node
        self.by_node_id = {}  # node id -> Node
        self.slots = {}       # identity -> Slot

    def __len__(self):
        return len(self.nodes)

    def node(self, identity):
        return self.nodes.get(identity)

    def slot(self, identity):
        return self.slots.get(identity)

    def node_by_id(self, node_id):
        return self.by_node_id.get(node_id)

    def slot_by_key(self, key):
        """The live slot recorded in a lease as ``node id/index``, or None."""
        node_id, _, index = key.rpartition("/")
        node = self.by_node_id.get(node_id)
        return node.slots.get(int(index)) if node is not None and index.isdigit() else None

    def register(self, identity, node_id, queues, now, info=None):
        """Add a node. If the node id is known (it reconnected on a new socket), the old entry is
        removed and returned so the caller can settle its slots' leases."""
        previous = self.by_node_id.get(node_id)
        if previous is not None:
            self.remove(previous)
        renamed = self.nodes.get(identity)
        if renamed is not None:  # this socket registered before under another node id
            self.remove(renamed)
        node = Node(identity, node_id, queues, now, info)
        self.nodes[identity] = node
        self.by_node_id[node_id] = node
        return node, previous

    def join(self, identity, node, index, capacity):
        """Attach a pool process to its node; returns (slot, the slot it replaces or None)."""
        previous = node.slots.get(index)
        if previous is not None:
            self.slots.pop(previous.identity, None)
        slot = Slot(identity, node, index, capacity)
        node.slots[index] = slot
        self.slots[identity] = slot
        return slot, previous

    def remove(self, node):
        if self.nodes.get(node.identity) is node:
            del self.nodes[node.identity]
        if self.by_node_id.get(node.node_id) is node:
            del self.by_node_id[node.node_id]
        for slot in node.slots.values():
            if self.slots.get(slot.identity) is slot:
                del self.slots[slot.identity]

    def remove_slot(self, slot):
        self.slots.pop(slot.identity, None)
        if slot.node.slots.get(slot.index) is slot:
            del slot.node.slots[slot.index]

    def expired(self, now):
        """Nodes silent for longer than the liveness timeout (dead, frozen, or cut off)."""
        return [node for node in self.nodes.values() if now - node.last_seen > self.timeout]

    def heartbeat_due(self, now):
        """Nodes we have sent nothing to for a heartbeat interval (they judge our liveness too)."""
        return [node for node in self.nodes.values() if now - node.last_sent >= self.heartbeat_interval]

    def with_credit(self, queue_has_work, change=None):
        """Slots that can take more work from a non-empty queue, most free credit first.

        ``change`` maps a slot to credit gained or spent since ``slot.leases`` was last updated
        (results settled and tasks delivered in the broker's current iteration)."""
        change = change or {}
        slots = [s for s in self.slots.values()
                 if s.credit + change.get(s, 0) > 0 and not s.leaving and not s.node.leaving
                 and any(queue_has_work(q) for q in s.node.queues)]
        slots.sort(key=lambda s: s.credit + change.get(s, 0), reverse=True)
        return slots

    def next_deadline(self, now):
        """Seconds until the next heartbeat or eviction check is due (poll timeout)."""
        if not self.nodes:
            return self.heartbeat_interval
        soonest = min(min(n.last_sent + self.heartbeat_interval, n.last_seen + self.timeout)
                      for n in self.nodes.values())
        return max(0.0, soonest - now)
