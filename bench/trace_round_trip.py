"""Where one round trip's wall time goes, step by step, across the client, broker and pool.

Every process of an ``embedq.start()`` cluster (and the client, this script) writes a monotonic
timestamp (CLOCK_MONOTONIC is system-wide) at each step of sequential ``noop.delay().get()``
round trips: the client's send and wake-ups, the broker's receive, commit and sends, the pool
process's wake-up, task start and send. The steps are then lined up per round trip and the
median of each interval printed. Each mark is a ``write`` syscall, so the traced total is larger
than an untraced round trip (printed beside it); the split is what this is for.

    python bench/trace_round_trip.py [--trips 2000] [--durability process|fsync]

The broker and worker node are children of ``embedq.start``, and pool processes are spawned by
the node: the marks reach all of them through a ``sitecustomize`` module on their PYTHONPATH
that patches embedq's send/receive/commit/execute functions when ``EMBEDQ_TRACE_DIR`` is set.
"""

import argparse
import collections
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
TRACE_ENV = "EMBEDQ_TRACE_DIR"
_SITECUSTOMIZE = """\
import warnings
# the patched embedq.broker is imported before runpy runs it as __main__ (harmless here)
warnings.filterwarnings("ignore", "'embedq.broker' found in sys.modules", RuntimeWarning)
import trace_round_trip
trace_round_trip.install()
"""


def install():
    """Patch this process's embedq send/receive/commit/execute to write marks (if tracing)."""
    directory = os.environ.get(TRACE_ENV)
    if not directory:
        return
    fd = os.open(os.path.join(directory, f"marks.{os.getpid()}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def mark(tag):
        os.write(fd, b"%s %d\n" % (tag, time.monotonic_ns()))

    import embedq.broker as broker
    import embedq.client as client
    import embedq.pool as pool
    import embedq.store as store

    def traced_receive(module, tag):
        original = module.receive_ready

        def receive_ready(sock, limit=1_000_000, waiting=False):
            messages = original(sock, limit, waiting)
            if messages and waiting:  # woken with input (not the group-commit top-up)
                mark(tag)
            return messages
        module.receive_ready = receive_ready

    def traced_send(module, prefix):
        original = module.send_frames

        def send_frames(sock, frames, flags=module.send_frames.__defaults__[0]):
            original(sock, frames, flags)
            mark(prefix + bytes(frames[1]))  # [EQ1, COMMAND, ...]
        module.send_frames = send_frames

    def traced_send_to(module, prefix):
        original = module.send_to

        def send_to(sock, identity, frames, flags=module.send_to.__defaults__[0]):
            original(sock, identity, frames, flags)
            mark(prefix + bytes(frames[1]))
        module.send_to = send_to

    traced_receive(broker, b"broker: woken with a message")
    traced_send_to(broker, b"broker: sent ")
    traced_receive(pool, b"pool: woken with a message")
    traced_send(pool, b"pool: sent ")
    commit = store.Batch.commit

    def traced_commit(batch):
        mark(b"broker: commit starts")
        commit(batch)
        mark(b"broker: committed")
    store.Batch.commit = traced_commit
    execute = pool.execute

    def traced_execute(*args, **kwargs):
        mark(b"pool: task starts")
        return execute(*args, **kwargs)
    pool.execute = traced_execute
    send, wait = client.send_frames, client.wait_readable

    def client_send(sock, frames, flags=0):
        mark(b"client: sends " + bytes(frames[1]))
        send(sock, frames, flags)

    def client_wait(sock, timeout):
        readable = wait(sock, timeout)
        if readable:
            mark(b"client: woken")
        return readable
    client.send_frames, client.wait_readable = client_send, client_wait
    install.mark = mark


def _intervals(directory, skip):
    """Median of each interval between consecutive steps, over round trips with the usual order."""
    events = []
    for path in glob.glob(os.path.join(directory, "marks.*")):
        with open(path, "rb") as marks:
            for line in marks:
                tag, _, stamp = line.rstrip().rpartition(b" ")
                events.append((int(stamp), tag.decode()))
    events.sort()
    trips, current = [], None
    for stamp, tag in events:
        if tag == "client: delay() called":
            current = [(stamp, tag)]
        elif current is not None:
            current.append((stamp, tag))
            if tag == "client: get() returned":
                trips.append(current)
                current = None
    trips = trips[skip:]
    orders = collections.Counter(tuple(tag for _, tag in trip) for trip in trips)
    usual, count = orders.most_common(1)[0]
    chosen = [trip for trip in trips if tuple(tag for _, tag in trip) == usual]
    steps = [(usual[i - 1], usual[i], statistics.median((t[i][0] - t[i - 1][0]) / 1e3 for t in chosen))
             for i in range(1, len(usual))]
    total = statistics.median((t[-1][0] - t[0][0]) / 1e3 for t in chosen)
    return steps, total, count, len(trips)


def _round_trips(embedq, bench_tasks, workdir, args, name, mark=None):
    """Sequential ``noop.delay().get()`` on a fresh cluster; returns their p50 in µs."""
    times = []
    with embedq.start(bench_tasks.app, workers=2, data_dir=os.path.join(workdir, name),
                      durability=args.durability):
        for _ in range(300):  # warm up
            bench_tasks.noop.delay().get(timeout=10)
        for _ in range(args.trips):
            started = time.perf_counter()
            if mark is not None:
                mark(b"client: delay() called")
            bench_tasks.noop.delay().get(timeout=10)
            if mark is not None:
                mark(b"client: get() returned")
            times.append((time.perf_counter() - started) * 1e6)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trips", type=int, default=2000)
    parser.add_argument("--durability", choices=("process", "fsync"), default="process")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="embedq-trace-", dir=os.environ.get("BENCH_TMPDIR"))
    marks_dir, site_dir = os.path.join(workdir, "marks"), os.path.join(workdir, "site")
    os.makedirs(marks_dir)
    os.makedirs(site_dir)
    with open(os.path.join(site_dir, "sitecustomize.py"), "w") as site:
        site.write(_SITECUSTOMIZE)
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site_dir, BENCH_DIR, path]))
    sys.path.insert(0, BENCH_DIR)
    import bench_tasks
    import embedq

    try:
        untraced = _round_trips(embedq, bench_tasks, workdir, args, "untraced")
        os.environ[TRACE_ENV] = marks_dir  # the cluster's processes install the marks at start
        install()
        _round_trips(embedq, bench_tasks, workdir, args, "traced", mark=install.mark)
        steps, total, count, trips = _intervals(marks_dir, skip=args.trips // 10)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{count} of {trips} traced round trips in the usual order ({args.durability}); medians:\n")
    print("| from | to | µs |\n|---|---|---:|")
    for before, after, micros in steps:
        print(f"| {before} | {after} | {micros:.0f} |")
    print(f"\ntraced total {total:.0f} µs; untraced p50 {untraced:.0f} µs")


if __name__ == "__main__":
    main()
