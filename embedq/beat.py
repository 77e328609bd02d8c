"""The broker's periodic scheduler ("beat"): entries in LMDB, runs enqueued by the broker loop.

::

    client (app.beat.sync)  --BEAT add: (entry JSON, args payload)*-->  Beat.handle
                                                                           | validate, store in
                                                                           v the `beat` db
    broker loop, every iteration:  Beat.fire_due(batch, now)  --> batch.add_task(run)
                                     reads the entry, asks missed_runs.due_runs which slots
                                     to enqueue, writes the new last/next slot: one transaction

There is one scheduler, inside the broker, because the broker owns the store: a run and the
entry state that records it are committed together, so a broker killed at any moment neither
fires a slot twice nor forgets one. Each run also has a deterministic task id
(``beat:<entry>:<slot ISO time>``), so the store's put-if-absent would refuse a second copy anyway.

The broker never pickles or unpickles: the client sends, per entry, a task header template (the
JSON ``Task.build_message`` makes, without id and eta) and the pickled (args, kwargs) payload; a
run is that template plus an id, and the same payload bytes. Schedules travel and are stored as
``schedules`` dicts (``to_dict()``), never as code.

In-memory state (``due``: each active entry's next slot) changes only after the transaction that
wrote it commits (``it.after_commit``), so an aborted attempt of the loop leaves nothing behind.
"""

import logging
from datetime import datetime, timedelta, timezone

from . import protocol as P
from .errors import ProtocolError
from .missed_runs import MISSED_RUN_POLICIES, due_runs
from .schedules import schedule, schedule_from_dict

log = logging.getLogger(__name__)

#: Longest entry name in UTF-8 bytes: the run's task id ``beat:<name>:<slot>`` must fit in 255.
MAX_ENTRY_NAME = 200
#: Shortest accepted interval (seconds); anything shorter would make beat a busy loop.
MIN_INTERVAL = 0.05
#: Longest display text of args/kwargs stored for listing (characters; longer is cut).
MAX_DISPLAY = 1000
#: Seconds beat waits before trying again while the store refuses submits (StorageFull).
FULL_RETRY = 1.0
#: Operations of the BEAT command.
OPS = ("add", "list", "pause", "resume", "remove")

UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_us(moment):
    """Aware datetime -> integer microseconds since the epoch (exact, unlike float seconds)."""
    return (moment - _EPOCH) // _MICROSECOND


def from_us(us):
    return _EPOCH + timedelta(microseconds=us)


def run_id(name, slot):
    """The task id of the run of entry ``name`` for ``slot``: the same after any restart."""
    return f"beat:{name}:{slot.isoformat()}"


