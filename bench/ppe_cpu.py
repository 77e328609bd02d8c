"""The baseline's CPU per task: ``ProcessPoolExecutor(2)`` in the throughput case, by process.

The reference for embedq's own split (``profile_broker.py --mode throughput``): what PPE's
client process (its submitting thread, the queue feeder and the management thread) and its two
workers spend per no-op task, from psutil, over ``--tasks`` ``submit()`` calls then ``wait()``.

    python bench/ppe_cpu.py [--tasks 20000] [--rounds 3]
"""

import argparse
import concurrent.futures
import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)  # (the workers unpickle bench_tasks.noop_fn by reference)


def cpu_seconds(process):
    times = process.cpu_times()
    return times.user + times.system


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import psutil

    import bench_tasks

    with concurrent.futures.ProcessPoolExecutor(2) as executor:
        concurrent.futures.wait([executor.submit(bench_tasks.noop_fn) for _ in range(2_000)])
        client = psutil.Process()
        workers = client.children()
        for _ in range(args.rounds):
            before = cpu_seconds(client), sum(map(cpu_seconds, workers))
            started = time.perf_counter()
            concurrent.futures.wait([executor.submit(bench_tasks.noop_fn) for _ in range(args.tasks)])
            elapsed = time.perf_counter() - started
            used = cpu_seconds(client) - before[0], sum(map(cpu_seconds, workers)) - before[1]
            print(f"PPE: {args.tasks / elapsed:,.0f} tasks/s; µs of CPU per task: client "
                  f"{used[0] / args.tasks * 1e6:.0f}, workers {used[1] / args.tasks * 1e6:.0f}", flush=True)


if __name__ == "__main__":
    main()
