"""Broker CPU per task under a synthetic load: the broker alone, with little noise.

The broker (``embedq.broker.Broker``) runs in this process; raw peers in a subprocess play a
worker node with two pool processes that answer every TASK at once (running the real no-op
task through ``embedq.pool.execute``) and a client that keeps ``--in-flight`` tasks submitted,
``--batch`` per SUBMIT. The figure is the loop thread's CPU time (``time.thread_time``) per
task, which the VM's scheduling noise barely moves (wall-clock figures on it vary by 2x).

    python bench/broker_cpu.py [--tasks 10000] [--batch 1] [--in-flight 1] [--durability process]
                               [--sections] [--profile tottime]

``--in-flight 1`` is the round-trip pattern (two loop iterations per task); ``--sections``
times the parts of each loop iteration; ``--profile`` prints a cProfile of the loop.
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from harness import child_env  # noqa: E402  (needs the path above)


def peers(url, tasks, batch, in_flight):
    """Runs in the subprocess: node, two pool processes and a client on raw DEALER sockets."""
    import zmq

    import bench_tasks
    from embedq import protocol as P
    from embedq.pool import execute

    context = zmq.Context()

    def dealer():
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(url)
        return sock

    node = dealer()
    node.send_multipart([P.PROTOCOL, P.READY, P.encode({"node": "n1", "queues": ["celery"], "running": []})])
    node.recv_multipart()  # WELCOME
    pools = [dealer() for _ in range(2)]
    for index, pool in enumerate(pools):
        pool.send_multipart([P.PROTOCOL, P.JOIN, P.encode({"node": "n1", "index": index, "capacity": 4,
                                                           "held": []})])
    client = dealer()
    messages = [bench_tasks.noop.build_message((), {}) for _ in range(tasks)]
    poller = zmq.Poller()
    for sock in [*pools, client]:
        poller.register(sock, zmq.POLLIN)
    sent = acked = done = req = 0
    last_beat = 0.0
    while done < tasks:
        if time.monotonic() - last_beat > 0.1:
            node.send_multipart([P.PROTOCOL, P.HEARTBEAT, b"{}"])
            last_beat = time.monotonic()
        while sent < tasks and sent - done < in_flight and sent - acked < in_flight:
            req += 1
            frames = [P.PROTOCOL, P.SUBMIT, b'{"req":%d}' % req]
            for _, header, payload in messages[sent:sent + batch]:
                frames += (header, payload)
            client.send_multipart(frames)
            sent += len(frames) // 2 - 1
        for sock, _ in poller.poll(100):
            while sock.poll(0):
                frames = sock.recv_multipart()
                if sock is client and frames[1] == P.ACK:
                    acked += P.decode(frames[2])["ok"]
                elif sock is client and frames[1] == P.RESULT:
                    done += (len(frames) - 2) // 2
                elif frames[1] == P.TASK:
                    out = [P.PROTOCOL, P.RESULT]
                    body = frames[3:]  # (after the settled tokens)
                    for i in range(0, len(body), 3):
                        token, header, payload = body[i:i + 3]
                        result, value = execute(bench_tasks.app, int(token), P.decode(header), payload)
                        out += (P.encode(result), value)
                    sock.send_multipart(out)


def _time_sections(broker, totals):
    """Wrap the parts of a loop iteration so each adds its wall time to ``totals``."""
    import embedq.broker as B
    import embedq.store as S

    def timed(name, fn):
        clock = time.perf_counter

        def wrapper(*args, **kwargs):
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += clock() - started
        return wrapper

    broker._handle = timed("handle messages", broker._handle)
    broker._flush = timed("flush (send)", broker._flush)
    broker._next_timer = timed("next timer", broker._next_timer)
    broker.dispatcher.dispatch = timed("dispatch", broker.dispatcher.dispatch)
    broker.store.begin = timed("begin", broker.store.begin)
    broker.leasing.evict_silent = timed("evict check", broker.leasing.evict_silent)
    B.receive_ready = timed("receive", B.receive_ready)
    S.Batch.commit = timed("commit", S.Batch.commit)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=1, help="tasks per SUBMIT")
    parser.add_argument("--in-flight", type=int, default=1, help="tasks submitted, not yet done")
    parser.add_argument("--durability", choices=("process", "fsync"), default="process")
    parser.add_argument("--sections", action="store_true", help="time the parts of an iteration")
    parser.add_argument("--profile", metavar="SORT", help="cProfile the loop, sorted by SORT")
    parser.add_argument("--peers", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peers:
        return peers(args.peers, args.tasks, args.batch, args.in_flight)

    from embedq.broker import Broker

    workdir = tempfile.mkdtemp(prefix="embedq-broker-cpu-", dir=os.environ.get("BENCH_TMPDIR"))
    broker = Broker(os.path.join(workdir, "data"), f"ipc://{workdir}/broker.sock",
                    durability=args.durability)
    load = subprocess.Popen([sys.executable, __file__, "--peers", broker.endpoint, "--tasks", str(args.tasks),
                             "--batch", str(args.batch), "--in-flight", str(args.in_flight)], env=child_env())
    totals = collections.Counter()
    if args.sections:
        _time_sections(broker, totals)
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    cpu, wall, iterations = time.thread_time(), time.perf_counter(), 0
    try:
        while load.poll() is None:
            broker.poll_once(max_wait=0.05)
            iterations += 1
    finally:
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        if profile is not None:
            import pstats

            profile.disable()
            pstats.Stats(profile).strip_dirs().sort_stats(args.profile).print_stats(30)
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if totals:
        print("µs per loop iteration:", ", ".join(f"{name} {seconds / iterations * 1e6:.1f}"
                                                  for name, seconds in totals.most_common()))
    print(f"broker loop: {cpu / args.tasks * 1e6:.1f} µs CPU per task, "
          f"{iterations / args.tasks:.2f} iterations per task, {args.tasks / wall:.0f} tasks/s "
          f"({args.durability}, {args.batch} per SUBMIT, {args.in_flight} in flight)")


if __name__ == "__main__":
    main()
