"""``embedq.peers.WorkerTable``: nodes, their pool-process slots, credit and liveness.

The table is pure logic: every method that depends on time takes ``now`` (a plain float here),
so eviction and heartbeat timing are exact and no test sleeps.
"""

import pytest

from embedq.peers import Node, Slot, WorkerTable

pytestmark = pytest.mark.timeout(60)

HEARTBEAT = 0.5
LIVENESS = 3
TIMEOUT = HEARTBEAT * LIVENESS  # 1.5 s of silence evicts a node


@pytest.fixture
def table():
    return WorkerTable(HEARTBEAT, LIVENESS)


def register(table, identity, node_id, now=0.0, queues=("celery",), info=None):
    return table.register(identity, node_id, list(queues), now, info)


def node_with_slots(table, name, count=2, capacity=2, now=0.0, queues=("celery",)):
    node, _ = register(table, f"n:{name}".encode(), name, now=now, queues=queues)
    slots = [table.join(f"p:{name}/{i}".encode(), node, i, capacity)[0] for i in range(count)]
    return node, slots


# -- nodes -------------------------------------------------------------------------------------
def test_register_indexes_by_identity_and_node_id(table):
    node, previous = register(table, b"n:1", "node-1", now=10.0, queues=["a", "b"],
                              info={"pid": 42})
    assert previous is None
    assert isinstance(node, Node)
    assert table.node(b"n:1") is node and table.node_by_id("node-1") is node
    assert len(table) == 1
    assert (node.identity, node.node_id, node.queues) == (b"n:1", "node-1", ("a", "b"))
    assert node.last_seen == node.last_sent == 10.0
    assert node.slots == {} and node.leases() == [] and node.running == set()
    assert node.info == {"pid": 42}
    assert table.node(b"other") is None and table.node_by_id("other") is None
    assert table.slot(b"n:1") is None  # a node is not a slot


def test_same_node_id_on_a_new_socket_replaces_the_old_entry(table):
    old, [slot, _] = node_with_slots(table, "node")
    slot.leases[7] = "task-7"
    new, previous = register(table, b"n:node:new-socket", "node", now=5.0)
    assert previous is old  # returned, so the caller can deal with its slots' leases
    assert previous.leases() == [(slot, 7, "task-7")]
    assert table.node(b"n:node") is None and table.node(b"n:node:new-socket") is new
    assert table.node_by_id("node") is new and len(table) == 1
    # the old node's pool processes are gone from the table until they join the new entry
    assert table.slot(b"p:node/0") is None and table.slot(b"p:node/1") is None
    assert new.slots == {}


def test_same_identity_and_node_id_registering_again(table):
    first, _ = register(table, b"s", "n", now=0.0)
    second, previous = register(table, b"s", "n", now=1.0)
    assert previous is first and second is not first
    assert table.node(b"s") is second and len(table) == 1


def test_distinct_nodes_coexist_and_remove_takes_their_slots(table):
    a, a_slots = node_with_slots(table, "a")
    b, b_slots = node_with_slots(table, "b")
    assert len(table) == 2
    table.remove(a)
    assert table.node(b"n:a") is None and table.node_by_id("a") is None
    assert all(table.slot(s.identity) is None for s in a_slots)
    assert all(table.slot(s.identity) is s for s in b_slots)
    assert table.node(b"n:b") is b and len(table) == 1


def test_remove_of_a_replaced_entry_does_not_drop_its_successor(table):
    old, _ = register(table, b"s1", "n")
    new, _ = register(table, b"s2", "n")
    table.remove(old)  # e.g. a late eviction of the old socket's entry
    assert table.node_by_id("n") is new and table.node(b"s2") is new


def test_one_socket_registering_under_another_node_id(table):
    """A socket that registers again under a new node id: the old node is gone from the table
    (the broker requeues its processes' leases first), and the new one is not disturbed later."""
    first, [s0, s1] = node_with_slots(table, "node-a")
    s0.leases[1] = "task-1"
    second, previous = register(table, b"n:node-a", "node-b")
    assert previous is None  # not the same node: nothing to carry over
    assert table.node(b"n:node-a") is second and table.node_by_id("node-b") is second
    assert table.node_by_id("node-a") is None and len(table) == 1
    assert table.slot(s0.identity) is None and table.slot(s1.identity) is None
    assert table.expired(1e9) == [second]  # the old node is not lingering anywhere
    assert table.with_credit(lambda q: True) == []  # nor are its processes
    # node-a coming back from another socket must not unregister node-b's socket
    third, previous = register(table, b"n:node-a:again", "node-a")
    assert previous is None
    assert table.node(b"n:node-a") is second and table.node(b"n:node-a:again") is third
    assert len(table) == 2


