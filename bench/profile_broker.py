"""Profile where a no-op round trip spends its time: cProfile of the broker and of the client.

py-spy is not available here, so the broker runs *in this process* (``embedq.broker.Broker``,
the same class ``python -m embedq.broker`` runs) under cProfile, with a worker node
(``python -m embedq.worker -A bench_tasks -c 2``) and a client in subprocesses. By default the
client runs the latency loop of ``test_bench_core.py`` (``noop.delay().get()``, one at a time);
when it exits, the broker's profile is printed.

    python bench/profile_broker.py [--durability process|fsync] [--trips 2000]
                                   [--mode latency|submit|throughput] [--threads 1]

``--mode submit`` times ``delay()`` alone (no worker node: the tasks just queue), i.e. the submit
leg of a round trip. ``--mode throughput`` submits ``--trips`` tasks with ``delay()`` and then
gets them all, from ``--threads`` client threads (each its share; the client profile then covers
the main thread only).

The client runs its loop twice: once with no profiler anywhere (the clean timings), then under
cProfile while the broker is profiled too. Output: the client's timings, where it waited and its
top functions; the broker's top functions, its split between waiting in poll and working, and
what its loop iterations (one LMDB write transaction each) carried.
"""

import argparse
import cProfile
import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from harness import child_env  # noqa: E402  (needs the path above)


def _top(profile, limit, sort="tottime"):
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    return out.getvalue()


WARMUP = 200


