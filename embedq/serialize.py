"""The only module that imports pickle and cloudpickle.

Plain pickle is used for data and for functions importable by reference (~1 µs a message);
cloudpickle only when something must travel by value (lambdas, closures, functions defined in a
script), because it is slower and its output is valid only on the same Python version, which is
therefore recorded beside such payloads. Only workers and clients ever unpickle; the broker
stores and forwards payloads as opaque bytes.
"""

import pickle
import sys
import traceback as traceback_module

import cloudpickle

from . import errors
from .errors import RemoteTaskError

PICKLE = "pickle"
CLOUDPICKLE = "cloudpickle"
#: Interpreter that produced a cloudpickle payload ("3.11"); a worker on another version refuses it.
PYTHON_VERSION = "%d.%d" % sys.version_info[:2]

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(obj):
    """Return ``(payload, codec)``: pickle when it can, cloudpickle when it must."""
    try:
        return pickle.dumps(obj, _PROTOCOL), PICKLE
    except (pickle.PicklingError, AttributeError, TypeError):
        return cloudpickle.dumps(obj, _PROTOCOL), CLOUDPICKLE


def dumps_by_value(obj):
    """For callables that the receiving process may not be able to import (executor submits)."""
    return cloudpickle.dumps(obj, _PROTOCOL), CLOUDPICKLE


def loads(payload, codec=PICKLE, python=None):
    if codec == CLOUDPICKLE and python and python != PYTHON_VERSION:
        raise RuntimeError(f"payload was cloudpickled on Python {python}; this is Python {PYTHON_VERSION}")
    return pickle.loads(payload)


def dumps_exception(exc, tb=None):
    """Pickle an exception for the result store, with a text form the broker and UIs can show.

    Returns ``(payload, meta)``. If the exception itself cannot be pickled (it holds a socket, a
    lock...), the payload carries a RemoteTaskError with the same type name and message instead.
    """
    text = "".join(traceback_module.format_exception(type(exc), exc, tb or exc.__traceback__))
    exc_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    meta = {"exc_type": exc_type, "exc_message": str(exc), "traceback": text}
    try:
        payload = pickle.dumps(exc, _PROTOCOL)
        pickle.loads(payload)  # some exceptions pickle but cannot be rebuilt (custom __init__)
    except Exception:
        payload = pickle.dumps(RemoteTaskError(exc_type, str(exc), text), _PROTOCOL)
    return payload, meta


def loads_exception(payload, meta):
    """Rebuild a task's exception, with the remote traceback attached as a note."""
    try:
        exc = pickle.loads(payload) if payload else None
    except Exception:
        exc = None
    if exc is None:
        exc = _embedq_error(meta)
    if not isinstance(exc, BaseException):
        exc = RemoteTaskError(meta.get("exc_type", "Exception"), meta.get("exc_message", ""),
                              meta.get("traceback", ""))
    remote_tb = meta.get("traceback", "")
    exc.remote_traceback = remote_tb
    if remote_tb and hasattr(exc, "add_note") and not getattr(exc, "_embedq_noted", False):
        exc.add_note("Remote traceback (from the worker):\n" + remote_tb.rstrip())
        exc._embedq_noted = True
    return exc


def _embedq_error(meta):
    """Results the broker writes itself (revoked, expired, worker lost) carry no pickle, only the
    name of an ``embedq.errors`` class."""
    module, _, name = str(meta.get("exc_type", "")).rpartition(".")
    cls = getattr(errors, name, None) if module == errors.__name__ else None
    if isinstance(cls, type) and issubclass(cls, errors.EmbedqError):
        try:
            return cls(meta.get("exc_message", ""))
        except Exception:
            return None
    return None
