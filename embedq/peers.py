"""The broker's table of worker nodes: liveness, credit and the leases each holds. Pure logic.

The clock is passed in (``now``) so eviction and heartbeat timing are tested without sleeping.
A node is one worker supervisor; its lease on a task lives exactly as long as the node keeps
heartbeating (Paranoid Pirate liveness), not for a fixed visibility timeout.
"""


class WorkerNode:
    """One registered worker node, addressed by the routing id of its current socket."""

    __slots__ = ("identity", "node_id", "slots", "capacity", "queues", "leases", "last_seen",
                 "last_sent", "info")

    def __init__(self, identity, node_id, slots, capacity, queues, now, info=None):
        self.identity = identity
        self.node_id = node_id
        self.slots = slots
        #: most tasks the node may hold at once (running + prefetched)
        self.capacity = capacity
        self.queues = tuple(queues)
        #: token -> task id of every delivery the node holds
        self.leases = {}
        self.last_seen = now
        self.last_sent = now
        self.info = info or {}

    @property
    def credit(self):
        return self.capacity - len(self.leases)

    def __repr__(self):
        return f"<WorkerNode {self.node_id} {len(self.leases)}/{self.capacity}>"


class WorkerTable:
    def __init__(self, heartbeat_interval, liveness):
        self.heartbeat_interval = heartbeat_interval
        #: silence (seconds) after which a node is declared dead and its leases redelivered
        self.timeout = heartbeat_interval * liveness
        self.by_identity = {}
        self.by_node = {}

    def __len__(self):
        return len(self.by_identity)

    def __iter__(self):
        return iter(list(self.by_identity.values()))

    def get(self, identity):
        return self.by_identity.get(identity)

    def register(self, identity, node_id, slots, capacity, queues, now, info=None):
        """Add a node. A node id already present (the node reconnected on a new socket) replaces
        the old entry; the caller decides what to do with the old entry's leases."""
        previous = self.by_node.get(node_id)
        if previous is not None:
            self.remove(previous)
        node = WorkerNode(identity, node_id, slots, capacity, queues, now, info)
        self.by_identity[identity] = node
        self.by_node[node_id] = node
        return node, previous

    def remove(self, node):
        self.by_identity.pop(node.identity, None)
        if self.by_node.get(node.node_id) is node:
            del self.by_node[node.node_id]

    def seen(self, node, now):
        node.last_seen = now

    def expired(self, now):
        """Nodes silent for longer than the liveness timeout (dead, frozen, or cut off)."""
        return [node for node in self.by_identity.values() if now - node.last_seen > self.timeout]

    def heartbeat_due(self, now):
        """Nodes we have sent nothing to for a heartbeat interval (they judge our liveness too)."""
        return [node for node in self.by_identity.values()
                if now - node.last_sent >= self.heartbeat_interval]

    def with_credit(self, queue_has_work):
        """Nodes that can take more work from a non-empty queue, most free credit first."""
        nodes = [n for n in self.by_identity.values()
                 if n.credit > 0 and any(queue_has_work(q) for q in n.queues)]
        nodes.sort(key=lambda n: n.credit, reverse=True)
        return nodes

    def next_deadline(self, now):
        """Seconds until the next heartbeat or eviction check is due (poll timeout)."""
        if not self.by_identity:
            return self.heartbeat_interval
        soonest = min(min(n.last_sent + self.heartbeat_interval, n.last_seen + self.timeout)
                      for n in self.by_identity.values())
        return max(0.0, soonest - now)
