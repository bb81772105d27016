"""AMQP error translation: pika's (and the socket's) exceptions as conveyor's, in one place.

The one spelling of every driver (:mod:`conveyor._drivers`): :func:`translate_error` and the
context manager :func:`translating`. Private plumbing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pika.exceptions
from pika.adapters.utils import connection_workflow as workflow

from conveyor._drivers import translating as _translating
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    OperationalError,
    OperationTimeout,
    QueueNotFound,
)
from conveyor.core.urls import mask_text

from .options import redact_url

__all__ = ["LinkDown", "Nacked", "said", "translate_error", "translating"]


class Nacked(OperationalError):
    """RabbitMQ answered a publish with basic.nack (a full queue with ``reject-publish``, an
    internal error): the message was not accepted. Transient for callers."""


class LinkDown(Exception):
    """Internal: the connection (or the publish channel) went away mid-operation.

    The caller may retry once the link is open again; ``error`` says what happened.
    """

    def __init__(self, error: ConveyorError) -> None:
        super().__init__(str(error))
        self.error = error


def _unwrap(exc: BaseException) -> BaseException:
    """The innermost meaningful error of pika's connection-workflow wrappers."""
    seen = 0
    while seen < 10:
        seen += 1
        if isinstance(exc, workflow.AMQPConnectionWorkflowFailed) and exc.exceptions:
            exc = exc.exceptions[-1]
        elif isinstance(exc, workflow.AMQPConnectorPhaseErrorBase):
            exc = exc.exception
        else:
            break
    return exc


def translate_error(exc: BaseException, *, what: str, url: str = "") -> ConveyorError:
    """Map a pika (or socket) exception to conveyor's tree. The ONE place that does so.

    ``what`` names the operation (``"publish"``, ``"con channel"``, ``"connecting to
    amqp://guest@host:5672//"``); with ``url``, the message says ``<what> on <url>`` (the URL
    redacted by :func:`~conveyor._drivers.amqp.options.redact_url`).

    * channel closed by the broker: 404 NOT_FOUND -> :class:`QueueNotFound`; 403
      ACCESS_REFUSED and 406 PRECONDITION_FAILED (inequivalent declaration, unknown delivery
      tag) -> :class:`ConfigurationError`; other codes -> :class:`OperationalError`;
    * authentication or vhost access refused -> :class:`ConfigurationError`;
    * anything about the connection (refused, reset, heartbeat missed, forced close,
      wrong state) -> :class:`ConnectionLost`; a timed-out handshake ->
      :class:`OperationTimeout`;
    * any other pika error -> :class:`OperationalError`.

    Messages name the operation and RabbitMQ's reply text, never a password.
    """
    if isinstance(exc, ConveyorError):
        return exc
    if isinstance(exc, LinkDown):
        return exc.error
    where = f"{what} on {redact_url(url)}" if url else what
    inner = _unwrap(exc)
    errors = pika.exceptions
    if isinstance(inner, errors.ChannelClosedByBroker):
        reply = mask_text(str(inner.reply_text))
        text = f"{where}: RabbitMQ closed the channel: {inner.reply_code} {reply}"
        if inner.reply_code == 404:
            return QueueNotFound(text)
        if inner.reply_code in (403, 406):
            return ConfigurationError(text)
        return OperationalError(text)
    if isinstance(
        inner,
        (
            errors.ProbableAuthenticationError,
            errors.ProbableAccessDeniedError,
            errors.AuthenticationError,
        ),
    ):
        return ConfigurationError(
            f"{where}: RabbitMQ refused the login or the vhost ({type(inner).__name__}): "
            f"{said(inner)}"
        )
    if isinstance(inner, errors.ConnectionClosedByBroker) and inner.reply_code in (403, 530):
        return ConfigurationError(
            f"{where}: RabbitMQ refused access: {mask_text(str(inner.reply_text))}"
        )
    if isinstance(inner, workflow.AMQPConnectorStackTimeout):
        return OperationTimeout(f"{where}: connecting timed out")
    if isinstance(
        inner,
        (
            errors.AMQPConnectionError,
            errors.ChannelWrongStateError,
            errors.ChannelClosed,
            workflow.AMQPConnectorException,
            OSError,
        ),
    ):
        detail = f"{type(inner).__name__}: {said(inner)}" if str(inner) else type(inner).__name__
        return ConnectionLost(f"{where}: {detail}")
    if isinstance(inner, errors.AMQPError):
        return OperationalError(f"{where}: {type(inner).__name__}: {said(inner)}")
    return OperationalError(f"{where}: {type(exc).__name__}: {said(exc)}")


def said(exc: BaseException) -> str:
    """A driver's or socket's error text, masked (it may quote connection parameters)."""
    return mask_text(str(exc))


#: What :func:`translating` translates: pika's errors, socket errors, a link gone down.
_CATCH: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPError,
    workflow.AMQPConnectorException,
    OSError,
    LinkDown,
)


def translating(
    what: str, url: str = "", *, closed: Callable[[], bool] | None = None
) -> contextlib.AbstractContextManager[None]:
    """Raise :func:`translate_error` (``what``, ``url``) from any pika or socket error raised
    inside; conveyor's own errors pass through; see :func:`conveyor._drivers.translating`
    for ``closed``."""
    return _translating(_CATCH, translate_error, what=what, url=url, closed=closed)