def test_removing_a_stale_node_spares_the_new_owner_of_its_identity(table):
    first, _ = register(table, b"sock", "a")
    second, _ = register(table, b"sock", "b")
    table.remove(first)  # e.g. an eviction decided before the rename
    assert table.node(b"sock") is second and table.node_by_id("b") is second


def test_leaving_nodes_and_slots_get_no_work(table):
    node, [s0, s1] = node_with_slots(table, "n")
    s0.leaving = True  # died or unreachable: its leases are being requeued
    assert table.with_credit(lambda q: True) == [s1]
    node.leaving = True  # evicted or left
    assert table.with_credit(lambda q: True) == []


# -- slots (pool processes) --------------------------------------------------------------------
def test_join_attaches_a_slot_to_its_node(table):
    node, _ = register(table, b"n", "node", queues=["q1", "q2"])
    slot, previous = table.join(b"p0", node, 0, 3)
    assert previous is None and isinstance(slot, Slot)
    assert table.slot(b"p0") is slot and node.slots == {0: slot}
    assert (slot.identity, slot.node, slot.index, slot.capacity) == (b"p0", node, 0, 3)
    assert slot.key == "node/0"  # the holder name recorded in leases
    assert slot.queues == ("q1", "q2")  # a slot consumes its node's queues
    assert slot.leases == {} and slot.credit == 3
    assert table.node(b"p0") is None and len(table) == 1  # slots are not nodes


def test_rejoin_on_a_new_socket_replaces_the_slot(table):
    node, _ = register(table, b"n", "node")
    old, _ = table.join(b"p0-old", node, 0, 2)
    old.leases[5] = "t5"
    new, previous = table.join(b"p0-new", node, 0, 2)
    assert previous is old and previous.leases == {5: "t5"}
    assert new.leases == {}  # what it keeps is for the caller to adopt
    assert table.slot(b"p0-old") is None and table.slot(b"p0-new") is new
    assert node.slots == {0: new}


def test_rejoin_on_the_same_socket(table):
    node, _ = register(table, b"n", "node")
    old, _ = table.join(b"p0", node, 0, 2)
    new, previous = table.join(b"p0", node, 0, 4)
    assert previous is old and table.slot(b"p0") is new and new.capacity == 4


def test_remove_slot(table):
    node, [s0, s1] = node_with_slots(table, "node")
    table.remove_slot(s0)
    assert table.slot(s0.identity) is None and node.slots == {1: s1}
    table.remove_slot(s0)  # twice is harmless
    replaced, _ = table.join(b"p:node/1:new", node, 1, 2)
    table.remove_slot(s1)  # a stale slot: must not remove its successor
    assert node.slots == {1: replaced} and table.slot(b"p:node/1:new") is replaced


def test_node_leases_lists_every_slot(table):
    node, [s0, s1] = node_with_slots(table, "node")
    s0.leases.update({1: "a", 2: "b"})
    s1.leases[3] = "c"
    assert sorted((s.index, t, tid) for s, t, tid in node.leases()) == [
        (0, 1, "a"), (0, 2, "b"), (1, 3, "c")]


def test_reprs():
    node = Node(b"n", "node", ["q"], 0.0)
    slot = Slot(b"p", node, 2, 3)
    slot.leases[1] = "t"
    node.slots[2] = slot
    assert repr(node) == "<Node node slots=1>"
    assert repr(slot) == "<Slot node/2 1/3>"


# -- credit ------------------------------------------------------------------------------------
def test_credit_is_capacity_minus_held_leases(table):
    _, [slot] = node_with_slots(table, "n", count=1, capacity=4)
    assert slot.credit == 4
    slot.leases.update({1: "a", 2: "b", 3: "c"})
    assert slot.credit == 1
    slot.leases[4] = "d"
    assert slot.credit == 0
    slot.leases.pop(1)
    assert slot.credit == 1


