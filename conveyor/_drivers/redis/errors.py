"""Redis error translation: redis-py's exceptions as conveyor's, in ONE place for the Redis
broker and result backend (the spelling every driver module shares, see
:mod:`conveyor._drivers`)."""

from __future__ import annotations

import contextlib

import redis.exceptions as rexc

from conveyor._drivers import translating as _translating
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    DecodeError,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.urls import mask_text, mask_url

__all__ = ["TRANSIENT_REPLIES", "reply_code", "translate_error", "translating"]

#: Error replies (Redis's error code: the reply's first word) that a retry may outlive: a
#: server loading its data or busy in a script, a failover or cluster change under way,
#: memory or disk full, a script cache flushed by a restart, a transaction discarded for one
#: of these. Any other error reply is the request's own fault: the same request fails the
#: same way again (WRONGTYPE, ERR ..., CROSSSLOT, NOPERM).
TRANSIENT_REPLIES = frozenset(
    {
        "LOADING",
        "BUSY",
        "TRYAGAIN",
        "MASTERDOWN",
        "READONLY",
        "OOM",
        "MISCONF",
        "CLUSTERDOWN",
        "NOSCRIPT",
        "EXECABORT",
    }
)

_CATCH: tuple[type[BaseException], ...] = (rexc.RedisError,)


def reply_code(exc: BaseException) -> str | None:
    """The error code of a Redis error reply (``WRONGTYPE``, ``ERR``, ``BUSY``...): the code
    redis-py parsed (``status_code``) or else the reply's first word when it is one (an
    upper-case word); None when there is none. A code, never the message's wording."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    first = str(exc).split(" ", 1)[0]
    return first if first.isalpha() and first.isupper() else None


def translate_error(
    exc: BaseException, *, what: str, url: str, reading: bool = False
) -> ConveyorError:
    """redis-py's exception ``exc`` as conveyor's (raise it ``from exc``).

    Transient (a retry may succeed): connection failures, a READONLY reply (a replica after
    a failover) and a server loading its data are :class:`ConnectionLost`; timeouts
    :class:`OperationTimeout`; the other error replies of :data:`TRANSIENT_REPLIES` and
    redis-py's own protocol errors :class:`OperationalError`. Not transient: refused
    credentials or ACL permissions, an argument redis-py refuses (``DataError``) and every
    other error reply (``WRONGTYPE``, ``ERR ...``: classified by :func:`reply_code`) are
    :class:`ConfigurationError`, or :class:`DecodeError` when ``reading`` (what is stored
    is not what the reader expects). Messages are masked.
    """
    where = f"{what} on {mask_url(url)}"
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError | rexc.NoPermissionError):
        return ConfigurationError(f"{where}: refused: {_text(exc)}")
    if isinstance(exc, rexc.TimeoutError):
        return OperationTimeout(f"{where}: timed out: {_text(exc)}")
    if isinstance(exc, rexc.ConnectionError | rexc.ReadOnlyError | rexc.BusyLoadingError):
        return ConnectionLost(f"{where}: {_text(exc)}")
    if isinstance(exc, rexc.DataError):  # redis-py refused an argument before sending anything
        return ConfigurationError(f"{where}: redis-py refused an argument: {_text(exc)}")
    if isinstance(exc, rexc.ResponseError):
        code = reply_code(exc)
        if code in TRANSIENT_REPLIES:
            return OperationalError(f"{where}: {_text(exc)}")
        refused = DecodeError if reading else ConfigurationError
        return refused(f"{where}: the server refused it ({code or 'error reply'}): {_text(exc)}")
    # protocol and pub/sub errors of redis-py itself
    return OperationalError(f"{where}: {_text(exc)}")


def translating(
    what: str, url: str, *, reading: bool = False
) -> contextlib.AbstractContextManager[None]:
    """Raise :func:`translate_error`'s error (the cause chained) from any redis-py exception
    raised inside; conveyor's own errors pass through."""
    return _translating(_CATCH, translate_error, what=what, url=url, reading=reading)


def _text(exc: BaseException) -> str:
    return mask_text(str(exc))
