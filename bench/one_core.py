"""Round trips on one CPU, where wall time is CPU time and most scheduling noise is gone.

On two cores a round trip's p50 moves by 10-20% from run to run on this VM, which hides any
change worth less than that. Pinned to one CPU (every process and thread of the run inherits the
affinity), a sequential round trip can only be as fast as the sum of the CPU that every process
spends on it, and the rounds of one run agree within a few per cent. That makes it the metric
for A/B work on the hot path, and the split by process shows whose CPU it is. The VM's speed
still drifts between runs (by up to 25%): compare A and B in interleaved runs, not against an
old figure.

    python bench/one_core.py [--trips 700] [--rounds 4] [--cpu 0] [--durability process]

To compare another tree (A/B), put it first on ``PYTHONPATH`` and run from a directory that has
no ``embedq/``: the broker starts as ``python -m embedq.broker``, which looks in the current
directory first. E.g. ``cd /tmp && PYTHONPATH=/path/to/other/tree python /repo/bench/one_core.py``,
alternating with the same command without ``PYTHONPATH``.

Prints, for embedq ``delay().get()``, the ZeroMQ floor and ProcessPoolExecutor(2), the best and
median p50 of the rounds, and embedq's CPU per round trip by process and thread (from
/proc/<pid>/task/*/stat; the "I/O" thread is libzmq's).
"""

import argparse
import collections
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)


def p50_us(one_trip, trips):
    times = []
    for _ in range(trips):
        started = time.perf_counter()
        one_trip()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def rounds_of(one_trip, trips, rounds):
    for _ in range(200):
        one_trip()
    return sorted(p50_us(one_trip, trips) for _ in range(rounds))


def cpu_ticks(roles):
    """(role, thread kind) -> user+system clock ticks, summed over the processes in ``roles``."""
    out = collections.Counter()
    for pid, role in roles.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kind = "main" if int(tid) == pid else "I/O"
            out[role, kind] += int(fields[11]) + int(fields[12])
    return out


def cluster_roles():
    import psutil

    me = psutil.Process()
    roles = {me.pid: "client"}
    for child in me.children():
        command = " ".join(child.cmdline())
        if "embedq.broker" in command:
            roles[child.pid] = "broker"
        elif "resource_tracker" not in command:
            roles[child.pid] = "worker node"
            for grandchild in child.children():
                roles[grandchild.pid] = "pool process"
    return roles


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trips", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--durability", choices=("process", "fsync"), default="process")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})

    import bench_tasks
    import embedq
    from zmq_floor import ZmqFloor

    rows = []
    with tempfile.TemporaryDirectory(prefix="embedq-one-core-", dir=os.environ.get("BENCH_TMPDIR")) as data:
        with embedq.start(bench_tasks.app, workers=2, data_dir=data, durability=args.durability):
            def trip():
                bench_tasks.noop.delay().get(timeout=10)

            for _ in range(200):
                trip()
            roles = cluster_roles()
            before = cpu_ticks(roles)
            p50s = rounds_of(trip, args.trips, args.rounds)
            spent = cpu_ticks(roles) - before
            rows.append((f"embedq delay().get() [{args.durability}]", p50s))
    floor = ZmqFloor()
    try:
        rows.append(("ZeroMQ floor", rounds_of(floor.trip, args.trips, args.rounds)))
    finally:
        floor.close()
    with concurrent.futures.ProcessPoolExecutor(2) as ppe:
        rows.append(("ProcessPoolExecutor(2)", rounds_of(lambda: ppe.submit(bench_tasks.noop_fn).result(),
                                                         args.trips, args.rounds)))

    print(f"one CPU ({args.cpu}), {args.rounds} rounds of {args.trips} round trips, embedq at {embedq.__file__}")
    print("| round trip | best p50 (µs) | median p50 (µs) |\n|---|---:|---:|")
    for label, p50s in rows:
        print(f"| {label} | {p50s[0]:,.0f} | {statistics.median(p50s):,.0f} |")
    trips = 200 + args.trips * args.rounds  # the warm-up of rounds_of ran too
    per_tick = 1e6 / os.sysconf("SC_CLK_TCK") / trips
    print("\nembedq CPU per round trip (µs), by process and thread:\n\n| process | thread | µs |\n|---|---|---:|")
    for (role, kind), ticks in sorted(spent.items(), key=lambda item: -item[1]):
        if ticks:
            print(f"| {role} | {kind} | {ticks * per_tick:,.0f} |")
    print(f"| all | | {sum(spent.values()) * per_tick:,.0f} |")


if __name__ == "__main__":
    main()
