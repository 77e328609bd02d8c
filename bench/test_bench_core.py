"""Core benchmarks: one no-op task's round-trip latency, and 20,000 no-ops end to end.

Every figure is measured in the same run, on the same machine, against two baselines:
``ProcessPoolExecutor(2)`` (the reference for the targets) and ``multiprocessing.Pool(2)``.
Nothing here asserts a speed: the targets are ratios read off ``bench/report.py``'s table.

Latency: ``noop.delay().get()`` one at a time (the client waits for each result before the next
submit); the baselines' ``submit(f).result()`` / ``apply_async(f).get()``. Each case runs on its
own; the target's ratio comes from one more case that alternates blocks of ``delay().get()`` and
PPE's ``submit(f).result()``, so that both meet the same VM conditions.

Throughput (each: submit N no-ops, then wait for all of them):

- ``ppe``: ``executor.submit`` N futures, then ``wait`` all;
- ``pool-apply-async``: ``apply_async`` N, then ``get`` each; ``pool-map``: ``Pool.map`` (reference);
- ``embedq-delay``: one thread, N x ``noop.delay()`` (each returns once committed), then ``get`` all;
- ``embedq-delay-threads``: 16 threads, each ``delay()`` its share then ``get`` its own results.
  Concurrent submitters land in the same broker loop iteration, so one LMDB commit (one fsync)
  covers many of them: this is how ``fsync`` durability keeps throughput;
- ``embedq-map``: ``cluster.map(noop_fn, range(N))`` (1,000 calls per submit; reference).

The ZeroMQ floor (``zmq_floor.py``) is a reference for both: a bare ROUTER broker and an echo
worker, the same four hops as ``delay().get()`` with no work at any of them.
"""

import concurrent.futures

import pytest

import bench_tasks
from harness import (EMBEDQ, N_THREADS, POOL, PPE, ZMQ_FLOOR, delay_from_threads, measure_latency,
                     measure_latency_interleaved, measure_throughput)

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]

noop_fn = bench_tasks.noop_fn
noop = bench_tasks.noop


# -- latency -------------------------------------------------------------------------------------
def test_latency_ppe(benchmark, ppe):
    measure_latency(benchmark, lambda: ppe.submit(noop_fn).result(), system=PPE)


def test_latency_pool(benchmark, mp_pool):
    measure_latency(benchmark, lambda: mp_pool.apply_async(noop_fn).get(), system=POOL)


def test_latency_zmq_floor(benchmark, zmq_floor):
    """Reference: the four ZeroMQ hops of a round trip with no work at any of them."""
    measure_latency(benchmark, zmq_floor.trip, system=ZMQ_FLOOR)


def test_latency_embedq_delay(benchmark, embedq_cluster):
    measure_latency(benchmark, lambda: noop.delay().get(timeout=60), system=EMBEDQ,
                    durability=embedq_cluster.durability,
                    label=f"embedq noop.delay().get() [{embedq_cluster.durability}]")


def test_latency_embedq_delay_interleaved_with_ppe(benchmark, embedq_cluster, ppe):
    """The latency target's ratio: ``delay().get()`` and PPE in alternating blocks."""
    measure_latency_interleaved(benchmark, lambda: noop.delay().get(timeout=60),
                                lambda: ppe.submit(noop_fn).result(),
                                durability=embedq_cluster.durability,
                                label=f"embedq noop.delay().get() [{embedq_cluster.durability}]")


def test_latency_embedq_executor(benchmark, embedq_cluster):
    """Reference: the Executor face (``cluster.submit(fn).result()``, cloudpickled call)."""
    measure_latency(benchmark, lambda: embedq_cluster.submit(noop_fn).result(timeout=60),
                    system=EMBEDQ, durability=embedq_cluster.durability,
                    label=f"embedq cluster.submit(fn).result() [{embedq_cluster.durability}]")


# -- throughput ----------------------------------------------------------------------------------
def test_throughput_ppe(benchmark, ppe):
    def run(n):
        futures = [ppe.submit(noop_fn) for _ in range(n)]
        done, _ = concurrent.futures.wait(futures)
        return sum(1 for f in done if f.result() is None)

    measure_throughput(benchmark, run, system=PPE, label=f"{PPE}: submit N, wait all")


def test_throughput_pool_apply_async(benchmark, mp_pool):
    def run(n):
        results = [mp_pool.apply_async(noop_fn) for _ in range(n)]
        return sum(1 for r in results if r.get() is None)

    measure_throughput(benchmark, run, system=POOL, label=f"{POOL}: apply_async N, get all")


def test_throughput_zmq_floor(benchmark, zmq_floor):
    measure_throughput(benchmark, zmq_floor.run, system=ZMQ_FLOOR,
                       label=f"{ZMQ_FLOOR}: pipelined, 1,000 in flight (reference)")


def test_throughput_pool_map(benchmark, mp_pool):
    def run(n):
        return sum(1 for value in mp_pool.map(noop_fn, range(n)) if value is None)

    measure_throughput(benchmark, run, system=POOL, label=f"{POOL}: map (reference)")


def test_throughput_embedq_delay(benchmark, embedq_cluster):
    def run(n):
        results = [noop.delay() for _ in range(n)]
        return sum(1 for r in results if r.get(timeout=120) is None)

    durability = embedq_cluster.durability
    measure_throughput(benchmark, run, system=EMBEDQ, durability=durability,
                       label=f"embedq delay() x N, 1 thread, get all [{durability}]")


def test_throughput_embedq_delay_threads(benchmark, embedq_cluster):
    def run(n):
        return delay_from_threads(noop, n, N_THREADS)

    durability = embedq_cluster.durability
    measure_throughput(benchmark, run, system=EMBEDQ, durability=durability,
                       label=f"embedq delay() x N, {N_THREADS} threads, get all [{durability}]")


def test_throughput_embedq_map(benchmark, embedq_cluster):
    def run(n):
        return sum(1 for value in embedq_cluster.map(noop_fn, range(n)) if value is None)

    durability = embedq_cluster.durability
    measure_throughput(benchmark, run, system=EMBEDQ, durability=durability,
                       label=f"embedq cluster.map(fn, range(N)) (reference) [{durability}]")