class Beat:
    """Broker-side beat: the BEAT command and ``fire_due``, both inside the loop's transaction."""

    def __init__(self, store, enabled=True):
        self.enabled = enabled
        #: name -> next slot (µs) of every active entry (not paused, not failed)
        self.due = {}
        self.next_due = None
        #: while the store refuses submits, no firing before this time (µs)
        self.hold_until = 0
        for name, raw, _ in store.beat_entries():
            state = P.decode(raw)["state"]
            if not state["paused"] and state["next_run"] is not None:
                self.due[name] = state["next_run"]
        self._recompute()
        if self.due:
            log.info("beat: %d active entries%s", len(self.due), "" if enabled else " (not firing: --no-beat)")

    # -- timers --------------------------------------------------------------------------------
    def seconds_until_due(self, now):
        """Seconds until the next slot (<= 0: due now), or None when nothing will fire."""
        if not self.enabled or self.next_due is None:
            return None
        return max(self.next_due, self.hold_until) / 1e6 - now

    def _recompute(self):
        self.next_due = min(self.due.values(), default=None)

    def _reschedule(self, it, name, next_run):
        """After the commit: entry ``name`` is due at ``next_run`` µs (None: not at all)."""
        def apply():
            if next_run is None:
                self.due.pop(name, None)
            else:
                self.due[name] = next_run
            self._recompute()
        it.after_commit.append(apply)

    # -- firing --------------------------------------------------------------------------------
    def fire_due(self, batch, it, now, refuse_submits=False):
        """Enqueue every run that is due at ``now`` (seconds), with each entry's new state."""
        now_us = int(now * 1_000_000)
        if not self.enabled or self.next_due is None or self.next_due > now_us or self.hold_until > now_us:
            return 0
        if refuse_submits:  # like a client's submit: not now. The missed-run policy decides later.
            self.hold_until = now_us + int(FULL_RETRY * 1_000_000)
            log.warning("beat: store full, periodic runs held back")
            return 0
        fired = 0
        for name, due in sorted(self.due.items(), key=lambda item: item[1]):
            if due <= now_us:
                fired += self._fire_entry(batch, it, name, now_us)
        return fired

    def _fire_entry(self, batch, it, name, now_us):
        record = batch.beat_entry(name)
        if record is None:  # removed in this transaction
            self._reschedule(it, name, None)
            return 0
        raw, payload = record
        entry = P.decode(raw)
        state = entry["state"]
        if state["paused"] or state["next_run"] is None or state["next_run"] > now_us:
            self._reschedule(it, name, None if state["paused"] else state["next_run"])
            return 0
        try:
            runs = due_runs(schedule_from_dict(entry["schedule"]), from_us(state["handled"]), from_us(now_us),
                            entry["policy"], anchor=from_us(state["anchor"]))
        except Exception as exc:  # e.g. past the year 9999; one bad entry must not stop the broker
            log.error("beat: entry %r cannot be scheduled any more (%s); paused", name, exc)
            state.update(paused=True, error=str(exc)[:200])
            batch.put_beat_entry(name, P.encode(entry), payload)
            self._reschedule(it, name, None)
            return 0
        for slot in runs.fire_times:
            self._enqueue(batch, entry, payload, slot, now_us)
        if not runs.fire_times:
            log.info("beat: %r skipped missed slots up to %s (policy %s)", name,
                     runs.last_run.isoformat(), entry["policy"])
        state.update(handled=to_us(runs.last_run), next_run=to_us(runs.next_run),
                     runs=state["runs"] + len(runs.fire_times))
        if runs.fire_times:
            state["last_run"] = to_us(runs.fire_times[-1])
        batch.put_beat_entry(name, P.encode(entry), payload)
        self._reschedule(it, name, state["next_run"])
        return len(runs.fire_times)

    def _enqueue(self, batch, entry, payload, slot, now_us):
        header = dict(entry["header"], id=run_id(entry["name"], slot))
        if entry.get("expires") is not None:
            header["expires"] = to_us(slot) / 1e6 + entry["expires"]
        raw = P.encode(header)
        if not batch.add_task(P.TaskHeader.parse(raw), raw, payload, now_us / 1e6):
            log.warning("beat: run %s was already enqueued", header["id"])

    # -- the BEAT command ----------------------------------------------------------------------
    def handle(self, batch, it, identity, body, now, refuse_submits=False):
        if not body:
            raise ProtocolError("BEAT without a control frame")
        control = P.decode(body[0])
        op = control.get("op")
        if op not in OPS:
            raise ProtocolError(f"BEAT op must be one of {', '.join(OPS)}")
        reply = {"req": control.get("req")}
        if op == "add":
            now_us = int(now * 1_000_000)
            entries = [(parse_entry(raw, now_us), payload) for raw, payload in P.pairs(body[1:])]
            for entry, payload in entries:
                self._add(batch, it, entry, payload, now_us)
            reply["ok"] = len(entries)
        elif op == "list":
            reply["entries"] = [public_view(P.decode(batch.beat_entry(name)[0]))
                                for name in batch.beat_names()]
            it.send(identity, P.STATE, P.encode(reply))
            return
        else:
            names = control.get("names")
            if not isinstance(names, list):
                raise ProtocolError("BEAT names must be a list")
            for name in names:
                P.check_name(name, "entry name")
            done = [name for name in names if self._change(batch, it, op, name, now)]
            reply.update(ok=len(done), missing=[name for name in names if name not in done])
        it.send(identity, P.ACK, P.encode(reply))

    def _add(self, batch, it, entry, payload, now_us):
        """Register or update an entry. An unchanged schedule keeps its last/next slot."""
        name = entry["name"]
        found = batch.beat_entry(name)
        old = P.decode(found[0]) if found is not None else None
        if old is not None and old["schedule"] == entry["schedule"]:
            entry["state"] = old["state"]
        else:
            entry["state"] = new_state(entry["schedule"], now_us)
            if old is not None:  # keep the operator's pause across re-registration
                entry["state"]["paused"] = old["state"]["paused"]
            log.info("beat: %s entry %r (%s)", "updated" if old else "added", name, entry["task"])
        state = entry["state"]
        batch.put_beat_entry(name, P.encode(entry), payload)
        self._reschedule(it, name, None if state["paused"] else state["next_run"])

    def _change(self, batch, it, op, name, now):
        found = batch.beat_entry(name)
        if found is None:
            return False
        if op == "remove":
            batch.delete_beat_entry(name)
            self._reschedule(it, name, None)
            log.info("beat: removed entry %r", name)
            return True
        entry = P.decode(found[0])
        state = entry["state"]
        if op == "pause":
            state["paused"] = True
        elif state["paused"]:  # resume: the next slot from now; slots while paused are not made up
            try:
                fresh = new_state(entry["schedule"], int(now * 1_000_000), anchor=state["anchor"])
            except (ValueError, TypeError, OverflowError) as exc:
                raise ProtocolError(f"entry {name!r} cannot be resumed: {str(exc)[:120]}") from None
            state.update(paused=False, error=None, handled=fresh["handled"], next_run=fresh["next_run"])
        batch.put_beat_entry(name, P.encode(entry), found[1])
        self._reschedule(it, name, None if state["paused"] else state["next_run"])
        return True