def test_with_credit_filters_and_orders_slots_by_free_credit(table):
    _, [small] = node_with_slots(table, "small", count=1, capacity=2)
    _, [big] = node_with_slots(table, "big", count=1, capacity=8)
    _, [full] = node_with_slots(table, "full", count=1, capacity=1)
    full.leases[1] = "x"
    _, [other] = node_with_slots(table, "other", count=1, capacity=20, queues=["elsewhere"])
    assert table.with_credit(lambda queue: queue == "celery") == [big, small]
    big.leases.update({i: str(i) for i in range(10, 17)})  # big has 1 credit left
    assert table.with_credit(lambda queue: queue == "celery") == [small, big]
    assert table.with_credit(lambda queue: False) == []
    assert table.with_credit(lambda queue: True)[0] is other


def test_with_credit_considers_every_queue_of_the_node(table):
    _, [slot] = node_with_slots(table, "n", count=1, queues=["a", "b"])
    assert table.with_credit(lambda q: q == "b") == [slot]
    assert table.with_credit(lambda q: q == "c") == []


def test_with_credit_ties_keep_join_order(table):
    _, slots = node_with_slots(table, "n", count=4, capacity=3)
    assert table.with_credit(lambda q: True) == slots


def test_a_node_without_slots_takes_no_work(table):
    register(table, b"n", "lonely")
    assert table.with_credit(lambda q: True) == []


# -- liveness ----------------------------------------------------------------------------------
def test_timeout_is_heartbeat_times_liveness(table):
    assert table.timeout == pytest.approx(TIMEOUT)
    assert WorkerTable(0.2, 3).timeout == pytest.approx(0.6)


def test_expiry_after_heartbeat_times_liveness_of_silence(table):
    node, _ = register(table, b"i", "n", now=100.0)
    assert table.expired(100.0) == []
    assert table.expired(100.0 + TIMEOUT) == []          # exactly at the limit: still alive
    assert table.expired(100.0 + TIMEOUT + 1e-6) == [node]
    node.last_seen = 101.0                               # any message renews liveness
    assert table.expired(100.0 + TIMEOUT + 1e-6) == []
    assert table.expired(101.0 + TIMEOUT + 1e-6) == [node]


def test_expired_lists_only_silent_nodes_and_never_slots(table):
    quiet, _ = node_with_slots(table, "quiet")
    chatty, _ = node_with_slots(table, "chatty")
    chatty.last_seen = 1.0
    assert table.expired(1.6) == [quiet]
    assert chatty not in table.expired(2.4)
    assert set(map(id, table.expired(2.6))) == {id(quiet), id(chatty)}


def test_expired_does_not_remove(table):
    node, _ = register(table, b"i", "n", now=0.0)
    assert table.expired(10.0) == [node]
    assert table.node(b"i") is node  # the broker removes it after requeueing its leases


def test_sending_does_not_renew_liveness(table):
    node, _ = register(table, b"i", "n", now=0.0)
    node.last_sent = 1.4  # we keep talking to it; it says nothing
    assert table.expired(1.6) == [node]


def test_heartbeat_due_after_one_interval_without_sending(table):
    node, _ = node_with_slots(table, "n", now=0.0)
    assert table.heartbeat_due(HEARTBEAT - 0.01) == []
    assert table.heartbeat_due(HEARTBEAT) == [node]       # due at exactly one interval; nodes only
    node.last_sent = HEARTBEAT                            # something went out to it
    assert table.heartbeat_due(HEARTBEAT * 1.5) == []
    assert table.heartbeat_due(HEARTBEAT * 2) == [node]


def test_heartbeat_due_ignores_what_the_node_sent(table):
    node, _ = register(table, b"i", "n", now=0.0)
    node.last_seen = 0.4  # hearing from it does not mean it heard from us
    assert table.heartbeat_due(0.5) == [node]


# -- next deadline (the broker's poll timeout) -------------------------------------------------
def test_next_deadline_without_nodes_is_one_heartbeat(table):
    assert table.next_deadline(123.0) == HEARTBEAT


