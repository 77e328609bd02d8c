"""Wire format: ZeroMQ multipart frames, no sockets here (see docs/protocol.md).

Every message is ``[PROTOCOL, COMMAND, *body]``; through the broker's ROUTER the peer's routing id
is prepended. Bodies are a JSON control frame (small, safe to parse in the broker) and, for tasks
and results, ``(header, payload)`` frame pairs. The payload is opaque to the broker: it is pickle,
and the broker never unpickles anything.
"""

import json
import os
import re
import struct
import time
from typing import NamedTuple

from .errors import ProtocolError
from .ratelimit import parse_rate
from .states import READY_STATES as FINAL_STATES
from .states import RETRY as RETRY_STATE

#: Version frame; a peer speaking anything else is sent DISCONNECT.
PROTOCOL = b"EQ1"

# client -> broker
SUBMIT = b"SUBMIT"      # {"req"} (header, payload)*      -> ACK
WAIT = b"WAIT"          # {"ids"}                         -> RESULT / STATE as each settles
STATUS = b"STATUS"      # {"req", "ids"}                  -> STATE
FORGET = b"FORGET"      # {"req", "ids"}                  -> ACK
CONTROL = b"CONTROL"    # {"req", "op", ...}: revoke, dead letters, inspect (control.py) -> ACK
BEAT = b"BEAT"          # {"req", "op", ...} (entry, payload)*  -> ACK, or STATE for "list" (beat.py)
# broker -> client
ACK = b"ACK"            # {"req", "ok": count accepted, "dup": [ids], "error"?, "message"?}
RESULT = b"RESULT"      # (result header, payload)*  (also worker -> broker)
STATE = b"STATE"        # {"req"?, "states": {id: {"state", ...}}}
# worker node (supervisor) <-> broker
READY = b"READY"        # {"node", "queues", ...}        -> WELCOME {"broker", "heartbeat"}
LOST = b"LOST"          # {"index", "running", "kind", "reason"} [result header, payload]: that
                        # pool process died; requeue what it held (kind "time-limit": settle
                        # the running task with the attached FAILURE result first)
REVOKE = b"REVOKE"      # broker -> node {"tokens", "signal"}: kill the pool processes running these
HEARTBEAT = b"HEARTBEAT"  # node: {} (liveness); pool process when idle: {"held", "seen"}
# pool process <-> broker
JOIN = b"JOIN"          # {"node", "index", "capacity", "held"}  -> WELCOME {"broker", "drop"}
TASK = b"TASK"          # (token, header, payload)*
SETTLED = b"SETTLED"    # token*: results committed, the process may forget them
RELEASE = b"RELEASE"    # {"tokens", "leaving"}: the process will not run these; requeue them now
PROGRESS = b"PROGRESS"  # {"id", "token", "state", "meta"?}: STARTED / custom state while running
REVOKE = b"REVOKE"      # to a pool process {"tokens"}: drop these if not started;
                        # to a node {"tokens", "signal"}: kill the process running them
WELCOME = b"WELCOME"
# both ways
DISCONNECT = b"DISCONNECT"  # {"reason"}: "I do not know you / you broke protocol: register again"

CLIENT_COMMANDS = frozenset({SUBMIT, WAIT, STATUS, FORGET, CONTROL, BEAT})
WORKER_COMMANDS = frozenset({READY, JOIN, LOST, HEARTBEAT, RESULT, PROGRESS, RELEASE, DISCONNECT})

# LOST "kind": why a pool process is gone (absent means LOST_CRASH)
LOST_CRASH = "crash"              # died on its own (kill -9, segfault, os._exit)
LOST_TIME_LIMIT = "time-limit"    # killed at its task's hard time limit; the result is attached
LOST_MEMORY = "memory"            # retired after a task left it above max_memory_per_child
LOST_RECYCLED = "recycled"        # retired: max_tasks_per_child, autoscale, warm shutdown
LOST_TERMINATED = "terminated"    # killed by REVOKE (revoke with terminate=True)

#: Longest accepted task id, queue, task or node name, in UTF-8 bytes (LMDB keys stop at 511).
MAX_NAME_LENGTH = 255
#: Largest accepted eta/expires (seconds since the epoch; about the year 33658).
MAX_TIMESTAMP = 1e12
#: Priorities run 0..MAX_PRIORITY; higher runs sooner.
MAX_PRIORITY = 255

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
#: ``_encoder``'s C core, made once: ``JSONEncoder.encode`` builds a new one on every call (about
#: twenty lines of Python per frame). No circular-reference check (``markers`` None): embedq's
#: frames are trees, and ``encode`` asks the full encoder to name a cycle in anything else.
_c_encode = json.encoder.c_make_encoder(
    None, _encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, True) \
    if json.encoder.c_make_encoder is not None else None
