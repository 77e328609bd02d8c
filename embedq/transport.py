"""Socket plumbing shared by broker, worker node and clients: options and fast sends.

pyzmq's ``send_multipart`` combines flag enums for every frame (~12 µs for a 4-frame message on
a 2-core VM); calling the backend ``send`` with plain integer flags costs ~4 µs. On the broker's
hot path that difference is a large share of the per-task cost.
"""

import zmq
from zmq.backend import Socket as _BackendSocket

NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_send = _BackendSocket.send

#: Default reconnect interval and its cap (ms): quick to find a restarted broker, gentle after.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000


def send_frames(sock, frames, flags=NOBLOCK):
    """Send a multipart message (a list of bytes). Raises zmq.ZMQError like send_multipart."""
    more = flags | _SNDMORE
    for frame in frames[:-1]:
        _send(sock, frame, more)
    _send(sock, frames[-1], flags)


def send_to(sock, identity, frames, flags=NOBLOCK):
    """``send_frames`` from a ROUTER: the peer's routing id goes first (no list built for it)."""
    _send(sock, identity, flags | _SNDMORE)
    send_frames(sock, frames, flags)


def dealer(context, endpoint, identity, linger_ms, high_water_mark=None):
    """A DEALER that connects to the broker, with a bounded linger (never hang at exit)."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    if high_water_mark is not None:
        sock.setsockopt(zmq.SNDHWM, high_water_mark)
        sock.setsockopt(zmq.RCVHWM, high_water_mark)
    sock.connect(endpoint)
    return sock


_POLLIN = int(zmq.POLLIN)
_poll = zmq.zmq_poll
_recv = _BackendSocket.recv


def receive(sock):
    """One multipart message that is known to be waiting (bytes frames).

    pyzmq's ``recv_multipart`` asks ``getsockopt(RCVMORE)`` after every frame, and its
    ``getsockopt`` builds a ``SocketOption`` enum per call: ~2.7 µs a frame on a 2-core VM.
    A non-copying receive reads the "more" flag in C (``Frame.more``): ~1 µs a frame.
    """
    frame = _recv(sock, NOBLOCK, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _recv(sock, NOBLOCK, False)
        frames.append(frame.bytes)
    return frames


def receive_ready(sock, limit=1_000_000, waiting=False):
    """Every message already queued on ``sock`` (up to ``limit``), without blocking.

    Polls with no timeout before each receive instead of catching ``zmq.Again``: raising and
    catching that exception costs more than the receive itself, and ``getsockopt(ZMQ_EVENTS)``
    builds a Python enum per call (3.0 against 2.5 µs). ``waiting``: the caller's poll has just
    seen input, so the first message is there without asking.
    """
    messages = [receive(sock)] if waiting and limit > 0 else []
    poll_items = [(sock, _POLLIN)]
    while len(messages) < limit and _poll(poll_items, 0):
        messages.append(receive(sock))
    return messages


def wait_readable(sock, timeout):
    """Block up to ``timeout`` seconds for input on one socket (no Poller object per call)."""
    return bool(_poll([(sock, _POLLIN)], max(0, int(timeout * 1000))))
