"""Large fan-out: a chord of 10,000 tasks (one SUBMIT, one body over all results) end to end,
beside ``multiprocessing.Pool(2).map`` over the same 10,000 items and a plain group, in the same
run. Pool.map ships the items in chunks and holds nothing durable; embedq commits every task,
lease and result (and the chord counter) to LMDB, so this is the price of durability."""

import os

import pytest

import bench_tasks
from harness import EMBEDQ, POOL

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]

N_FANOUT = int(os.environ.get("BENCH_FANOUT", 10_000))
EXPECTED = sum(i * i for i in range(N_FANOUT))


def _record(benchmark, system, label, durability="-"):
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update({"kind": "fanout", "system": system, "durability": durability,
                                 "label": label, "tasks": N_FANOUT, "seconds": round(seconds, 3),
                                 "tasks_per_s": round(N_FANOUT / seconds),
                                 "loadavg_1m": round(os.getloadavg()[0], 2)})


def test_fanout_pool_map(benchmark, mp_pool):
    def run():
        assert sum(mp_pool.map(bench_tasks.square_fn, range(N_FANOUT))) == EXPECTED

    benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, POOL, f"{POOL}.map over {N_FANOUT:,} items, then sum")


def test_fanout_embedq_chord(benchmark, embedq_cluster):
    from embedq import chord

    def run():
        result = chord((bench_tasks.square.s(i) for i in range(N_FANOUT)), bench_tasks.xsum.s())()
        assert result.get(timeout=300) == EXPECTED

    benchmark.pedantic(run, rounds=3, iterations=1)
    durability = embedq_cluster.durability
    _record(benchmark, EMBEDQ, f"embedq chord({N_FANOUT:,} x square, xsum) [{durability}]", durability)


def test_fanout_embedq_group(benchmark, embedq_cluster):
    from embedq import group

    def run():
        result = group(bench_tasks.square.s(i) for i in range(N_FANOUT))()
        assert sum(result.get(timeout=300)) == EXPECTED

    benchmark.pedantic(run, rounds=3, iterations=1)
    durability = embedq_cluster.durability
    _record(benchmark, EMBEDQ, f"embedq group({N_FANOUT:,} x square).get() [{durability}]", durability)