_decoder = json.JSONDecoder()
_decode = _decoder.decode
#: the decoder's C scanner: ``decode`` minus seven lines of Python that skip whitespace around
#: the value (frames from embedq have none; anything else takes the full path)
_scan = _decoder.scan_once


def encode(obj):
    """JSON control frame. Compact and ASCII-safe enough to read in a packet capture."""
    if _c_encode is not None:
        try:
            return "".join(_c_encode(obj, 0)).encode()
        except RecursionError:  # a cycle (in a task's update_state meta, say): a clear error
            pass
    return _encoder.encode(obj).encode()


def decode(frame):
    """Parse a JSON control frame that must be an object, or raise ProtocolError."""
    try:
        text = frame.decode()
        try:
            obj, end = _scan(text, 0)
        except StopIteration:  # not a value at the very start: let the full decoder judge
            end = -1
        if end != len(text):
            obj = _decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"control frame is not JSON: {str(exc)[:100]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame must be a JSON object")
    return obj


_UUID_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_task_id():
    """A time-ordered UUID (version 7, RFC 9562) string, in the form of Celery's task ids.

    Why not random (version 4): the store keys ``tasks`` and ``results`` by id, and in a B-tree
    random keys dirty a different leaf page per task, while ids that grow with time all land on
    the rightmost leaf. Under ``fsync`` a commit costs about one disk write per scattered dirty
    page (docs/storage.md, "Page locality"), so time order cut the pages written per commit from
    55 to 17 in the 16-thread throughput case. Layout: 48 bits of Unix milliseconds, the
    version, 12 bits of sub-millisecond fraction (RFC 9562's method 3), the variant, 62 random
    bits; built from the clock and 8 random bytes, cheaper than ``str(uuid.uuid4())``."""
    ns = time.time_ns()
    clock = f"{ns // 1_000_000:012x}7{(ns % 1_000_000) * 4096 // 1_000_000:03x}"
    h = os.urandom(8).hex()
    return f"{clock[:8]}-{clock[8:12]}-{clock[12:]}-{_UUID_VARIANT[h[0]]}{h[1:4]}-{h[4:]}"


#: The ACK the broker sends for a plain SUBMIT (client_requests.py), parsed without JSON.
_PLAIN_ACK = re.compile(rb'\{"req":(\d+),"ok":(\d+),"dup":\[\]\}')


def decode_ack(frame):
    """An ACK's control frame: the broker's common answer by pattern, anything else as JSON."""
    plain = _PLAIN_ACK.fullmatch(frame)
    if plain is not None:
        return {"req": int(plain[1]), "ok": int(plain[2]), "dup": []}
    return decode(frame)


def storage_full_ack(req, reason):
    """The ACK of a SUBMIT the broker refuses because its store cannot take it (``reason`` is
    the message of the client's StorageFull); nothing of that SUBMIT was stored."""
    return {"req": req, "ok": 0, "dup": [], "error": "StorageFull", "message": reason}


def message(command, *body):
    return [PROTOCOL, command, *body]


def split(frames):
    """``[PROTOCOL, COMMAND, *body]`` -> (command, body)."""
    if len(frames) < 2 or frames[0] != PROTOCOL:
        raise ProtocolError("missing or unsupported protocol frame")
    return bytes(frames[1]), frames[2:]


def pairs(body, width=2):
    """Group a body into fixed-width tuples, e.g. (header, payload)."""
    if not body or len(body) % width:
        raise ProtocolError(f"expected groups of {width} frames, got {len(body)} frames")
    return [tuple(body[i:i + width]) for i in range(0, len(body), width)]


def check_name(value, field):
    """A name the store can use as (part of) a key: valid UTF-8, no NUL, 1..255 bytes."""
    if type(value) is str and value.isascii() and 0 < len(value) <= MAX_NAME_LENGTH and "\0" not in value:
        return value  # the usual case, decided without encoding
    try:
        size = len(value.encode()) if isinstance(value, str) else 0
    except UnicodeEncodeError:  # a lone surrogate from JSON's \ud800
        size = 0
    if not 0 < size <= MAX_NAME_LENGTH or "\0" in value:
        raise ProtocolError(f"{field} must be a non-empty UTF-8 string of at most {MAX_NAME_LENGTH} bytes")
    return value


def check_int(value, field):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{field} must be an integer")
    return value


def int_list(value):
    """The integers in an untrusted JSON list (anything else is ignored)."""
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]


def check_ids(obj, field="ids"):
    ids = obj.get(field)
    if not isinstance(ids, list):
        raise ProtocolError(f"{field} must be a list")
    for task_id in ids:
        check_name(task_id, "task id")
    return ids


