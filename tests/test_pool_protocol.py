"""The broker's side of RELEASE and of LOST with kind "time-limit", spoken by hand against a real
broker process (the raw peers and fixtures of test_protocol.py), and the autoscale rule as pure
logic with a fake clock."""

import pickle

import pytest

import embedq
from embedq import protocol as P
from embedq import serialize, states
from embedq.autoscale import GROW, Autoscaler, Load, parse
from embedq.limits import time_limit_result

from raw_peers import add_task, success_result, wait_for_state

pytestmark = pytest.mark.timeout(60)


def test_release_requeues_at_once_and_leaving_stops_dispatch(peers, raw_worker, assert_serves):
    supervisor, pool = raw_worker(capacity=3)
    client = peers()
    client.submit(*[add_task(f"r-{i}", queue="raw") for i in range(3)])
    tokens = {}
    while len(tokens) < 3:
        token, raw, _ = pool.take_task()
        tokens[P.decode(raw)["id"]] = token
    # hand two back without leaving: they are requeued and, the process having credit, come back
    pool.command(P.RELEASE, P.encode({"tokens": [tokens["r-1"], tokens["r-2"], 999999],
                                      "leaving": False}))
    again = {P.decode(pool.take_task()[1])["id"] for _ in range(2)}
    assert again == {"r-1", "r-2"}
    # leaving: what it names is requeued and it gets nothing more, so a new process takes it
    pool.command(P.RELEASE, P.encode({"tokens": [tokens["r-0"]], "leaving": True}))
    wait_for_state(client, "r-0", states.PENDING)
    assert pool.try_recv(0.3) is None
    other = peers()
    other.join(index=1, capacity=3)
    token, raw, _ = other.take_task()
    assert P.decode(raw)["id"] == "r-0" and token > tokens["r-0"]
    assert_serves()


def test_release_from_an_unknown_peer_is_refused(peers, assert_serves):
    stranger = peers()
    stranger.command(P.RELEASE, P.encode({"tokens": [1], "leaving": True}))
    stranger.expect_disconnect("unknown peer")
    assert_serves()


def lost_time_limit(index, token, task_id):
    info = P.encode({"index": index, "running": token, "kind": P.LOST_TIME_LIMIT,
                     "reason": "time limit (1s) exceeded"})
    return (info, *time_limit_result(token, task_id, "testapp.add", 1, 0.0, 4242))


def test_lost_time_limit_settles_the_running_task_and_requeues_the_rest(peers, raw_worker,
                                                                         assert_serves, app):
    supervisor, pool = raw_worker(capacity=2)
    client = peers()
    client.submit(add_task("slow", queue="raw"), add_task("behind", queue="raw"))
    tokens = {}
    while len(tokens) < 2:
        token, raw, _ = pool.take_task()
        tokens[P.decode(raw)["id"]] = token
    supervisor.command(P.LOST, *lost_time_limit(0, tokens["slow"], "slow"))
    wait_for_state(client, "slow", states.FAILURE)
    assert client.state("behind") == states.PENDING  # prefetched: requeued, not failed
    with pytest.raises(embedq.TimeLimitExceeded):
        app.AsyncResult("slow").get(timeout=10)
    # the replacement process gets only the requeued one; the timed-out task is not redelivered
    successor = peers()
    successor.join(index=0, capacity=2)
    token, raw, _ = successor.take_task()
    assert P.decode(raw)["id"] == "behind"
    assert successor.try_recv(0.3) is None
    assert_serves()


def test_lost_time_limit_with_a_stale_token_is_an_ordinary_lost(peers, raw_worker, assert_serves):
    supervisor, pool = raw_worker()
    client = peers()
    client.submit(add_task("finished-first", queue="raw"))
    token, _, _ = pool.take_task()
    pool.command(P.RESULT, *success_result("finished-first", token, 5))
    assert pool.expect(P.SETTLED) == [str(token).encode()]
    assert P.decode(client.expect(P.RESULT)[0])["state"] == states.SUCCESS  # pushed to the submitter
    # the supervisor killed it a moment too late: the stored SUCCESS stays
    supervisor.command(P.LOST, *lost_time_limit(0, token, "finished-first"))
    client.submit(add_task("next", queue="raw"))
    successor = peers()
    successor.join(index=0)
    assert P.decode(successor.take_task()[1])["id"] == "next"
    assert client.state("finished-first") == states.SUCCESS
    assert_serves()


def test_time_limit_result_is_a_failure_the_client_rebuilds():
    raw, payload = time_limit_result(7, "t", "testapp.add", 2.5, 100.0, 4242)
    header = P.decode(raw)
    parsed = P.ResultHeader.parse(raw)
    assert (parsed.id, parsed.token, parsed.state) == ("t", 7, states.FAILURE)
    assert header["exc_type"] == "embedq.errors.TimeLimitExceeded" and header["pid"] == 4242
    exc = serialize.loads_exception(payload, header)
    assert isinstance(exc, embedq.TimeLimitExceeded) and "2.5s" in str(exc)
    assert isinstance(pickle.loads(payload), embedq.TimeLimitExceeded)


# -- autoscale rule (pure) -------------------------------------------------------------------
def load(index, busy=True, waiting=0, idle_since=0.0, serving=True, ran=1, received=1,
         retiring=False):
    return Load(index, busy, waiting, idle_since, serving, ran, received, retiring)


