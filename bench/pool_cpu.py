"""Pool process CPU per task: a real ``PoolWorker`` loop in this process, fed one no-op task at
a time by a raw ROUTER standing in for the broker (in a subprocess).

    python bench/pool_cpu.py [--tasks 5000] [--profile tottime]

Prints the loop thread's CPU time per task (``time.thread_time``) and the round trip the fake
broker saw (TASK sent to RESULT received, mean), so changes to ``embedq/pool.py`` can be
measured without the rest of the system's noise.
"""

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from harness import child_env  # noqa: E402  (needs the path above)


def fake_broker(url, report_path, tasks):
    """Runs in the subprocess: WELCOME the pool process, then TASK -> RESULT, in turn, each TASK
    settling the previous result (as the broker's deferred SETTLED does)."""
    import zmq

    import bench_tasks
    from embedq import protocol as P

    router = zmq.Context().socket(zmq.ROUTER)
    router.bind(url)
    identity = router.recv_multipart()[0]  # its JOIN
    router.send_multipart([identity, P.PROTOCOL, P.WELCOME, P.encode({"broker": "fake", "drop": []})])
    messages = [bench_tasks.noop.build_message((), {}) for _ in range(tasks)]
    started = time.perf_counter()
    settled = b""
    for token, (_, header, payload) in enumerate(messages, 1):
        router.send_multipart([identity, P.PROTOCOL, P.TASK, settled, str(token).encode(), header, payload])
        while router.recv_multipart()[2] != P.RESULT:
            pass
        settled = str(token).encode()
    with open(report_path, "w") as report:
        report.write(f"{(time.perf_counter() - started) / tasks * 1e6:.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--profile", metavar="SORT", help="cProfile the loop, sorted by SORT")
    parser.add_argument("--broker", nargs=2, metavar=("URL", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.broker:
        return fake_broker(*args.broker, args.tasks)

    import bench_tasks
    from embedq.pool import CURRENT_SIZE, STATUS_FIELDS, PoolWorker

    workdir = tempfile.mkdtemp(prefix="embedq-pool-cpu-")
    url, report = f"ipc://{workdir}/broker.sock", os.path.join(workdir, "report")
    broker = subprocess.Popen([sys.executable, __file__, "--tasks", str(args.tasks), "--broker", url, report],
                              env=child_env())
    control, commands = multiprocessing.Pipe(duplex=False)
    worker = PoolWorker(control, multiprocessing.RawArray("d", STATUS_FIELDS), bench_tasks.app, "n1", 0,
                        url, 4, current=multiprocessing.RawArray("c", CURRENT_SIZE))
    commands.send_bytes(b"J0.5")  # join the broker (as the supervisor would say)

    def stop_when_done():
        broker.wait()
        commands.close()  # the loop exits when its control pipe closes

    threading.Thread(target=stop_when_done, daemon=True).start()
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    cpu = time.thread_time()
    worker.serve()
    cpu = time.thread_time() - cpu
    if profile is not None:
        import pstats

        profile.disable()
        pstats.Stats(profile).strip_dirs().sort_stats(args.profile).print_stats(30)
    with open(report) as trip:
        print(f"pool process loop: {cpu / args.tasks * 1e6:.1f} µs CPU per task; "
              f"TASK to RESULT at the fake broker {trip.read()} µs")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
