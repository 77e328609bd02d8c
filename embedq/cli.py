"""Command lines: ``python -m embedq.broker``, ``python -m embedq.worker`` and ``embedq``.

The only place that configures logging.
"""

import argparse
import importlib
import ipaddress
import logging
import os
import sys
from urllib.parse import urlparse

from .config import Settings

DEFAULT_BIND = "tcp://127.0.0.1:5555"


def configure_logging(level):
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")


def check_bind_address(endpoint, insecure):
    """Refuse to listen beyond this machine without authentication (CurveZMQ comes later)."""
    url = urlparse(endpoint)
    if url.scheme != "tcp" or insecure:
        return
    host = url.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(
            f"refusing to bind {endpoint}: it is reachable from other machines and peers are not "
            "authenticated (task payloads are pickles, i.e. code). Bind 127.0.0.1, or pass "
            "--insecure if the network is trusted.")


def broker_parser():
    defaults = Settings.from_environment()
    parser = argparse.ArgumentParser(prog="embedq broker", description="Run an embedq broker.")
    parser.add_argument("--bind", default=DEFAULT_BIND, help="ZeroMQ endpoint (default %(default)s)")
    parser.add_argument("--data-dir", default=defaults.broker_data_dir or "./embedq-data",
                        help="LMDB directory (default %(default)s)")
    parser.add_argument("--durability", choices=("fsync", "process"),
                        default=defaults.broker_durability)
    parser.add_argument("--heartbeat", type=float, default=defaults.broker_heartbeat)
    parser.add_argument("--liveness", type=int, default=defaults.broker_heartbeat_liveness)
    parser.add_argument("--result-expires", type=float, default=defaults.result_expires,
                        help="seconds results are kept; 0 keeps them forever")
    parser.add_argument("--max-redeliveries", type=int, default=defaults.broker_max_redeliveries,
                        help="crash deliveries before a task becomes a dead letter (0: never)")
    parser.add_argument("--max-store-size", type=int, default=defaults.broker_max_store_size,
                        help="LMDB size cap in bytes; submits fail with StorageFull beyond it")
    parser.add_argument("--max-message-size", type=int, default=defaults.broker_max_message_size)
    parser.add_argument("--beat", action=argparse.BooleanOptionalAction, default=True,
                        help="fire periodic tasks (default: on); --no-beat stores entries only")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback address without authentication")
    parser.add_argument("-l", "--loglevel", default="INFO")
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    return parser


def broker_main(argv=None):
    args = broker_parser().parse_args(argv)
    configure_logging(args.loglevel)
    check_bind_address(args.bind, args.insecure)
    from .broker import run
    from .errors import DataDirLocked

    try:
        run(args.data_dir, args.bind, durability=args.durability, ready_fd=args.ready_fd,
            parent_pid=args.parent_pid, heartbeat=args.heartbeat, liveness=args.liveness,
            result_expires=args.result_expires or None, max_store_size=args.max_store_size,
            max_redeliveries=args.max_redeliveries,
            max_message_size=args.max_message_size, beat=args.beat)
    except DataDirLocked as exc:
        raise SystemExit(f"embedq broker: {exc}") from None


def worker_parser():
    defaults = Settings.from_environment()
    parser = argparse.ArgumentParser(prog="embedq worker", description="Run an embedq worker node.")
    parser.add_argument("-A", "--app", required=True,
                        help="module defining the tasks (module, module:attr or module.attr)")
    parser.add_argument("-b", "--broker", default=defaults.broker_url,
                        help="broker endpoint, e.g. tcp://127.0.0.1:5555 (default: the app's "
                             "broker_url, or $EMBEDQ_BROKER_URL)")
    parser.add_argument("-c", "--concurrency", type=int, help="pool processes (default: CPUs)")
    parser.add_argument("-n", "--hostname", help="node name, %%h is replaced by the host name")
    parser.add_argument("-Q", "--queues", help="comma-separated queues to consume")
    parser.add_argument("--prefetch-multiplier", type=int)
    parser.add_argument("--time-limit", type=_seconds, metavar="SECONDS",
                        help="hard time limit of tasks that set none: the pool process is killed "
                             "and the task fails with TimeLimitExceeded (default: task_time_limit)")
    parser.add_argument("--soft-time-limit", type=_seconds, metavar="SECONDS",
                        help="soft time limit of tasks that set none: SoftTimeLimitExceeded is "
                             "raised in the task (default: task_soft_time_limit)")
    parser.add_argument("--max-tasks-per-child", type=_positive_int, metavar="N",
                        help="replace a pool process after N tasks (default: never)")
    parser.add_argument("--max-memory-per-child", type=_positive_int, metavar="KIB",
                        help="replace a pool process whose resident memory exceeds KIB KiB after "
                             "a task (default: no limit)")
    parser.add_argument("--autoscale", metavar="MAX,MIN",
                        help="between MIN and MAX pool processes: grow while all are busy and "
                             "work is waiting, retire one idle for --autoscale-idle seconds")
    parser.add_argument("--autoscale-idle", type=_seconds, metavar="SECONDS",
                        help="idle time before autoscale retires a process (default: "
                             "worker_autoscale_idle, 30)")
    parser.add_argument("--soft-shutdown-timeout", type=float, metavar="SECONDS",
                        help="warm shutdown (first SIGTERM/SIGINT): seconds running tasks get to "
                             "finish before the pool is killed; 0 stops at once (default: "
                             "worker_soft_shutdown_timeout, 10)")
    parser.add_argument("--beat", action=argparse.BooleanOptionalAction, default=True,
                        help="register the app's periodic tasks with the broker (default: on)")
    parser.add_argument("-l", "--loglevel", default="INFO")
    return parser


