"""The ceilings under issue 2's two targets, measured together in one run on this machine.

The latency target asks for embedq's p50 round trip at most 2x ProcessPoolExecutor's. embedq's
round trip crosses four ZeroMQ hops (client, broker, pool process, broker, client), so its p50 is
the bare ZeroMQ floor (``zmq_floor.py``: the same hops and an ACK, no work) plus embedq's own work.
Blocks of the three alternate, so the VM's drift moves them alike.

The throughput target asks ``delay()`` under ``fsync`` durability to keep up with PPE. Two
ceilings bound it from above. A ``delay()`` returns once its task is durable, so one submitting
thread gets at most one call per durable commit: a bare ``fdatasync`` (a 4 KiB write to a file on
the data disk, then the flush) and a synced one-put LMDB commit. And whatever the disk costs,
``delay()`` cannot beat what it costs with no flush at all: ``process`` durability from 1 thread
(a round trip to the broker per call), 16 and 64 threads (commits shared; bound by CPU).

    python bench/ceilings.py [--blocks 10] [--trips 300] [--tasks 10000]

``BENCH_TMPDIR`` picks the disk (as for the benchmarks: not a tmpfs, or a flush is free).
"""

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)  # (spawned worker processes get sys.path from multiprocessing)

from harness import delay_from_threads  # noqa: E402  (needs the path above)
from one_core import p50_us  # noqa: E402

#: Flushes timed for the durable-commit ceiling (the median is reported).
FLUSHES = 300


def flush_costs(directory):
    """Median µs of (a 4 KiB write + ``fdatasync``, a synced LMDB commit of one put)."""
    import lmdb

    path = os.path.join(directory, "flush")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY)
    try:
        bare = []
        for _ in range(FLUSHES):
            started = time.perf_counter()
            os.pwrite(fd, b"x" * 4096, 0)
            os.fdatasync(fd)
            bare.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)
    env = lmdb.open(os.path.join(directory, "lmdb"), map_size=64 << 20, sync=True, metasync=True)
    try:
        commits = []
        for n in range(FLUSHES):
            started = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(b"%016d" % n, b"x" * 200)
            commits.append(time.perf_counter() - started)
    finally:
        env.close()
    return statistics.median(bare) * 1e6, statistics.median(commits) * 1e6


def ppe_rate(ppe, noop_fn, tasks):
    started = time.perf_counter()
    concurrent.futures.wait([ppe.submit(noop_fn) for _ in range(tasks)])
    return tasks / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--trips", type=int, default=300, help="round trips per block")
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per throughput case")
    args = parser.parse_args()

    import bench_tasks
    import embedq
    from zmq_floor import ZmqFloor

    floor = ZmqFloor()
    with tempfile.TemporaryDirectory(prefix="embedq-ceilings-", dir=os.environ.get("BENCH_TMPDIR")) as data, \
            concurrent.futures.ProcessPoolExecutor(2) as ppe:
        bare_us, commit_us = flush_costs(data)
        with embedq.start(bench_tasks.app, workers=2, data_dir=os.path.join(data, "store"),
                          durability="process"):
            trips = {"ZeroMQ floor": floor.trip,
                     "PPE": lambda: ppe.submit(bench_tasks.noop_fn).result(),
                     "embedq": lambda: bench_tasks.noop.delay().get(timeout=60)}
            for trip in trips.values():  # warm-up
                for _ in range(300):
                    trip()
            blocks = {name: [] for name in trips}
            for _ in range(args.blocks):
                for name, trip in trips.items():
                    blocks[name].append(p50_us(trip, args.trips))
            p50 = {name: statistics.median(values) for name, values in blocks.items()}
            delay_from_threads(bench_tasks.noop, 2_000, 16)  # warm-up
            ppe_rates, rates = [ppe_rate(ppe, bench_tasks.noop_fn, args.tasks)], {}
            for threads in (1, 16, 64):  # PPE before, between and after
                started = time.perf_counter()
                delay_from_threads(bench_tasks.noop, args.tasks, threads)
                rates[threads] = args.tasks / (time.perf_counter() - started)
                ppe_rates.append(ppe_rate(ppe, bench_tasks.noop_fn, args.tasks))
    floor.close()
    ppe_tasks_per_s = statistics.median(ppe_rates)

    ppe_us = p50["PPE"]
    print(f"Latency, p50 of {args.blocks} alternating blocks of {args.trips} round trips:")
    print(f"  PPE {ppe_us:,.0f} µs; ZeroMQ floor {p50['ZeroMQ floor']:,.0f} µs = "
          f"{p50['ZeroMQ floor'] / ppe_us:.2f}x PPE; embedq [process] {p50['embedq']:,.0f} µs = "
          f"{p50['embedq'] / ppe_us:.2f}x PPE")
    print(f"  embedq's own work above the wire: {p50['embedq'] - p50['ZeroMQ floor']:,.0f} µs = "
          f"{(p50['embedq'] - p50['ZeroMQ floor']) / ppe_us:.2f}x PPE (the 2x target leaves it "
          f"{2 - p50['ZeroMQ floor'] / ppe_us:.2f}x)")
    print(f"Throughput, PPE submit {args.tasks:,} then wait: {ppe_tasks_per_s:,.0f} tasks/s (median of 4, "
          "before, between and after embedq's)")
    for name, cost in (("bare 4 KiB write + fdatasync", bare_us), ("synced one-put LMDB commit", commit_us)):
        print(f"  {name}: {cost:,.0f} µs -> one thread's fsync delay() ceiling {1e6 / cost:,.0f}/s = "
              f"{1e6 / cost / ppe_tasks_per_s:.2f}x PPE")
    for threads, rate in rates.items():
        print(f"  embedq delay() from {threads} thread{'s' if threads > 1 else ''}, process durability (no flush): {rate:,.0f}/s = "
              f"{rate / ppe_tasks_per_s:.2f}x PPE")


if __name__ == "__main__":
    main()