def test_autoscale_grows_only_when_all_are_busy_and_work_waits():
    scaler = Autoscaler(3, 1, idle=5)
    assert scaler.decide([load(0, waiting=0)], 0) is None                  # busy, nothing waits
    assert scaler.decide([load(0, waiting=2), load(1, busy=False)], 0) is None  # one is free
    assert scaler.decide([load(0, waiting=2), load(1, serving=False)], 0) is None  # one starting
    assert scaler.decide([load(0, waiting=2, received=3)], 0) == GROW
    assert scaler.decide([load(i, waiting=1, received=3) for i in range(3)], 0) is None  # at max


def test_autoscale_retires_the_highest_idle_process_after_the_idle_time():
    scaler = Autoscaler(3, 1, idle=5)
    loads = [load(0, busy=False, idle_since=0), load(1, busy=False, idle_since=0),
             load(2, busy=False, idle_since=3)]
    assert scaler.decide(loads, 4.9) is None
    assert scaler.decide(loads, 5.0) == 1   # 2 has not been idle long enough
    assert scaler.decide(loads, 8.0) == 2
    assert scaler.decide(loads[:1], 100) is None  # never below the minimum
    assert scaler.decide([load(0, busy=False), load(1, busy=False, waiting=1)], 100) == 0
    assert scaler.decide([load(0, busy=False), load(1, busy=False, retiring=True)], 100) is None


def test_autoscale_stops_growing_when_a_new_process_found_nothing_to_do():
    scaler = Autoscaler(3, 1, idle=1)
    assert scaler.decide([load(0, waiting=3, received=4)], 0) == GROW
    # the new process never ran anything and idled out: growing did not help
    assert scaler.decide([load(0, waiting=3, received=4), load(1, busy=False, ran=0, received=0)], 2) == 1
    assert scaler.decide([load(0, waiting=3, received=4)], 3) is None
    # new deliveries arrive: work is flowing again, so growing may help
    assert scaler.decide([load(0, waiting=3, received=6)], 4) == GROW


def test_autoscale_spec():
    assert parse("10,3") == (10, 3)
    assert parse("3,10") == (10, 3)
    assert parse("4") == (4, 1)
    for bad in ("", "a,b", "1,2,3", "0", "-1,1"):
        with pytest.raises(ValueError):
            parse(bad)


def test_settled_rides_on_the_next_task_or_comes_alone_soon(peers, raw_worker, assert_serves):
    """SETTLED is deferred so a busy process gets one message per task: the tokens ride in the
    first frame of its next TASK, or come alone within the settle delay when no TASK follows.
    A TASK leaves before its iteration's commit, so it never carries a settle of that same
    iteration: only results already stored are confirmed."""
    supervisor, pool = raw_worker(capacity=1)
    client = peers()
    client.submit(*(add_task(name, queue="raw") for name in ("first", "second", "third")))
    token, raw, _ = pool.take_task()
    assert P.decode(raw)["id"] == "first"
    tokens, confirmed = [token], []

    def confirmations(frames):
        if frames[1] == P.SETTLED:
            return [int(t) for t in frames[2:]]
        return [int(t) for t in frames[2].split(b",")] if frames[2] else []

    for name, following in (("first", "second"), ("second", "third")):
        pool.command(P.RESULT, *success_result(name, tokens[-1], 5))
        frames = pool.recv(split_settled=False)  # as on the wire
        while frames[1] == P.SETTLED:  # (a slow moment: a held settle went alone)
            confirmed += confirmations(frames)
            frames = pool.recv(split_settled=False)
        assert frames[1] == P.TASK and P.decode(frames[4])["id"] == following
        assert tokens[-1] not in confirmations(frames), "confirmed before its commit"
        confirmed += confirmations(frames)
        tokens.append(int(frames[3]))
    assert tokens[0] in confirmed  # rode on the TASK of "third" (or came alone if slow)
    pool.command(P.RESULT, *success_result("third", tokens[-1], 5))
    while sorted(confirmed) != sorted(tokens):  # nothing left to ride on: SETTLED alone, soon
        confirmed += confirmations(pool.recv(timeout=2.0, split_settled=False))
    assert client.state("third") == states.SUCCESS
    assert_serves()


def test_submit_owners_route_each_result_to_its_own_socket(peers, raw_worker, assert_serves):
    """A client's group submit names, per task, the socket owed the result (``owners``)."""
    supervisor, pool = raw_worker(capacity=2)
    sender, owner = peers(), peers(identity=b"c:owner")
    owner.states("nothing")  # the broker routes to a socket only once it has heard from it
    sender.command(P.SUBMIT, P.encode({"req": 9, "owners": ["c:owner", None]}),
                   *add_task("theirs", queue="raw"), *add_task("mine", queue="raw"))
    assert P.decode(sender.expect(P.ACK)[0]) == {"req": 9, "ok": 2, "dup": []}
    for _ in range(2):
        token, raw, _ = pool.take_task()
        pool.command(P.RESULT, *success_result(P.decode(raw)["id"], token, 5))
    assert P.decode(owner.expect(P.RESULT)[0])["id"] == "theirs"
    assert P.decode(sender.expect(P.RESULT)[0])["id"] == "mine"
    assert owner.try_recv(0.3) is None and sender.try_recv(0.1) is None


@pytest.mark.parametrize("owners", [["a"], "c:x", [None, None, None], [7, None]])
def test_submit_with_bad_owners_is_refused_whole(peers, assert_serves, owners):
    client = peers()
    client.command(P.SUBMIT, P.encode({"req": 1, "owners": owners}),
                   *add_task("o-1", queue="raw"), *add_task("o-2", queue="raw"))
    client.expect_disconnect("owners" if not isinstance(owners, list) or len(owners) != 2 else "owner")
    assert client.states("o-1")["o-1"]["state"] == states.UNKNOWN  # nothing of it was stored
    assert_serves()
