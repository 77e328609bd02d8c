"""A task and a ``beat_schedule`` for the periodic-task tests (``python -m embedq.worker -A beatapp``).

The schedule is configured from the environment, so a test can start a worker node (which
registers it with the broker on start) without writing a module per test.
"""

import os
import time

import embedq

app = embedq.App("beatapp")

#: directory for the stamp files; no schedule without it
MARKERS = os.environ.get("BEATAPP_MARKERS")


@app.task(bind=True)
def stamp(self, marker_dir):
    """One file per execution, ``<task id>|<pid>.<ns>``, holding the wall-clock start time."""
    started = time.time()
    name = f"{self.request.id}|{os.getpid()}.{time.monotonic_ns()}"
    temporary = os.path.join(marker_dir, "." + name)
    with open(temporary, "w") as handle:
        handle.write(repr(started))
    os.replace(temporary, os.path.join(marker_dir, name))


if MARKERS:
    app.conf.beat_schedule = {
        "stamp": {"task": "beatapp.stamp", "schedule": float(os.environ.get("BEATAPP_INTERVAL", "1")),
                  "args": (MARKERS,), "policy": os.environ.get("BEATAPP_POLICY", "skip")},
    }
