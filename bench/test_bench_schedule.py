"""Scheduled tasks: 10,000 tasks with countdowns, how late each one starts after its due time.

The broker holds scheduled tasks itself and promotes them when due, so lateness is the broker's
wake-up precision plus the dispatch and the pool process's pick-up. The countdowns are spread
uniformly over ``SPREAD`` seconds (500 due per second: under what the ``fsync`` pipeline
sustains on the 2-core VM, about 2,000 tasks/s; at 2,000 due per second it falls behind),
submitted in batches of 500 per commit before the first one is due. Lateness is measured in the
pool process (``time.time() - request.eta``); p50/p99/max go to ``extra_info`` (milliseconds).
"""

import os
import random
import time

import pytest

import bench_tasks
from harness import EMBEDQ, percentile

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]

N_SCHEDULED = int(os.environ.get("BENCH_SCHEDULED", 10_000))
#: Seconds from the first due time to the last.
SPREAD = 20.0
#: Seconds between the start of the submission and the first due time.
LEAD = 3.0
BATCH = 500


def test_countdown_lateness(benchmark, embedq_cluster):
    task = bench_tasks.lateness
    rng = random.Random(42)
    found = {}

    def run():
        start = time.time()
        results = []
        for offset in range(0, N_SCHEDULED, BATCH):
            messages = [task.build_message(countdown=LEAD - (time.time() - start) + rng.uniform(0, SPREAD))
                        for _ in range(min(BATCH, N_SCHEDULED - offset))]
            results += task.app.send_messages(messages)
        found["late"] = sorted(r.get(timeout=120) for r in results)
        found["submit_s"] = time.time() - start

    benchmark.pedantic(run, rounds=1, iterations=1)
    late = found["late"]
    assert late[0] >= -0.002, f"a task started {-late[0] * 1000:.1f} ms before its eta"
    benchmark.extra_info.update({
        "kind": "lateness", "system": EMBEDQ, "durability": embedq_cluster.durability,
        "label": f"embedq {N_SCHEDULED:,} countdowns over {SPREAD:.0f} s [{embedq_cluster.durability}]",
        "tasks": N_SCHEDULED,
        "p50_ms": round(percentile(late, 0.50) * 1e3, 2),
        "p99_ms": round(percentile(late, 0.99) * 1e3, 2),
        "max_ms": round(late[-1] * 1e3, 2),
        "min_ms": round(late[0] * 1e3, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    })
