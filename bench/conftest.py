"""Benchmark fixtures: each system under test is started once per module, warmed up, and stopped.

Run from the repository root (``bench/`` is outside ``testpaths``, so a plain ``python -m pytest``
never collects it)::

    python -m pytest bench -p no:cacheprovider --benchmark-json=bench/results.json
    python bench/report.py bench/results.json

Systems: ``concurrent.futures.ProcessPoolExecutor(2)``, ``multiprocessing.Pool(2)`` and
``embedq.start(app, workers=2)`` in each durability mode. The two embedq clusters share one App
(``bench_tasks.app``), so they are never alive at the same time: ``embedq_cluster`` is a
module-scoped fixture parametrised by durability, and pytest finishes every test of one mode
(and stops that cluster) before it starts the other.

Sizes can be shrunk for a quick check (the README's figures use the defaults):
``BENCH_TASKS`` (20000), ``BENCH_TRIPS`` (2000), ``BENCH_THREADS`` (16), ``BENCH_ROUNDS`` (3, the
most rounds of a throughput case), ``BENCH_CASE_SECONDS`` (15, the time one throughput case aims
to stay under: a slow case runs fewer rounds). Data dirs go under ``BENCH_TMPDIR`` (default: the
system temp dir; it must be a real disk, not tmpfs, or fsync costs nothing) and are removed.
"""

import concurrent.futures
import multiprocessing
import os
import shutil
import sys
import tempfile

import pytest

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

# Worker processes (embedq's spawned worker node and its pool, the baselines' children) must be
# able to import bench_tasks: put this directory on sys.path here and on PYTHONPATH for children.
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [BENCH_DIR] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != BENCH_DIR])

import bench_tasks  # noqa: E402  (needs the path above)

from harness import EMBEDQ, POOL, PPE, WARMUP_BATCH, WARMUP_TRIPS, WORKERS  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    """Keep the baselines' tests first, then embedq's grouped by durability (stable order)."""
    def key(item):
        callspec = getattr(item, "callspec", None)
        durability = callspec.params.get("embedq_cluster") if callspec else None
        return {None: 0, "process": 1, "fsync": 2}.get(durability, 3)
    items.sort(key=key)


@pytest.fixture(scope="session")
def bench_tmpdir():
    path = tempfile.mkdtemp(prefix="embedq-bench-", dir=os.environ.get("BENCH_TMPDIR"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ppe():
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as executor:
        for _ in range(WARMUP_TRIPS):
            executor.submit(bench_tasks.noop_fn).result()
        concurrent.futures.wait([executor.submit(bench_tasks.noop_fn) for _ in range(WARMUP_BATCH)])
        yield executor


@pytest.fixture(scope="module")
def zmq_floor():
    from zmq_floor import ZmqFloor

    floor = ZmqFloor()
    try:
        for _ in range(WARMUP_TRIPS):
            floor.trip()
        floor.run(WARMUP_BATCH)
        yield floor
    finally:
        floor.close()


@pytest.fixture(scope="module")
def mp_pool():
    with multiprocessing.Pool(WORKERS) as pool:
        for _ in range(WARMUP_TRIPS):
            pool.apply_async(bench_tasks.noop_fn).get()
        for result in [pool.apply_async(bench_tasks.noop_fn) for _ in range(WARMUP_BATCH)]:
            result.get()
        yield pool


@pytest.fixture(scope="module", params=["process", "fsync"])
def embedq_cluster(request, bench_tmpdir):
    import embedq

    durability = request.param
    data_dir = os.path.join(bench_tmpdir, f"data-{durability}")
    cluster = embedq.start(bench_tasks.app, workers=WORKERS, data_dir=data_dir, durability=durability)
    try:
        noop = bench_tasks.noop
        for _ in range(WARMUP_TRIPS):
            noop.delay().get(timeout=60)
        for result in [noop.delay() for _ in range(WARMUP_BATCH)]:
            result.get(timeout=120)
        for _ in range(WARMUP_TRIPS // 3):
            cluster.submit(bench_tasks.noop_fn).result(timeout=60)
        yield cluster
    finally:
        cluster.shutdown(wait=False)
        shutil.rmtree(data_dir, ignore_errors=True)
