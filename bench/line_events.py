"""Python line events per round trip in each process: a cost count the VM's speed does not move.

On this VM a timing drifts by up to 40% between consecutive runs; the number of Python lines a
round trip executes (``sys.settrace`` line events) does not. In situ, a process's CPU per round
trip divided by its line events comes to 0.5-0.7 µs (the C calls those lines make included). So this is the metric for small hot-path changes; confirm the sum with
``one_core.py`` in interleaved runs.

    python bench/line_events.py [--trips 300] [--top 25]

- **broker**: ``Broker.poll_once`` in this process over ``inproc://``, driven by raw peers (a
  client that submits one no-op task, a pool process that answers each TASK with a RESULT at
  once): two loop iterations per round trip. Only the broker's own calls are counted.
- **client**: ``noop.delay().get()`` in this thread, against an ``embedq.start()`` cluster.
- **pool process**: the ``PoolWorker`` loop of ``pool_cpu.py``, fed one task at a time by its fake
  broker (per task).
"""

import argparse
import collections
import os
import runpy
import shutil
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)


class LineEvents:
    """Counts line events and calls by (file, function) while ``tracing``."""

    def __init__(self):
        self.lines = collections.Counter()
        self.calls = collections.Counter()

    def _trace(self, frame, event, arg):
        key = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name)
        self.calls[key] += 1
        lines = self.lines

        def local(frame, event, arg):
            if event == "line":
                lines[key] += 1
            return local
        return local

    def tracing(self, function):
        def traced(*args, **kwargs):
            sys.settrace(self._trace)
            try:
                return function(*args, **kwargs)
            finally:
                sys.settrace(None)
        return traced

    def report(self, title, per, top):
        print(f"{title}: {sum(self.lines.values()) / per:.0f} line events, "
              f"{sum(self.calls.values()) / per:.0f} calls per round trip")
        for key, count in self.lines.most_common(top):
            print(f"  {count / per:6.1f} lines {self.calls[key] / per:5.1f} calls  {key[0]}:{key[1]}")


def broker_events(trips):
    import zmq

    import bench_tasks
    from embedq import protocol as P
    from embedq.broker import Broker
    from embedq.transport import receive_ready

    context = zmq.Context()
    workdir = tempfile.mkdtemp(prefix="embedq-lines-")
    broker = Broker(os.path.join(workdir, "data"), "inproc://broker", durability="process",
                    context=context)

    def dealer(identity):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect("inproc://broker")
        return sock

    node, pool, client = dealer(b"n:1"), dealer(b"p:n1/0/x"), dealer(b"c:1")
    node.send_multipart([P.PROTOCOL, P.READY, P.encode({"node": "n1", "queues": ["celery"], "running": []})])
    broker.poll_once(0.1)
    pool.send_multipart([P.PROTOCOL, P.JOIN, P.encode({"node": "n1", "index": 0, "capacity": 1, "held": []})])
    broker.poll_once(0.1)
    receive_ready(node)
    receive_ready(pool)
    events = LineEvents()
    poll_once = broker.poll_once

    def trip(i, traced):
        _, header, payload = bench_tasks.noop.build_message((), {})
        client.send_multipart([P.PROTOCOL, P.SUBMIT, b'{"req":%d}' % i, header, payload])
        traced(0)
        for frames in receive_ready(pool):
            if frames[1] == P.TASK:
                token, raw = int(frames[3]), frames[4]
                result = {"id": P.decode(raw)["id"], "token": token, "task": "bench_tasks.noop",
                          "state": "SUCCESS", "codec": "pickle", "date_done": 1.0, "runtime": 1e-5}
                pool.send_multipart([P.PROTOCOL, P.RESULT, P.encode(result), b"\x80\x04N."])
        traced(0)
        assert len(receive_ready(client)) == 2  # its ACK and its RESULT
        if i % 50 == 0:
            node.send_multipart([P.PROTOCOL, P.HEARTBEAT, b"{}"])

    for i in range(300):
        trip(i, poll_once)
    for i in range(300, 300 + trips):
        trip(i, events.tracing(poll_once))
    broker.close()
    context.destroy(linger=0)
    shutil.rmtree(workdir, ignore_errors=True)
    return events


def client_events(trips):
    import bench_tasks
    import embedq

    events = LineEvents()
    workdir = tempfile.mkdtemp(prefix="embedq-lines-")
    try:
        with embedq.start(bench_tasks.app, workers=2, data_dir=os.path.join(workdir, "data")):
            for _ in range(200):
                bench_tasks.noop.delay().get(timeout=10)

            def trips_of_the_client():
                for _ in range(trips):
                    bench_tasks.noop.delay().get(timeout=10)
            events.tracing(trips_of_the_client)()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return events


def pool_events(tasks):
    import embedq.pool as pool

    events = LineEvents()
    serve = pool.PoolWorker.serve
    pool.PoolWorker.serve = events.tracing(serve)
    argv = sys.argv
    sys.argv = ["pool_cpu.py", "--tasks", str(tasks)]
    try:
        runpy.run_path(os.path.join(BENCH_DIR, "pool_cpu.py"), run_name="__main__")
    finally:
        sys.argv, pool.PoolWorker.serve = argv, serve
    return events


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trips", type=int, default=300)
    parser.add_argument("--top", type=int, default=25, help="functions listed per process")
    args = parser.parse_args()
    totals = []
    for title, count in (("broker", broker_events), ("client", client_events), ("pool process", pool_events)):
        events = count(args.trips)
        events.report(title, args.trips, args.top)
        totals.append((sum(events.lines.values()), sum(events.calls.values())))
    print(f"all: {sum(t[0] for t in totals) / args.trips:.0f} line events, "
          f"{sum(t[1] for t in totals) / args.trips:.0f} calls per round trip")


if __name__ == "__main__":
    main()
