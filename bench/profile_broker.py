"""Profile where a no-op round trip spends its time: cProfile of the broker and of the client.

py-spy is not available here, so the broker runs *in this process* (``embedq.broker.Broker``,
the same class ``python -m embedq.broker`` runs) under cProfile, with a worker node
(``python -m embedq.worker -A bench_tasks -c 2``) and a client in subprocesses. The client runs
the same latency loop as ``test_bench_core.py`` (``noop.delay().get()``, one at a time) under its
own cProfile and reports per-trip wall times; then it exits and the broker profile is printed.

    python bench/profile_broker.py [--durability process|fsync] [--trips 2000]
                                   [--mode latency|throughput] [--threads 1] [--target broker|node]

``--mode throughput`` instead submits ``--trips`` tasks with ``delay()`` and then gets them all,
from ``--threads`` client threads (each its share; the client profile then covers the main
thread only). ``--target node`` profiles the worker node's supervisor loop in this process
instead (``embedq.worker.WorkerNode``), with the broker as ``python -m embedq.broker``.

Output: the client's timings and top functions (by own time), then the profiled loop's top
functions and its split between waiting in ``poll`` and working.
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


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [BENCH_DIR, env.get("PYTHONPATH")]))
    return env


def _top(profile, limit, sort="tottime"):
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    return out.getvalue()


def client_main(url, trips, mode, limit, threads=1):
    """Runs in a subprocess: warm up, then the profiled loop; prints timings and the profile."""
    import bench_tasks

    bench_tasks.app.conf.broker_url = url
    for _ in range(200):
        bench_tasks.noop.delay().get(timeout=30)
    profile = cProfile.Profile()
    times = []
    started = time.perf_counter()
    profile.enable()
    if mode == "latency":
        for _ in range(trips):
            t0 = time.perf_counter()
            bench_tasks.noop.delay().get(timeout=30)
            times.append(time.perf_counter() - t0)
    elif threads == 1:
        results = [bench_tasks.noop.delay() for _ in range(trips)]
        submitted = time.perf_counter()
        for result in results:
            result.get(timeout=120)
    else:
        import threading

        def share(n):
            for result in [bench_tasks.noop.delay() for _ in range(n)]:
                result.get(timeout=120)

        workers = [threading.Thread(target=share, args=(trips // threads,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        submitted = None
    profile.disable()
    elapsed = time.perf_counter() - started
    print("=" * 30, "client (cProfile on; adds overhead)", "=" * 30)
    if times:
        times.sort()
        print(f"{trips} round trips: p50 {times[len(times) // 2] * 1e6:.0f} µs, "
              f"p99 {times[int(len(times) * 0.99)] * 1e6:.0f} µs, total {elapsed:.2f} s")
        # delay() = Client.submit (returns on the broker's ACK); get() = Client.wait (the result)
        stats = pstats.Stats(profile).stats
        split = {name: sum(v[3] for k, v in stats.items()
                           if k[2] == name and k[0].endswith(os.path.join("embedq", "client.py")))
                 for name in ("submit", "wait")}
        print(f"per trip: delay() (submit until ACK) {split['submit'] / trips * 1e6:.0f} µs, "
              f"get() (ACK until result) {split['wait'] / trips * 1e6:.0f} µs")
    elif submitted is not None:
        print(f"{trips} tasks: submit {trips / (submitted - started):.0f}/s, "
              f"end to end {trips / elapsed:.0f} tasks/s")
    else:
        done = trips // threads * threads
        print(f"{done} tasks from {threads} threads: end to end {done / elapsed:.0f} tasks/s")
    print(_top(profile, limit))
    bench_tasks.app.close()


def _client_process(url, args):
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--client", url, "--trips", str(args.trips),
         "--mode", args.mode, "--limit", str(args.limit), "--threads", str(args.threads)],
        env=_env(), stdin=subprocess.DEVNULL)


def _stop(*processes):
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _report_loop(title, profile, elapsed, limit):
    stats = pstats.Stats(profile)
    # zmq.Poller.poll (zmq/sugar/poll.py) is where both loops block; Socket.poll calls it too
    waited = sum(v[3] for k, v in stats.stats.items()
                 if k[2] == "poll" and k[0].endswith(os.path.join("zmq", "sugar", "poll.py")))
    print("=" * 30, title, "=" * 30)
    print(f"profiled for {elapsed:.2f} s: {waited:.2f} s waiting in zmq poll, "
          f"{elapsed - waited:.2f} s working ({(elapsed - waited) / elapsed:.0%} of one core, "
          "inflated by cProfile)")
    print(_top(profile, limit))
    print(_top(profile, limit, sort="cumulative"))


def broker_main(args):
    durability, limit = args.durability, args.limit
    from embedq.broker import Broker

    workdir = tempfile.mkdtemp(prefix="embedq-profile-", dir=os.environ.get("BENCH_TMPDIR"))
    worker = client = None
    broker = Broker(os.path.join(workdir, "data"), f"ipc://{workdir}/broker.sock",
                    durability=durability, heartbeat=0.5)
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", "embedq.worker", "-A", "bench_tasks", "--broker", broker.endpoint,
             "-c", "2", "--loglevel", "WARNING"], env=_env(), stdin=subprocess.DEVNULL)
        client = _client_process(broker.endpoint, args)
        # Serve unprofiled until the client's warm-up is over (its first 200 trips), then profile.
        deadline = time.monotonic() + 60
        while broker.store.seq < 2 * 200 and time.monotonic() < deadline:
            broker.poll_once(max_wait=0.05)
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        while client.poll() is None:
            broker.poll_once(max_wait=0.05)
        profile.disable()
        elapsed = time.perf_counter() - started
        _report_loop(f"broker in-process ({durability}; cProfile on)", profile, elapsed, limit)
    finally:
        _stop(client, worker)
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def node_main(args):
    import bench_tasks
    from embedq.embedded import start_broker_process
    from embedq.worker import WorkerNode

    workdir = tempfile.mkdtemp(prefix="embedq-profile-", dir=os.environ.get("BENCH_TMPDIR"))
    broker_process = client = node = None
    try:
        broker_process, url = start_broker_process(
            f"ipc://{workdir}/broker.sock", os.path.join(workdir, "data"), durability=args.durability,
            extra_args=["--loglevel", "WARNING"])
        node = WorkerNode(bench_tasks.app, url, concurrency=2)
        node.start()
        client = _client_process(url, args)
        deadline = time.monotonic() + 60
        while sum(c.tasks_run for c in node.children) < 200 and time.monotonic() < deadline:
            node.poll_once(max_wait=0.05)
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        while client.poll() is None:
            node.poll_once(max_wait=0.05)
        profile.disable()
        elapsed = time.perf_counter() - started
        _report_loop(f"worker node in-process ({args.durability}; cProfile on)", profile, elapsed,
                     args.limit)
    finally:
        _stop(client)
        if node is not None:
            node.stop()
        _stop(broker_process)
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--durability", choices=("process", "fsync"), default="process")
    parser.add_argument("--trips", type=int, default=2000)
    parser.add_argument("--mode", choices=("latency", "throughput"), default="latency")
    parser.add_argument("--threads", type=int, default=1, help="client threads (throughput mode)")
    parser.add_argument("--target", choices=("broker", "node"), default="broker",
                        help="which loop to run in-process under cProfile")
    parser.add_argument("--limit", type=int, default=18, help="functions listed per profile")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client, args.trips, args.mode, args.limit, args.threads)
    elif args.target == "node":
        node_main(args)
    else:
        broker_main(args)


if __name__ == "__main__":
    main()
