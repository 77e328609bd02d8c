"""Periodic tasks: the broker inside embedq.start() fires a 1 s interval entry; we watch 3 runs.

    python examples/periodic.py
"""

import tempfile
import time

import embedq
from embedq import crontab

app = embedq.App("periodic")


@app.task
def tick(label):
    return time.time(), label


# Celery's format; "policy" (embedq's) says what to do about runs missed while the broker was down
app.conf.beat_schedule = {
    "report": {"task": "periodic.tick", "schedule": crontab(minute="*/10"),
               "args": ("every ten minutes",), "policy": "once"},
}
app.add_periodic_task(1.0, tick, args=("every second",), name="tick")


if __name__ == "__main__":  # the worker processes import this file; the guard keeps them idle
    with tempfile.TemporaryDirectory() as data_dir, embedq.start(app, workers=1, data_dir=data_dir):
        seen = set()
        while len(seen) < 3:
            entries = {entry["name"]: entry for entry in app.beat.list()}
            slot = entries["tick"]["last_run"]
            if slot is not None and slot not in seen:
                seen.add(slot)
                # each run has a deterministic id, so its result can be found
                ran_at, label = app.AsyncResult(f"beat:tick:{slot.isoformat()}").get(timeout=10)
                print(f"{label}: slot {slot:%H:%M:%S.%f}, ran {1000 * (ran_at - slot.timestamp()):.1f} ms later")
            time.sleep(0.05)
        report = entries["report"]
        print(f"report: next run {report['next_run']:%Y-%m-%d %H:%M} UTC, schedule {report['schedule']}")