def _workload(noop, trips, mode, threads):
    """One pass of the client's work. Returns (per-trip times, seconds until all submitted, total)."""
    times = []
    started = time.perf_counter()
    submitted = None
    if mode in ("latency", "submit"):
        get = mode == "latency"
        for _ in range(trips):
            t0 = time.perf_counter()
            result = noop.delay()
            if get:
                result.get(timeout=30)
            times.append(time.perf_counter() - t0)
    elif threads == 1:
        results = [noop.delay() for _ in range(trips)]
        submitted = time.perf_counter() - started
        for result in results:
            result.get(timeout=120)
    else:
        import threading

        def share(n):
            for result in [noop.delay() for _ in range(n)]:
                result.get(timeout=120)

        workers = [threading.Thread(target=share, args=(trips // threads,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return sorted(times), submitted, time.perf_counter() - started


def _describe(trips, mode, threads, times, submitted, elapsed):
    if times:
        what = "round trips (delay().get())" if mode == "latency" else "submits (delay() only)"
        return (f"{trips} {what}: p50 {times[len(times) // 2] * 1e6:.0f} µs, "
                f"p99 {times[int(len(times) * 0.99)] * 1e6:.0f} µs, total {elapsed:.2f} s")
    if submitted is not None:
        return f"{trips} tasks: submit {trips / submitted:.0f}/s, end to end {trips / elapsed:.0f} tasks/s"
    done = trips // threads * threads
    return f"{done} tasks from {threads} threads: end to end {done / elapsed:.0f} tasks/s"


def client_main(url, trips, mode, limit, threads=1):
    """Runs in a subprocess: warm up, one clean pass (timings), one pass under cProfile."""
    import bench_tasks

    bench_tasks.app.conf.broker_url = url
    noop = bench_tasks.noop
    for _ in range(WARMUP):
        result = noop.delay()
        if mode != "submit":
            result.get(timeout=30)
    clean = _describe(trips, mode, threads, *_workload(noop, trips, mode, threads))
    profile = cProfile.Profile()
    profile.enable()
    times, submitted, elapsed = _workload(noop, trips, mode, threads)
    profile.disable()
    print("=" * 30, "client", "=" * 30)
    print("without profilers:", clean)
    print("under cProfile (this client and the profiled loop):",
          _describe(trips, mode, threads, times, submitted, elapsed))
    if mode == "latency":
        # delay() = Client.submit (returns on the broker's ACK); get() = Client.wait (the result).
        # The broker sends the TASK before the ACK, so the task runs while delay() still waits.
        stats = pstats.Stats(profile).stats
        split = {name: sum(v[3] for k, v in stats.items()
                           if k[2] == name and k[0].endswith(os.path.join("embedq", "client.py")))
                 for name in ("submit", "wait")}
        print(f"where the client waited, per trip: in delay() until the ACK "
              f"{split['submit'] / trips * 1e6:.0f} µs, in get() after it {split['wait'] / trips * 1e6:.0f} µs")
    print(_top(profile, limit))
    bench_tasks.app.close()


def _client_process(url, args):
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--client", url, "--trips", str(args.trips),
         "--mode", args.mode, "--limit", str(args.limit), "--threads", str(args.threads)],
        env=child_env(), stdin=subprocess.DEVNULL)


def _stop(*processes):
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


#: Where the loops block: pyzmq's Poller.poll, or embedq.transport.wait_readable (zmq_poll).
_WAITS = ((os.path.join("zmq", "sugar", "poll.py"), "poll"),
          (os.path.join("embedq", "transport.py"), "wait_readable"))


def _time_waiting(stats):
    """Seconds spent blocked in the loop's poll (outermost wait function only: no double count)."""
    waits = {k for k in stats.stats if any(k[0].endswith(f) and k[2] == n for f, n in _WAITS)}
    total = 0.0
    for key in waits:
        cc, nc, tt, ct, callers = stats.stats[key]
        nested = sum(c[3] for caller, c in callers.items() if caller in waits)
        total += ct - nested
    return total


def _report_loop(title, profile, elapsed, limit):
    stats = pstats.Stats(profile)
    waited = _time_waiting(stats)
    print("=" * 30, title, "=" * 30)
    print(f"profiled for {elapsed:.2f} s: {waited:.2f} s waiting in zmq poll, "
          f"{elapsed - waited:.2f} s working ({(elapsed - waited) / elapsed:.0%} of one core, "
          "inflated by cProfile)")
    print(_top(profile, limit))
    print(_top(profile, limit, sort="cumulative"))


def _count_iterations(broker):
    """Record, per loop iteration (= one LMDB commit), how many messages of each command it had."""
    from collections import Counter

    per_iteration = []
    handle = getattr(broker, "_iterate", None)
    if handle is None:
        return None

    def counting(messages):
        # frames: [identity, protocol, command, ...]
        per_iteration.append(Counter(m[2] if len(m) > 2 else b"?" for m in messages))
        handle(messages)

    broker._iterate = counting
    return per_iteration


def _report_iterations(per_iteration):
    if per_iteration is None:
        return
    n = len(per_iteration) or 1
    submits = [c[b"SUBMIT"] for c in per_iteration]
    results = [c[b"RESULT"] for c in per_iteration]
    with_submit = [x for x in submits if x]
    print(f"{len(per_iteration)} loop iterations (one write transaction each): "
          f"{sum(sum(c.values()) for c in per_iteration) / n:.1f} messages per iteration; "
          f"{100 * (n - len(with_submit)) / n:.0f}% carried no SUBMIT; those with SUBMITs carried "
          f"{sum(with_submit) / max(1, len(with_submit)):.1f} on average (group commit); "
          f"RESULT messages per iteration {sum(results) / n:.2f}")


def _cpu_snapshot(client, worker):
    """CPU seconds (user + system) so far of each process taking part, and the wall clock."""
    import psutil

    def cpu(process):
        try:
            times = process.cpu_times()
            return times.user + times.system
        except psutil.NoSuchProcess:
            return 0.0

    import threading

    main_tid = threading.main_thread().native_id
    broker_threads = psutil.Process().threads()
    loop = sum(t.user_time + t.system_time for t in broker_threads if t.id == main_tid)
    found = {"client": cpu(psutil.Process(client.pid)), "broker loop": loop,
             "(of which in the kernel)": sum(t.system_time for t in broker_threads if t.id == main_tid),
             "broker zmq I/O thread": sum(t.user_time + t.system_time for t in broker_threads) - loop}
    if worker is not None:
        node = psutil.Process(worker.pid)
        found["worker node (supervisor)"] = cpu(node)
        found["pool processes"] = sum(cpu(child) for child in node.children(recursive=True))
    found["wall"] = time.perf_counter()
    return found


def _report_cpu(before, after, tasks):
    wall = after.pop("wall") - before.pop("wall")
    parts = ", ".join(f"{name} {(after[name] - before.get(name, 0.0)) / tasks * 1e6:.0f}"
                      for name in after)
    total = sum(after[name] - before.get(name, 0.0) for name in after if not name.startswith("("))
    print("=" * 30, "CPU during the clean pass (no profiler)", "=" * 30)
    print(f"µs of CPU per task: {parts}; total {total / tasks * 1e6:.0f} "
          f"(wall {wall / tasks * 1e6:.0f} µs per task; 2 cores give {2 * wall / tasks * 1e6:.0f})")


def broker_main(args):
    durability, limit = args.durability, args.limit
    from embedq.broker import Broker

    workdir = tempfile.mkdtemp(prefix="embedq-profile-", dir=os.environ.get("BENCH_TMPDIR"))
    worker = client = None
    broker = Broker(os.path.join(workdir, "data"), f"ipc://{workdir}/broker.sock",
                    durability=durability, heartbeat=0.5)
    try:
        worker = None if args.mode == "submit" else subprocess.Popen(
            [sys.executable, "-m", "embedq.worker", "-A", "bench_tasks", "--broker", broker.endpoint,
             "-c", "2", "--loglevel", "WARNING"], env=child_env(), stdin=subprocess.DEVNULL)
        client = _client_process(broker.endpoint, args)
        # Serve unprofiled through the client's warm-up and clean pass, then profile its second
        # pass. The store's sequence counts submits and deliveries (one each per task).
        per_task = 1 if args.mode == "submit" else 2
        tasks = args.trips if args.mode in ("latency", "submit") else args.trips // args.threads * args.threads
        deadline = time.monotonic() + 600
        before = None
        while broker.store.seq < per_task * (WARMUP + tasks) and client.poll() is None:
            if before is None and broker.store.seq >= per_task * WARMUP:
                before = _cpu_snapshot(client, worker)  # the clean pass starts about now
            broker.poll_once(max_wait=0.05)
            if time.monotonic() > deadline:
                raise RuntimeError("the client did not finish its clean pass")
        if before is not None:
            _report_cpu(before, _cpu_snapshot(client, worker), tasks)
        iterations = _count_iterations(broker)  # None if the broker's loop has changed shape
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        while client.poll() is None:
            broker.poll_once(max_wait=0.05)
        profile.disable()
        elapsed = time.perf_counter() - started
        _report_loop(f"broker in-process ({durability}; cProfile on)", profile, elapsed, limit)
        _report_iterations(iterations)
    finally:
        _stop(client, worker)
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--durability", choices=("process", "fsync"), default="process")
    parser.add_argument("--trips", type=int, default=2000)
    parser.add_argument("--mode", choices=("latency", "submit", "throughput"), default="latency")
    parser.add_argument("--threads", type=int, default=1, help="client threads (throughput mode)")
    parser.add_argument("--limit", type=int, default=18, help="functions listed per profile")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client, args.trips, args.mode, args.limit, args.threads)
    else:
        broker_main(args)


if __name__ == "__main__":
    main()
