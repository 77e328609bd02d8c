"""The command lines, run as a user would: broker, worker and client as separate processes."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import TESTS_DIR, WorkerProcess

pytestmark = pytest.mark.timeout(60)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, env.get("PYTHONPATH")]))
    return env


def test_broker_worker_and_client_in_three_processes(broker):
    worker = WorkerProcess(broker.url, concurrency=2, name="cli1@%h")
    try:
        client = subprocess.run(
            [sys.executable, "-c", "import testapp; testapp.app.conf.broker_url = %r; "
             "print(testapp.add.delay(2, 3).get(timeout=20))" % broker.url],
            capture_output=True, text=True, timeout=40, env=_env())
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "5"
    finally:
        worker.stop()


def test_broker_url_from_the_environment(broker, start_worker):
    start_worker()
    env = _env()
    env["EMBEDQ_BROKER_URL"] = broker.url
    client = subprocess.run([sys.executable, "-c", "import testapp; print(testapp.add.delay(1, 1).get(timeout=20))"],
                            capture_output=True, text=True, timeout=40, env=env)
    assert client.stdout.strip() == "2", client.stderr


def test_console_script_lists_commands():
    script = shutil.which("embedq")
    assert script, "the embedq console script is installed by `pip install -e .`"
    completed = subprocess.run([script], capture_output=True, text=True, timeout=20)
    assert completed.returncode == 2
    assert "broker" in completed.stderr and "worker" in completed.stderr


def test_broker_refuses_an_unauthenticated_public_bind(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "embedq.broker", "--bind", "tcp://0.0.0.0:0", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=20)
    assert completed.returncode != 0
    assert "--insecure" in completed.stderr
    assert not (tmp_path / "data.mdb").exists()


def test_worker_with_an_unknown_app_module_fails_clearly(broker):
    completed = subprocess.run(
        [sys.executable, "-m", "embedq.worker", "-A", "no_such_module_here", "--broker", broker.url],
        capture_output=True, text=True, timeout=20, env=_env())
    assert completed.returncode != 0
    assert "no_such_module_here" in completed.stderr


def test_worker_without_a_broker_address_names_the_fix():
    env = _env()
    env.pop("EMBEDQ_BROKER_URL", None)
    completed = subprocess.run([sys.executable, "-m", "embedq.worker", "-A", "testapp"],
                               capture_output=True, text=True, timeout=20, env=env)
    assert completed.returncode != 0
    assert "--broker" in completed.stderr
