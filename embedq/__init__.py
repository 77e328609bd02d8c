"""embedq: Celery's programming model with the broker built in.

    app = embedq.App("tasks")

    @app.task
    def add(x, y):
        return x + y

    with embedq.start(app, workers=2):
        print(add.delay(2, 3).get(timeout=10))
"""

from . import states
from .app import App, Celery
from .embedded import Cluster, start
from .errors import (
    BrokerUnavailable,
    ConfigurationError,
    DataDirLocked,
    EmbedqError,
    MaxRetriesExceededError,
    NotRegistered,
    RemoteTaskError,
    Retry,
    SoftTimeLimitExceeded,
    StorageFull,
    TaskRevokedError,
    TimeLimitExceeded,
    TimeoutError,
    UnknownTaskError,
    WorkerLostError,
)
from .canvas import Signature, chain, chord, chunks, group, signature, subtask
from .result import AsyncResult, GroupResult
from .schedules import crontab, schedule
from .task import Task

__version__ = "0.1.0"

__all__ = [
    "App", "Celery", "Task", "AsyncResult", "GroupResult", "Cluster", "start", "states",
    "Signature", "signature", "subtask", "chain", "group", "chord", "chunks", "crontab", "schedule",
    "EmbedqError", "ConfigurationError", "BrokerUnavailable", "DataDirLocked", "NotRegistered",
    "RemoteTaskError", "StorageFull", "TaskRevokedError", "TimeoutError", "UnknownTaskError",
    "WorkerLostError", "SoftTimeLimitExceeded", "TimeLimitExceeded", "Retry", "MaxRetriesExceededError",
]
