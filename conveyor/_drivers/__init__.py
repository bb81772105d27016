"""Per-server client plumbing, shared by the transports and the result backends alike.

One module (or small package) per kind of server: :mod:`~conveyor._drivers.sql`,
:mod:`~conveyor._drivers.redis`, :mod:`~conveyor._drivers.mongodb`,
:mod:`~conveyor._drivers.amqp`. Each holds, once, what a broker and a result backend of that
server both need: URL parsing, connection options (the driver's option table), ``connect``,
shared connection handling and **error translation**. Transports and backends import only
:mod:`conveyor.core` and this package, never each other (``tests/test_architecture.py``).

Error translation has one spelling in every driver module:

* ``translate_error(exc, *, what, url, ...) -> ConveyorError``: the driver's exception as
  conveyor's (transient ones are :class:`~conveyor.core.errors.OperationalError`
  subclasses), its message masked, and
* ``translating(what, url, ...)``: a context manager that raises ``translate_error(...)``
  from any driver exception raised inside it, built with :func:`translating` below.

Private: nothing here is public API; third-party stores use :mod:`conveyor.core`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from conveyor.core.errors import ConnectionLost, ConveyorError

__all__ = ["translating"]


@contextlib.contextmanager
def translating(
    catch: tuple[type[BaseException], ...],
    translate: Callable[..., ConveyorError],
    *,
    what: str,
    url: str,
    closed: Callable[[], bool] | None = None,
    **details: Any,
) -> Iterator[None]:
    """Raise ``translate(exc, what=what, url=url, **details)`` from any ``catch`` exception
    raised inside (conveyor's own errors pass through untouched). When ``closed()`` says
    the owner was closed meanwhile, the error is :class:`ConnectionLost` naming that."""
    try:
        yield
    except ConveyorError:
        raise
    except catch as exc:
        if closed is not None and closed():
            raise ConnectionLost(f"{what}: the client was closed") from exc
        raise translate(exc, what=what, url=url, **details) from exc
