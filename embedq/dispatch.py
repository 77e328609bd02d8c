"""Dispatch: which ready tasks go to which pool processes, once per broker loop iteration.

The best ready task (priority, then submit order; across all the queues a process consumes) goes
to processes with credit, shared fairly among them; each delivery is a lease with a fresh token,
recorded in the loop's transaction and sent just before its commit (broker.py says why that is
safe). A task whose type is over its rate
limit is scheduled for its reserved slot instead (ratelimit.py). A process that dispatch leaves
credit-bound while work waits is marked ``limited`` (its prefetch window may widen, peers.py).
"""

from . import protocol as P


class Dispatcher:
    def __init__(self, store, workers, limiter, on_due):
        self.store = store
        self.workers = workers
        self.limiter = limiter
        #: called with the due time of a task held back by its rate limit
        self.on_due = on_due

    def dispatch(self, batch, it, now):
        """Give ready tasks to pool processes with credit: best task first, shared fairly."""
        counts = self.store.ready_counts
        delta = batch.ready_delta
        if not delta and not any(counts.values()):
            return

        def ready(queue):
            return counts[queue] + delta[queue] > 0

        slots = self.workers.with_credit(ready, it.credit)
        while slots:
            queues = {q for s in slots for q in s.queues}
            share = max(1, sum(counts[q] + delta[q] for q in queues) // len(slots))
            still_hungry = []
            for slot in slots:
                if not any(map(ready, slot.queues)):  # the slots before it took what was left
                    continue
                credit = slot.credit + it.credit[slot]
                tasks = self._take(batch, slot, min(credit, share), now)
                if not tasks:
                    continue
                it.credit[slot] -= len(tasks)
                frames = []
                new_leases = {}
                for task_id, raw, payload in tasks:
                    token = batch.next_seq()
                    batch.lease(task_id, token, slot.key, now)
                    new_leases[token] = task_id
                    frames += (str(token).encode(), raw, payload)
                it.deliveries[slot.identity] += frames
                it.after_commit.append(lambda s=slot, leases=new_leases: s.leases.update(leases))
                if credit > len(tasks) and any(ready(q) for q in slot.queues):
                    still_hungry.append(slot)
            slots = still_hungry
        if sum(counts.values()) + sum(delta.values()) > 0:  # work is left: whoever is full is credit-bound
            for slot in self.workers.slots.values():
                if slot.credit + it.credit[slot] <= 0 and any(ready(q) for q in slot.queues):
                    slot.limited = True

    def _take(self, batch, slot, limit, now):
        """Up to ``limit`` of the best ready tasks for ``slot`` that their rate limits let start."""
        taken = []
        while len(taken) < limit:
            found = self._take_ready(batch, slot.queues, limit - len(taken))
            if not found:
                break
            taken += self._admitted(batch, found, now)
        return taken

    @staticmethod
    def _take_ready(batch, queues, limit):
        if len(queues) == 1:
            return batch.take_ready(queues[0], limit)
        taken = []
        while len(taken) < limit:  # several queues: best (priority, age) across all of them
            keys = [(k, q) for q in queues if (k := batch.peek_ready(q)) is not None]
            if not keys:
                break
            taken += batch.take_ready(min(keys)[1], 1)
        return taken

    def _admitted(self, batch, tasks, now):
        """Tasks whose type is over its rate limit wait in ``scheduled`` for their slot."""
        admitted = []
        for task in tasks:
            task_id, raw, _ = task
            if b'"rate_limit"' in raw:  # (a JSON string value cannot contain this unescaped)
                header = P.TaskHeader.parse(raw)
                due = header.rate and self.limiter.admit(task_id, header.task, header.rate, now)
                if header.rate:  # committed with the dispatch: a restart keeps the spacing
                    batch.set_rate_mark(header.task, self.limiter.next_free[header.task])
                if due:
                    batch.schedule(task_id.encode(), batch.task(task_id)[0], due)
                    self.on_due(due)
                    continue
            admitted.append(task)
        return admitted
