"""Pages written per LMDB commit, and what they cost, in the threaded ``delay()`` throughput case.

Under ``fsync`` a commit costs about one disk write per scattered dirty page (see
docs/storage.md, "Page locality"), so the pages a commit dirties are what ``fsync`` throughput is
made of. This runs the benchmark's ``embedq-delay-threads`` workload (``--threads`` threads, each
``delay()`` its share, then ``get()`` its results) against an ``embedq.start()`` cluster and reads,
around each round, the broker process's ``write_bytes`` and ``write_count`` (``/proc``) and the
store's last transaction id (a read-only LMDB handle: readers never block the broker).

    python bench/commit_pages.py [--tasks 20000] [--threads 16] [--rounds 2] [--durability fsync]

Output per round: tasks/s, commits and tasks per commit, pages (4 KiB) written per commit and per
task, write syscalls (one per run of contiguous pages, plus the meta page), and the broker's CPU
per task.
"""

import argparse
import os
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)  # (spawned worker processes get sys.path from multiprocessing)

from harness import delay_from_threads  # noqa: E402  (needs the path above)

PAGE = 4096


def run_threads(noop, tasks, threads):
    """The benchmark's threaded workload (harness.delay_from_threads); its wall time in seconds."""
    started = time.perf_counter()
    delay_from_threads(noop, tasks, threads)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--durability", choices=("process", "fsync"), default="fsync")
    args = parser.parse_args()

    import lmdb
    import psutil

    import bench_tasks
    import embedq

    with tempfile.TemporaryDirectory(prefix="embedq-pages-", dir=os.environ.get("BENCH_TMPDIR")) as data, \
            embedq.start(bench_tasks.app, workers=2, data_dir=data, durability=args.durability) as cluster:
        run_threads(bench_tasks.noop, 2_000, args.threads)  # warm-up
        broker = psutil.Process(cluster.broker_process.pid)
        env = lmdb.open(data, readonly=True, max_dbs=32)
        try:
            for _ in range(args.rounds):
                io, txn, cpu = broker.io_counters(), env.info()["last_txnid"], broker.cpu_times()
                elapsed = run_threads(bench_tasks.noop, args.tasks, args.threads)
                io2, txn2, cpu2 = broker.io_counters(), env.info()["last_txnid"], broker.cpu_times()
                commits = max(1, txn2 - txn)
                pages = (io2.write_bytes - io.write_bytes) / PAGE
                busy = (cpu2.user + cpu2.system) - (cpu.user + cpu.system)
                print(f"{args.durability}, {args.threads} threads: {args.tasks / elapsed:,.0f} tasks/s; "
                      f"{commits} commits ({args.tasks / commits:.1f} tasks each, "
                      f"{elapsed / commits * 1e6:,.0f} µs apart); {pages / commits:.1f} pages and "
                      f"{(io2.write_count - io.write_count) / commits:.1f} writes per commit, "
                      f"{pages / args.tasks:.2f} pages per task; broker CPU "
                      f"{busy / args.tasks * 1e6:.0f} µs per task", flush=True)
        finally:
            env.close()


if __name__ == "__main__":
    main()