def _seconds(text):
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def load_app(spec):
    """``tasks``, ``tasks:app`` or ``tasks.app`` -> the App object."""
    from .app import App

    sys.path.insert(0, os.getcwd())
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        if attribute or "." not in spec:
            raise
        module_name, attribute = spec.rsplit(".", 1)
        module = importlib.import_module(module_name)
    if attribute:
        return getattr(module, attribute)
    for name in ("app", "celery"):
        if isinstance(getattr(module, name, None), App):
            return getattr(module, name)
    found = [value for value in vars(module).values() if isinstance(value, App)]
    if len(found) != 1:
        raise SystemExit(f"found {len(found)} embedq apps in {module_name}; name one as "
                         f"-A {module_name}:ATTRIBUTE")
    return found[0]


def worker_main(argv=None):
    args = worker_parser().parse_args(argv)
    configure_logging(args.loglevel)
    app = load_app(args.app)
    broker = args.broker or app.conf.broker_url
    if not broker:
        raise SystemExit("no broker address: pass --broker tcp://HOST:PORT or set app.conf.broker_url")
    from .autoscale import parse as parse_autoscale
    from .worker import run

    try:
        autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    except ValueError as exc:
        raise SystemExit(f"embedq worker: {exc}") from None
    if args.beat:
        from .periodic import sync_in_background

        try:
            sync_in_background(app, broker)
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"embedq worker: bad periodic task in {args.app}: {exc}") from None
    run(app, broker, concurrency=args.concurrency, name=args.hostname,
        queues=args.queues.split(",") if args.queues else None,
        prefetch_multiplier=args.prefetch_multiplier, time_limit=args.time_limit,
        soft_time_limit=args.soft_time_limit, max_tasks_per_child=args.max_tasks_per_child,
        max_memory_per_child=args.max_memory_per_child, autoscale=autoscale,
        autoscale_idle=args.autoscale_idle, shutdown_timeout=args.soft_shutdown_timeout)


def beat_parser():
    defaults = Settings.from_environment()
    parser = argparse.ArgumentParser(prog="embedq beat", description="Manage periodic tasks.")
    parser.add_argument("action", choices=("list", "sync", "pause", "resume", "remove"))
    parser.add_argument("names", nargs="*", help="entry names (pause, resume, remove)")
    parser.add_argument("-A", "--app", help="module defining the app (sync)")
    parser.add_argument("-b", "--broker", default=defaults.broker_url,
                        help="broker endpoint (default: the app's broker_url or $EMBEDQ_BROKER_URL)")
    return parser


def beat_main(argv=None):
    """``embedq beat list|sync|pause|resume|remove``; exit status 1 for an unknown entry name."""
    parser = beat_parser()
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    from .app import App
    from .client import Client
    from .periodic import describe

    app = load_app(args.app) if args.app else App("embedq-cli")
    url = args.broker or app.conf.broker_url
    if not url:
        raise SystemExit("no broker address: pass --broker tcp://HOST:PORT")
    if args.action == "sync" and not args.app:
        parser.error("sync needs -A/--app")
    if args.action in ("pause", "resume", "remove") and not args.names:
        parser.error(f"{args.action} needs entry names")
    client = Client(url, app.conf)
    try:
        if args.action == "list":
            print(f"{'NAME':30} {'TASK':26} {'SCHEDULE':28} {'POLICY':6} {'NEXT RUN (UTC)':19} RUNS")
            for entry in app.beat.list(client):
                next_run = "paused" if entry["paused"] else f"{entry['next_run']:%Y-%m-%d %H:%M:%S}"
                print(f"{entry['name']:30} {entry['task']:26} {describe(entry['schedule']):28} "
                      f"{entry['policy']:6} {next_run:19} {entry['runs']}")
        elif args.action == "sync":
            for name in app.beat.sync(client):
                print(f"registered {name}")
        else:
            missing = []
            for name in args.names:
                try:
                    getattr(app.beat, args.action)(name, client)
                except KeyError:
                    missing.append(name)
            if missing:
                raise SystemExit(f"embedq beat: no periodic entry named {', '.join(missing)}")
    finally:
        client.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"broker": broker_main, "worker": worker_main, "beat": beat_main}
    if not argv or argv[0] not in commands:
        print("usage: embedq {broker,worker,beat} [options]   (embedq COMMAND --help for options)",
              file=sys.stderr)
        return 2
    commands[argv[0]](argv[1:])
    return 0
