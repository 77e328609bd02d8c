"""Measuring helpers and sizes shared by the benchmark modules (see conftest.py for the knobs)."""

import os
import threading
import time

N_TASKS = int(os.environ.get("BENCH_TASKS", 20_000))
N_TRIPS = int(os.environ.get("BENCH_TRIPS", 2_000))
N_THREADS = int(os.environ.get("BENCH_THREADS", 16))
MAX_ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))
CASE_SECONDS = float(os.environ.get("BENCH_CASE_SECONDS", 15))
WORKERS = 2
#: Round trips and batch size run by each fixture before its first measurement.
WARMUP_TRIPS = 300
WARMUP_BATCH = 1_000

PPE = "ProcessPoolExecutor(2)"
POOL = "multiprocessing.Pool(2)"
EMBEDQ = "embedq"
ZMQ_FLOOR = "ZeroMQ floor (bare ROUTER broker + echo worker)"


def child_env():
    """The environment for a subprocess that must import ``bench_tasks`` (this directory first
    on its PYTHONPATH): the profiling scripts' workers, clients and fake peers."""
    here = os.path.dirname(os.path.abspath(__file__))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an already sorted list."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def measure_latency(benchmark, one_trip, *, system, durability="-", label=None, trips=None):
    """Time ``trips`` sequential round trips with perf_counter; p50/p99 go to extra_info (µs).

    pytest-benchmark runs one round per trip, so its own median matches p50 here; the
    percentiles are computed from our own timings because it does not report p99.
    """
    trips = trips or N_TRIPS
    times = []
    perf = time.perf_counter

    def timed():
        t0 = perf()
        one_trip()
        times.append(perf() - t0)

    benchmark.pedantic(timed, rounds=trips, iterations=1, warmup_rounds=min(100, trips))
    times = sorted(times[-trips:])  # drop the warm-up rounds
    benchmark.extra_info.update({
        "kind": "latency", "system": system, "durability": durability, "label": label or system,
        "trips": trips,
        "p50_us": round(percentile(times, 0.50) * 1e6, 1),
        "p99_us": round(percentile(times, 0.99) * 1e6, 1),
        "mean_us": round(sum(times) / len(times) * 1e6, 1),
        "max_us": round(times[-1] * 1e6, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    })
    return times


#: Blocks the interleaved latency case alternates between embedq and the baseline.
INTERLEAVED_BLOCKS = 20


def measure_latency_interleaved(benchmark, one_trip, baseline_trip, *, durability, label, trips=None):
    """Round trips of ``one_trip`` and of ``baseline_trip`` (PPE) in alternating blocks.

    The VM's speed drifts by up to 2x within minutes, so two latency cases measured a minute
    apart can disagree on the ratio by 40%. Alternating blocks of 1/20 of the trips each puts
    both systems under the same conditions; the ratio of their p50s is the latency target's.
    """
    trips = trips or N_TRIPS
    block = max(1, trips // INTERLEAVED_BLOCKS)
    ours, theirs = [], []
    perf = time.perf_counter

    def blocks():
        for trip, times in ((one_trip, ours), (baseline_trip, theirs)):
            for _ in range(block):
                t0 = perf()
                trip()
                times.append(perf() - t0)

    for _ in range(min(100, block)):  # warm both paths up
        one_trip()
        baseline_trip()
    benchmark.pedantic(blocks, rounds=INTERLEAVED_BLOCKS, iterations=1)
    ours.sort()
    theirs.sort()
    benchmark.extra_info.update({
        "kind": "latency_interleaved", "system": "embedq", "durability": durability, "label": label,
        "trips": len(ours),
        "p50_us": round(percentile(ours, 0.50) * 1e6, 1),
        "p99_us": round(percentile(ours, 0.99) * 1e6, 1),
        "baseline_p50_us": round(percentile(theirs, 0.50) * 1e6, 1),
        "baseline_p99_us": round(percentile(theirs, 0.99) * 1e6, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    })


def measure_throughput(benchmark, run, *, system, label, durability="-", tasks=None):
    """Time ``run(tasks)`` (submit ``tasks`` no-ops and wait for all of them) end to end.

    A pilot run (1/20 of the size) warms up this exact path and estimates the case's duration;
    then up to MAX_ROUNDS full rounds run, fewer when a round would take the case past
    CASE_SECONDS (always at least one). tasks/s is reported for the median round and the best.
    """
    tasks = tasks or N_TASKS
    pilot_tasks = max(1, tasks // 20)
    t0 = time.perf_counter()
    run(pilot_tasks)
    pilot = (time.perf_counter() - t0) * tasks / pilot_tasks
    rounds = max(1, min(MAX_ROUNDS, int(CASE_SECONDS // max(pilot, 1e-3))))
    elapsed = []

    def timed():
        t0 = time.perf_counter()
        done = run(tasks)
        elapsed.append(time.perf_counter() - t0)
        assert done == tasks, f"{label}: {done} of {tasks} tasks completed"

    benchmark.pedantic(timed, rounds=rounds, iterations=1)
    ordered = sorted(elapsed)
    median = ordered[len(ordered) // 2]
    benchmark.extra_info.update({
        "kind": "throughput", "system": system, "durability": durability, "label": label,
        "tasks": tasks, "rounds": rounds,
        "tasks_per_s": round(tasks / median),
        "best_tasks_per_s": round(tasks / ordered[0]),
        "round_seconds": [round(s, 3) for s in elapsed],
        "loadavg_1m": round(os.getloadavg()[0], 2),
    })


def delay_from_threads(task, n, threads):
    """The threaded ``delay()`` workload: ``threads`` threads start together, each ``delay()``s
    its share of ``n`` calls and then ``get()``s its own results. Returns how many came back
    None (all of them, for a no-op). An error in any thread is raised here."""
    shares = [n // threads + (i < n % threads) for i in range(threads)]
    counts = [0] * threads
    errors = []
    start = threading.Barrier(threads)

    def client(index):
        try:
            start.wait()
            results = [task.delay() for _ in range(shares[index])]
            counts[index] = sum(1 for r in results if r.get(timeout=120) is None)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
            start.abort()

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sum(counts)
