"""The latency target's ratio on its own: blocks of ``delay().get()`` alternating with PPE's.

The full bench's alternating case, as a script that takes a minute, for A/B work on changes that
only show on two cores (work that now overlaps between processes, which ``one_core.py`` cannot
see: there, every process waits for the one CPU). Compare trees in interleaved runs, as for
``one_core.py``: from a directory without ``embedq/``, alternate
``PYTHONPATH=/path/to/other/tree python /repo/bench/alternating.py`` with the same command
without ``PYTHONPATH``. The VM's drift moves both systems of one run alike, so the ratio holds
better than either p50. Even so, look at several pairs.

    python bench/alternating.py [--blocks 16] [--trips 300] [--durability process]
"""

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)  # (spawned worker processes get sys.path from multiprocessing)

from one_core import p50_us  # noqa: E402  (needs the path above)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--trips", type=int, default=300, help="round trips per block")
    parser.add_argument("--durability", choices=("process", "fsync"), default="process")
    args = parser.parse_args()

    import bench_tasks
    import embedq

    with tempfile.TemporaryDirectory(prefix="embedq-alternating-", dir=os.environ.get("BENCH_TMPDIR")) as data, \
            embedq.start(bench_tasks.app, workers=2, data_dir=data, durability=args.durability), \
            concurrent.futures.ProcessPoolExecutor(2) as ppe:
        def embedq_trip():
            bench_tasks.noop.delay().get(timeout=60)

        def ppe_trip():
            ppe.submit(bench_tasks.noop_fn).result()

        for _ in range(300):
            embedq_trip()
            ppe_trip()
        ours, theirs = [], []
        for _ in range(args.blocks):
            ours.append(p50_us(embedq_trip, args.trips))
            theirs.append(p50_us(ppe_trip, args.trips))
    mine, ppe_p50 = statistics.median(ours), statistics.median(theirs)
    print(f"{args.durability}: embedq p50 {mine:,.0f} µs, PPE {ppe_p50:,.0f} µs, ratio {mine / ppe_p50:.2f}x "
          f"(median of {args.blocks} blocks of {args.trips}; embedq at {os.path.dirname(embedq.__file__)})")


if __name__ == "__main__":
    main()
