"""Retry policy: when to run a failed task again. Pure functions, Celery's rules and defaults.

- ``self.retry(exc=..., countdown=..., eta=..., max_retries=...)`` in a bound task ends the run
  with :class:`embedq.errors.Retry`; the broker holds the task and delivers it again when due.
  With no retries left it re-raises ``exc`` (or ``MaxRetriesExceededError``) so the task fails.
- ``autoretry_for=(Exc, ...)`` retries those exceptions (minus ``dont_autoretry_for``) by itself,
  after ``default_retry_delay`` seconds, or with ``retry_backoff`` after an exponential delay:
  ``min(retry_backoff_max, factor * 2 ** retries)``, drawn uniformly from ``[0, delay]`` when
  ``retry_jitter`` is on (full jitter, as Celery's ``get_exponential_backoff_interval``).
"""

import random

from .errors import MaxRetriesExceededError, Retry


def backoff_delay(factor, retries, maximum, jitter, rng=random):
    """Seconds before retry number ``retries + 1`` with exponential backoff."""
    delay = min(maximum, factor * (2 ** retries))
    if jitter:
        delay = rng.randrange(int(delay) + 1) if delay >= 1 else rng.uniform(0, delay)
    return max(0.0, delay)


def autoretry_countdown(task, retries, rng=random):
    """The countdown ``autoretry_for`` uses for retry number ``retries + 1``."""
    if task.retry_backoff:
        factor = 1 if task.retry_backoff is True else task.retry_backoff
        return backoff_delay(factor, retries, task.retry_backoff_max, task.retry_jitter, rng)
    return task.default_retry_delay


def wants_autoretry(task, exc):
    return (bool(task.autoretry_for) and isinstance(exc, tuple(task.autoretry_for))
            and not isinstance(exc, tuple(task.dont_autoretry_for or ())))


def retry_signal(request, exc, countdown, eta, max_retries, default_delay, now):
    """The :class:`Retry` to raise for a retry decision, or the exception that ends the task."""
    if max_retries is not None and request.retries >= max_retries:
        if exc is not None:
            return exc
        return MaxRetriesExceededError(
            f"can't retry {request.task}[{request.id}]: max_retries={max_retries} reached")
    if eta is not None:
        when = eta.timestamp() if hasattr(eta, "timestamp") else float(eta)
    else:
        when = now + (default_delay if countdown is None else countdown)
    return Retry(exc=exc, when=when)