def _optional_time(value, field):
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_TIMESTAMP:
        return value  # (NaN fails the comparison too)
    raise ProtocolError(f"{field} must be null or seconds since the epoch (0..{MAX_TIMESTAMP:.0e})")


class TaskHeader(NamedTuple):
    """The part of a task the broker reads. The raw JSON is stored and forwarded unchanged."""

    id: str
    task: str
    queue: str
    priority: int
    eta: float | None
    expires: float | None
    notify: bool
    reply_to: str | None
    #: tasks per second for this task type, enforced by the broker across all workers
    rate: float | None
    #: False: at most once (never redelivered once it may have started)
    acks_late: bool
    #: False: a task whose worker died fails with WorkerLostError instead of being redelivered
    reject_on_worker_lost: bool
    #: deliveries that ended with the worker dying (the dead-letter count)
    redelivered: int
    #: a workflow step: stored aside until its parent settles (workflow.py)
    waiting: bool

    @classmethod
    def parse(cls, frame):
        obj = decode(frame)
        priority = obj.get("priority")
        priority = 0 if priority is None else priority
        if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= MAX_PRIORITY:
            raise ProtocolError(f"priority must be an integer 0..{MAX_PRIORITY}")
        return cls(
            id=check_name(obj.get("id"), "task id"),
            task=check_name(obj.get("task"), "task name"),
            queue=check_name(obj.get("queue"), "queue"),
            priority=priority,
            eta=_optional_time(obj.get("eta"), "eta"),
            expires=_optional_time(obj.get("expires"), "expires"),
            notify=bool(obj.get("notify", True)),
            reply_to=obj.get("reply_to") if isinstance(obj.get("reply_to"), str) else None,
            rate=_rate(obj.get("rate_limit")),
            acks_late=obj.get("acks_late") is not False,
            reject_on_worker_lost=obj.get("reject_on_worker_lost") is not False,
            redelivered=obj.get("redelivered") if isinstance(obj.get("redelivered"), int) else 0,
            waiting=obj.get("waiting") is True,
        )


def _rate(value):
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


class ResultHeader(NamedTuple):
    """The part of a worker's result the broker reads: a final state, or RETRY at ``eta``."""

    id: str
    token: int
    state: str
    eta: float | None
    retries: int
    #: seconds the task ran, as the pool process measured it (adapts its prefetch window)
    runtime: float | None

    @classmethod
    def parse(cls, frame):
        obj = decode(frame)
        token = check_int(obj.get("token"), "result token")
        runtime = obj.get("runtime")
        if not isinstance(runtime, (int, float)) or isinstance(runtime, bool) or not runtime >= 0:
            runtime = None  # absent or nonsense: no adaptation
        state = obj.get("state")
        eta, retries = None, 0
        if state == RETRY_STATE:
            eta = _optional_time(obj.get("eta"), "retry eta")
            retries = check_int(obj.get("retries"), "retries")
            if eta is None:
                raise ProtocolError("a RETRY result needs an eta")
        elif state not in FINAL_STATES:
            raise ProtocolError(f"result state must be RETRY or one of {sorted(FINAL_STATES)}")
        return cls(id=check_name(obj.get("id"), "task id"), token=token, state=state, eta=eta,
                   retries=retries, runtime=runtime)


def error_result(task_id, state, error, message, when, task_name=None):
    """The header of a result that ends a task without running it (revoked, expired, worker
    lost), naming an ``embedq.errors`` class: no pickle is needed, clients rebuild it by name
    (``serialize.loads_exception``). Its payload is empty."""
    header = {"id": task_id, "state": state, "exc_type": f"embedq.errors.{error}",
              "exc_message": message, "traceback": "", "date_done": when}
    if task_name:
        header["task"] = task_name
    return header


#: Header ``prepend`` kinds: what the broker put in front of a workflow task's own payload.
PREPEND_RESULT = "result"      # the parent's result: the first positional argument
PREPEND_RESULTS = "results"    # a chord's member results, in order: a list as first argument
PREPEND_ERRBACK = "errback"    # the failed task's exception, for a link_error callback

_PART = struct.Struct(">I")


def pack_parts(parts, own):
    """``count u32 | (len u32 | part)* | own payload``: result payloads (opaque pickles) put in
    front of a task's own arguments by the broker, which never unpickles either."""
    out = [_PART.pack(len(parts))]
    for part in parts:
        out += (_PART.pack(len(part)), part)
    out.append(own)
    return b"".join(out)


def unpack_parts(payload):
    """Inverse of :func:`pack_parts`: (parts, own payload)."""
    (count,) = _PART.unpack_from(payload)
    offset, parts = 4, []
    for _ in range(count):
        (length,) = _PART.unpack_from(payload, offset)
        parts.append(payload[offset + 4:offset + 4 + length])
        offset += 4 + length
    return parts, payload[offset:]
