"""Real processes for every test: brokers and worker nodes are started, killed and reaped here.

Nothing is mocked. Processes are addressed by pid (never by name) and every one started here is
killed at teardown, whatever the test did.
"""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from embedq.embedded import start_broker_process

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
#: the raw-socket peers and their fixtures (peers, raw_worker, assert_serves) for protocol tests
pytest_plugins = ["raw_peers", "broker_loop"]
#: Fast liveness for tests: eviction after 0.2 * 3 = 0.6 s of silence.
TEST_HEARTBEAT = 0.2


def pytest_collection_modifyitems(config, items):
    """Soak runs are opt-in: they run only when ``-m`` names them (``-m soak``)."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="a soak run: opt in with -m soak")
    for item in items:
        if item.get_closest_marker("soak"):
            item.add_marker(skip)


def wait_until(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until true or fail after ``timeout`` seconds (no bare sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def record_waits(monkeypatch):
    """The ids of every WAIT this process's client sends from now on, a list per WAIT."""
    from embedq import protocol as P
    from embedq.client import Connection

    waits = []
    real_send = Connection.send

    def send(self, frames):
        if frames[1] == P.WAIT:
            waits.append(P.decode(frames[2])["ids"])
        return real_send(self, frames)

    monkeypatch.setattr(Connection, "send", send)
    return waits


def _environment():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, env.get("PYTHONPATH")]))
    return env


class BrokerProcess:
    def __init__(self, data_dir, durability="process", bind="tcp://127.0.0.1:0", heartbeat=TEST_HEARTBEAT,
                 extra_args=()):
        self.data_dir = data_dir
        self.durability = durability
        self.heartbeat = heartbeat
        self.bind = bind
        self.extra_args = list(extra_args)  # more broker options, e.g. ["--max-store-size", "N"]
        self.process = None
        self.url = None

    def start(self):
        bind = self.url or self.bind  # a restart reuses the same port
        self.process, self.url = start_broker_process(
            bind, self.data_dir, durability=self.durability, env=_environment(),
            extra_args=["--heartbeat", str(self.heartbeat), "--loglevel", "WARNING", *self.extra_args])
        return self

    @property
    def pid(self):
        return self.process.pid

    def kill(self, sig=signal.SIGKILL):
        self.process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.process.wait(10)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class WorkerProcess:
    def __init__(self, broker_url, concurrency=2, name="w", queues=None, prefetch=None, args=(),
                 app="testapp", env=None):
        command = [sys.executable, "-m", "embedq.worker", "-A", app, "--broker", broker_url,
                   "-c", str(concurrency), "-n", name, "--loglevel", "WARNING"]
        if prefetch:
            command += ["--prefetch-multiplier", str(prefetch)]
        if queues:
            command += ["-Q", ",".join(queues)]
        command += list(args)  # more worker options, e.g. ["--time-limit", "1"]
        self.process = subprocess.Popen(command, env={**_environment(), **(env or {})},
                                        stdin=subprocess.DEVNULL)
        self.pid = self.process.pid

    def children(self):
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.pid, sig)
        if sig == signal.SIGKILL:
            self.process.wait(10)

    def stop(self):
        children = self.children()
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.process.kill()
            self.process.wait(10)
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def broker(tmp_path):
    handle = BrokerProcess(str(tmp_path / "data")).start()
    yield handle
    handle.stop()


@pytest.fixture
def start_worker(broker):
    started = []

    def start(concurrency=2, name=None, queues=None, prefetch=None, args=()):
        worker = WorkerProcess(broker.url, concurrency, name or f"w{len(started)}", queues, prefetch,
                               args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def app(broker):
    """The test app, pointed at this test's broker; its client is closed afterwards."""
    import testapp

    testapp.app.conf.broker_url = broker.url
    testapp.app.conf.broker_resend_interval = 0.3
    yield testapp.app
    testapp.app.close()
    testapp.app.conf.broker_url = None


sys.path.insert(0, TESTS_DIR)


def process_gone(process):
    """True once a ``psutil.Process`` has exited. A zombie counts as gone: it runs nothing, and an
    orphan's zombie may never be reaped (PID 1 of a container or VM need not reap orphans)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pid_gone(pid):
    """``process_gone`` by pid (a pid that no longer exists is gone too)."""
    try:
        return process_gone(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def marks(tmp_path):
    """A directory for the marker files tasks leave (one per run), apart from the data dir."""
    path = tmp_path / "marks"
    path.mkdir()
    return path


def pool_children(pid):
    """The pool processes of the worker node ``pid`` (its ``multiprocessing`` spawn children, not
    the resource tracker that ``multiprocessing`` also starts)."""
    found = []
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            if "--multiprocessing-fork" in child.cmdline() and not process_gone(child):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found
