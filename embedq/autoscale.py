"""Autoscale (``--autoscale max,min``): how many pool processes a node runs. Pure logic.

The rule, checked every ``AUTOSCALE_INTERVAL`` seconds, one change at a time:

- **grow** by one process (up to ``max``) when every process is running a task and at least one
  of them has a prefetched delivery waiting behind it: the pool is saturated *and* work keeps
  coming. Never while a new process is still starting (not serving yet), so a burst does not
  spawn several processes before the first one could take work. Growth therefore needs a
  prefetch multiplier of at least 2 (the default is 4): with 1 there is never a delivery waiting.
- **shrink** by one process (down to ``min``) when a process has been idle, with nothing
  prefetched, for ``idle`` seconds (``worker_autoscale_idle``, default 30 s as Celery's
  keepalive). The idle process with the highest index retires: it hands back anything that
  reached it meanwhile and exits, and it is not replaced.

Prefetched deliveries stay with the process they were sent to, so a new process may find nothing
left to take. When a process retires without having run a single task, growing did not help:
from then on the pool grows again only once new deliveries have arrived since the last decision
(work is still flowing), which keeps a node from spawning and retiring a process forever while
its existing processes work through what they prefetched.

A node starts with ``min`` processes.
"""

from typing import NamedTuple

#: Seconds between autoscale decisions.
AUTOSCALE_INTERVAL = 0.5

GROW = "grow"


class Load(NamedTuple):
    """One pool process as the supervisor sees it (from its status array)."""

    index: int
    busy: bool
    waiting: int
    idle_since: float   # time.monotonic() it last became idle
    serving: bool       # started and ready to take work
    ran: int            # tasks it has run
    received: int       # deliveries it has received
    retiring: bool      # already asked to leave


def parse(spec):
    """``"max,min"`` or ``"max"`` (min 1) -> (max, min); ValueError if it makes no sense."""
    parts = [part.strip() for part in str(spec).split(",")]
    if len(parts) not in (1, 2) or not all(part.isdigit() for part in parts):
        raise ValueError(f"--autoscale takes MAX,MIN (two whole numbers), not {spec!r}")
    maximum = int(parts[0])
    minimum = int(parts[1]) if len(parts) == 2 else 1
    if minimum > maximum:
        minimum, maximum = maximum, minimum  # Celery accepts either order
    if minimum < 1:
        raise ValueError("--autoscale needs at least one process (MIN >= 1)")
    return maximum, minimum


class Autoscaler:
    def __init__(self, maximum, minimum, idle):
        self.maximum, self.minimum = maximum, minimum
        #: seconds a process must be idle before it is retired
        self.idle = idle
        #: a process retired without running anything: grow only while deliveries keep arriving
        self.futile = False
        self.received = 0

    def decide(self, loads, now):
        """GROW, the index of a process to retire, or None."""
        received = sum(load.received for load in loads)
        arrived, self.received = received > self.received, received
        active = [load for load in loads if not load.retiring]
        if (len(loads) < self.maximum and active
                and all(load.serving and load.busy for load in active)
                and any(load.waiting for load in active) and (arrived or not self.futile)):
            self.futile = False
            return GROW
        if len(active) > self.minimum:
            idle = [load for load in active if load.serving and not load.busy and not load.waiting
                    and now - load.idle_since >= self.idle]
            if idle:
                chosen = max(idle, key=lambda load: load.index)
                self.futile = self.futile or chosen.ran == 0
                return chosen.index
        return None