def test_next_deadline_is_the_soonest_heartbeat_or_eviction(table):
    node, _ = register(table, b"i", "n", now=10.0)
    assert table.next_deadline(10.0) == pytest.approx(HEARTBEAT)      # heartbeat at 10.5
    node.last_sent = 11.0                                             # heartbeat now 11.5
    assert table.next_deadline(11.0) == pytest.approx(0.5)            # eviction check at 11.5
    node.last_sent = 11.4                                             # heartbeat at 11.9
    assert table.next_deadline(11.0) == pytest.approx(0.5)            # eviction at 11.5 first
    node.last_seen = 11.2                                             # eviction at 12.7
    assert table.next_deadline(11.0) == pytest.approx(0.9)            # heartbeat at 11.9


def test_next_deadline_takes_the_soonest_node_and_never_goes_negative(table):
    a, _ = register(table, b"a", "a", now=0.0)
    register(table, b"b", "b", now=0.3)
    assert table.next_deadline(0.3) == pytest.approx(0.2)  # a's heartbeat at 0.5
    assert table.next_deadline(7.0) == 0.0                 # overdue: poll without waiting
    table.remove(a)
    assert table.next_deadline(0.3) == pytest.approx(0.5)  # b's heartbeat at 0.8


def test_window_widens_for_a_credit_bound_process_with_short_tasks_and_snaps_back_for_a_long_one():
    from embedq.peers import LONG_TASK, MAX_WINDOW_FACTOR, SHORT_TASK, Node, Slot

    slot = Slot(b"p", Node(b"n", "node", ["q"], 0.0), 0, capacity=4)
    assert slot.credit == 4
    slot.observe(SHORT_TASK / 2)                # short, but no work was left behind: no change
    assert slot.window == 4
    slot.limited = True
    slot.observe(SHORT_TASK / 2)
    assert slot.window == 8 and not slot.limited
    for _ in range(10):
        slot.limited = True
        slot.observe(SHORT_TASK / 2)
    assert slot.window == 4 * MAX_WINDOW_FACTOR and slot.credit == 16
    slot.limited = True
    slot.observe((SHORT_TASK + LONG_TASK) / 2)  # in between: keep the window
    assert slot.window == 16
    slot.leases.update({1: "a", 2: "b"})
    slot.observe(LONG_TASK * 2)
    assert slot.window == 4 and slot.credit == 2


# -- the broker's liveness pass ------------------------------------------------------------------
def test_broker_runs_its_liveness_pass_exactly_when_one_can_be_due(tmp_path):
    """The broker looks for silent nodes and owed heartbeats only at the earliest moment one can
    be due (a node's last seen/sent times only grow), and sleeps until then, not past it."""
    import zmq

    from embedq import protocol as P
    from embedq.broker import Broker

    mono = [100.0]
    context = zmq.Context()
    broker = Broker(str(tmp_path / "data"), "tcp://127.0.0.1:0", durability="process",
                    heartbeat=HEARTBEAT, liveness=LIVENESS, monotonic=lambda: mono[0], context=context)
    node = context.socket(zmq.DEALER)
    node.setsockopt(zmq.LINGER, 0)
    node.connect(broker.endpoint)

    def received():
        broker.poll_once(max_wait=0)
        return [node.recv_multipart()[1] for _ in range(10) if node.poll(50)]

    try:
        node.send_multipart([P.PROTOCOL, P.READY, P.encode({"node": "n1", "queues": ["celery"], "running": []})])
        while not node.poll(0):
            broker.poll_once(max_wait=0.05)
        assert node.recv_multipart()[1] == P.WELCOME
        assert broker._next_timer() == pytest.approx(HEARTBEAT)  # until the heartbeat it owes
        mono[0] += HEARTBEAT * 0.9
        assert received() == []
        mono[0] += HEARTBEAT * 0.1
        assert received() == [P.HEARTBEAT]
        assert broker._next_timer() == pytest.approx(HEARTBEAT)
        mono[0] += TIMEOUT - HEARTBEAT  # silent for exactly the liveness timeout: not yet
        assert received() == [P.HEARTBEAT] and len(broker.leasing.workers) == 1
        mono[0] += 0.01
        assert received() == []  # evicted before any heartbeat is owed to it
        assert len(broker.leasing.workers) == 0, "the silent node was not evicted"
    finally:
        node.close(linger=0)
        broker.close()
        context.destroy(linger=0)