def new_state(schedule_dict, now_us, anchor=None):
    """State of an entry that has missed nothing: its first slot is the next one after now.

    ``handled`` is the time up to which every slot was dealt with (fired or skipped: due_runs'
    ``last_run``); ``last_run`` is the last slot actually enqueued. An interval's slots are
    ``anchor + k * interval``; the anchor is the registration time.
    """
    anchor = now_us if anchor is None else anchor
    runs = due_runs(schedule_from_dict(schedule_dict), None, from_us(now_us), anchor=from_us(anchor))
    return {"handled": to_us(runs.last_run), "next_run": to_us(runs.next_run), "last_run": None,
            "anchor": anchor, "paused": False, "runs": 0, "error": None}


def parse_entry(raw, now_us):
    """Validate a client's entry JSON; return the fields the broker keeps (ProtocolError if bad)."""
    obj = P.decode(raw)
    name = P.check_name(obj.get("name"), "entry name")
    if len(name.encode()) > MAX_ENTRY_NAME:
        raise ProtocolError(f"entry name longer than {MAX_ENTRY_NAME} bytes")
    try:
        sched = schedule_from_dict(obj.get("schedule"))
        schedule_dict = sched.to_dict()  # canonical, so re-registering compares equal
        new_state(schedule_dict, now_us)  # it can name its next slot
    except (ValueError, TypeError, OverflowError, KeyError) as exc:
        raise ProtocolError(f"entry {name!r}: bad schedule: {str(exc)[:120]}") from None
    if isinstance(sched, schedule) and sched.seconds < MIN_INTERVAL:
        raise ProtocolError(f"entry {name!r}: interval shorter than {MIN_INTERVAL}s")
    policy = obj.get("policy", "skip")
    if policy not in MISSED_RUN_POLICIES:
        raise ProtocolError(f"entry policy must be one of {', '.join(MISSED_RUN_POLICIES)}")
    header = obj.get("header")
    if not isinstance(header, dict):
        raise ProtocolError("entry header must be a JSON object")
    header = {k: v for k, v in header.items() if k not in ("id", "eta", "expires")}
    parsed = P.TaskHeader.parse(P.encode(dict(header, id=run_id(name, from_us(now_us)))))
    expires = obj.get("expires")
    if expires is not None and not (isinstance(expires, (int, float)) and not isinstance(expires, bool)
                                    and 0 < expires <= P.MAX_TIMESTAMP):
        raise ProtocolError("entry expires must be null or positive seconds")
    display = {key: obj.get(key) for key in ("args", "kwargs")}
    if not all(isinstance(text, (str, type(None))) for text in display.values()):
        raise ProtocolError("entry args/kwargs display texts must be strings")
    return {"name": name, "task": parsed.task, "schedule": schedule_dict, "policy": policy,
            "header": header, "expires": expires,
            **{key: (text or "")[:MAX_DISPLAY] for key, text in display.items()}}


def public_view(entry):
    """What ``list`` shows of an entry: definition and state, times in Unix seconds."""
    state = entry["state"]

    def seconds(us):
        return None if us is None else us / 1e6

    return {"name": entry["name"], "task": entry["task"], "schedule": entry["schedule"],
            "policy": entry["policy"], "args": entry["args"], "kwargs": entry["kwargs"],
            "queue": entry["header"].get("queue"), "paused": state["paused"],
            "error": state.get("error"), "last_run": seconds(state["last_run"]),
            "next_run": None if state["paused"] else seconds(state["next_run"]),
            "runs": state["runs"]}
