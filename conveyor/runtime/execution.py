"""Running one task: decode, call, and describe the outcome as plain data.

This module is what a pool process executes, so it touches neither the broker nor the
result backend: it turns a message into an :class:`Outcome`, and the worker (in the parent
process or thread) stores the result, publishes retries and settles the delivery.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from conveyor.core.compression import BUILTIN_METHODS, DEFAULT_MAX_SIZE
from conveyor.core.errors import DecodeError, SerializationError
from conveyor.core.types import Envelope, State
from conveyor.core.urls import mask_text
from conveyor.runtime.exceptions import (
    NotRegistered,
    Reject,
    Retry,
    TimeLimitExceeded,
)
from conveyor.runtime.task import Request
from conveyor.runtime.timelimits import Limits, ThreadTimeLimits, time_limits

if TYPE_CHECKING:
    from conveyor.runtime.app import App

__all__ = ["Outcome", "describe", "execute", "failure", "inspect_envelope"]


@dataclass
class Outcome:
    """What happened when a task ran.

    Attributes:
        state: SUCCESS, FAILURE, RETRY or REJECTED (``Reject`` raised).
        value: the return value (SUCCESS) or the exception document (other states); None
            for a message that cannot be decoded (no result is written for it).
        traceback: formatted traceback text for failures.
        retry_in: seconds until the retry (RETRY).
        retry_args: positional arguments for the retry.
        retry_kwargs: keyword arguments for the retry.
        requeue: for REJECTED, whether to requeue.
        reason: short text for logs and dead letters.
        runtime: seconds the task function ran.
        dead_letter: the message cannot be handled here (undecodable, unknown task):
            dead-letter it instead of acking.
        worker_lost: the process running the task died; give the message back.
    """

    state: str
    value: Any = None
    traceback: str | None = None
    retry_in: float | None = None
    retry_args: tuple[Any, ...] = ()
    retry_kwargs: dict[str, Any] = field(default_factory=dict)
    requeue: bool = False
    reason: str = ""
    runtime: float = 0.0
    dead_letter: bool = False
    worker_lost: bool = False


def _exc_meta(exc: BaseException) -> dict[str, Any]:
    from conveyor.core.celery import exception_to_meta

    return dict(exception_to_meta(exc))


def _format_tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def describe(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` for logs and results; never raises (a hostile ``__str__`` may),
    never longer than ``limit``, always valid UTF-8 (lone surrogates escaped), secrets
    masked (:func:`~conveyor.core.urls.mask_text`: a driver's error may quote a URL or a
    password)."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:
        text = f"{type(exc).__name__}: <unprintable>"
    # Masked before it is cut (a cut could hide a secret from the masker), on a bounded
    # prefix (masking is linear, but a huge message need not be read whole).
    text = mask_text(text[: limit * 4])
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def failure(exc: BaseException, reason: str, **fields: Any) -> Outcome:
    """A FAILURE outcome for ``exc`` that never raises while describing it."""
    try:
        meta: dict[str, Any] = _exc_meta(exc)
    except BaseException:
        cls = type(exc)
        meta = {
            "exc_type": cls.__qualname__,
            "exc_message": [describe(exc)],
            "exc_module": cls.__module__,
        }
    try:
        tb: str | None = _format_tb(exc)
    except BaseException:
        tb = None
    return Outcome(State.FAILURE.value, meta, tb, reason=reason, **fields)


# ================================================================= running


def execute(
    app: App,
    envelope: Envelope,
    request: Request,
    *,
    accept: Collection[str],
    max_size: int | None = DEFAULT_MAX_SIZE,
    accept_compression: Collection[str] | None = BUILTIN_METHODS,
    timer: ThreadTimeLimits | None = None,
    hard_limit_here: bool = True,
) -> Outcome:
    """Decode ``envelope`` and run its task; never raises, whatever the message or the task
    does (``SystemExit`` and ``KeyboardInterrupt`` included: they fail the task, not the
    worker).

    ``max_size`` bounds the decompressed body (``worker_max_message_size``: decompression
    stops there) and ``accept_compression`` names the methods a compressed body may use
    (the worker's normalized ``accept_compression``); a body refused by either is
    dead-lettered like any undecodable one.

    Time limits: the message's own (``apply_async(time_limit=..., soft_time_limit=...)``),
    else the task's, else the app's settings. In a main thread they are raised by SIGALRM,
    elsewhere by ``timer`` (none: not enforced here). ``hard_limit_here=False`` leaves the
    hard limit to the caller (the prefork parent kills the child instead).
    """
    limits = Limits(timer)
    decoding = _Decoding(accept, max_size, accept_compression)
    try:
        return _execute(app, envelope, request, decoding, limits, hard_limit_here)
    except BaseException as exc:
        limits.release()
        return failure(exc, f"error while running the task: {describe(exc)}")
    finally:
        limits.release()


@dataclass(frozen=True)
class _Decoding:
    """What a message body may be: its content types, size and compression methods."""

    accept: Collection[str]
    max_size: int | None
    accept_compression: Collection[str] | None


def _execute(
    app: App,
    envelope: Envelope,
    request: Request,
    decoding: _Decoding,
    limits: Limits,
    hard_limit_here: bool,
) -> Outcome:
    from conveyor.core.celery import parse_envelope

    try:
        message = parse_envelope(
            envelope,
            accept=decoding.accept,
            max_size=decoding.max_size,
            accept_compression=decoding.accept_compression,
        )
    except Exception as exc:  # any decoding failure is the message's fault: dead-letter it
        err = exc if isinstance(exc, SerializationError) else DecodeError(describe(exc))
        # value None: a message that cannot be decoded writes no result under the id it
        # claims (it may not be the sender's to write)
        return Outcome(
            State.FAILURE.value,
            None,
            None,
            reason=f"undecodable message: {describe(err)}",
            dead_letter=True,
        )
    task = app.tasks.get(message.task)
    if task is None:
        return Outcome(
            State.FAILURE.value,
            _exc_meta(NotRegistered(message.task)),
            None,
            reason=f"unknown task {message.task!r}",
            dead_letter=True,
        )
    request.args = tuple(message.args)
    request.kwargs = dict(message.kwargs)
    request.retries = message.retries
    request.eta = message.eta
    request.expires = message.expires
    request.root_id = message.root_id
    request.parent_id = message.parent_id
    request.group = message.group
    request.group_index = message.group_index
    request.reply_to = message.reply_to
    hard, soft = time_limits(message.timelimit, task)
    request.timelimit = (hard, soft)
    task._push_request(request)
    started = time.perf_counter()
    try:
        limits.start(hard if hard_limit_here else None, soft)
        try:
            value = task(*message.args, **message.kwargs)
        finally:
            limits.release()  # before any handler below runs: no limit fires in those
    except Retry as sig:
        when = sig.when
        if isinstance(when, datetime):
            delay = max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
        else:
            delay = float(when or 0.0)
        cause: BaseException = sig.exc if sig.exc is not None else sig
        return Outcome(
            State.RETRY.value,
            _exc_meta(cause),
            _format_tb(cause),
            retry_in=delay,
            retry_args=tuple(sig.retry_args if sig.retry_args is not None else message.args),
            retry_kwargs=dict(sig.retry_kwargs if sig.retry_kwargs is not None else message.kwargs),
            reason=f"retry in {delay:.3g}s",
            runtime=time.perf_counter() - started,
        )
    except Reject as rej:
        return Outcome(
            State.REJECTED.value, None, None, requeue=rej.requeue, reason=rej.reason or "rejected"
        )
    except Exception as exc:  # a task failure is data, not a worker crash
        runtime = time.perf_counter() - started
        if isinstance(exc, TimeLimitExceeded) and not exc.args:
            exc = TimeLimitExceeded(hard)  # raised as a class by the timer: add the limit
        if task.autoretry_for and isinstance(exc, task.autoretry_for):
            max_retries = task.retry_kwargs.get("max_retries", task.max_retries)
            if max_retries is None or message.retries < max_retries:
                delay = float(task.retry_kwargs.get("countdown", task.retry_delay(message.retries)))
                return Outcome(
                    State.RETRY.value,
                    _exc_meta(exc),
                    _format_tb(exc),
                    retry_in=delay,
                    retry_args=tuple(message.args),
                    retry_kwargs=dict(message.kwargs),
                    reason=f"autoretry in {delay:.3g}s after {type(exc).__name__}",
                    runtime=runtime,
                )
        return failure(exc, describe(exc), runtime=runtime)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt...: the task failed
        return failure(exc, describe(exc), runtime=time.perf_counter() - started)
    finally:
        limits.release()
        task._push_request(None)
    return Outcome(State.SUCCESS.value, value, runtime=time.perf_counter() - started)


def inspect_envelope(
    envelope: Envelope,
    *,
    max_size: int,
    signer: Any,
    accept: Collection[str],
    accept_compression: Collection[str] | None = BUILTIN_METHODS,
) -> str | tuple[str, str, datetime | None, float | None]:
    """What the worker reads before running a message: ``(task name, task id, expired at
    (None: not expired), seconds until its eta (None: no eta))``, or the reason to refuse
    it (too large, badly signed, unreadable). Never raises: a message that cannot be read,
    whatever the exception, is refused. A protocol v1 body (decoded here for its task name)
    is bounded by ``max_size`` and ``accept_compression`` as in :func:`execute`."""
    from conveyor.core.celery import parse_envelope, peek

    try:
        if len(envelope.body) > max_size:
            return (
                f"message of {len(envelope.body)} bytes exceeds worker_max_message_size "
                f"({max_size})"
            )
        if signer is not None:
            try:
                signer.verify(envelope)
            except Exception as exc:
                return f"refused: {describe(exc)}"
        name, task_id, eta, expires = peek(envelope)
        if name is None:  # protocol v1: the task's fields are in the body
            message = parse_envelope(
                envelope,
                accept=accept,
                max_size=max_size,
                accept_compression=accept_compression,
            )
            name, task_id, eta, expires = message.task, message.id, message.eta, message.expires
        if not isinstance(name, str) or not isinstance(task_id, str) or not task_id:
            raise DecodeError("the task name and id must be strings")
        now = datetime.now(timezone.utc)
        expired = expires if expires is not None and expires <= now else None
        delay = None if eta is None else (eta - now).total_seconds()
    except Exception as exc:  # any failure to read it is the message's fault
        err = exc if isinstance(exc, SerializationError) else DecodeError(describe(exc))
        return f"undecodable message: {describe(err)}"
    return name, task_id, expired, delay


def request_from_headers(envelope: Envelope, *, queue: str, redelivered: bool) -> Request:
    """A :class:`Request` filled from the headers alone (no body decode)."""
    headers: Mapping[str, Any] = envelope.headers
    task_id = str(headers.get("id") or envelope.correlation_id or envelope.id)
    return Request(
        id=task_id,
        task=str(headers.get("task") or ""),
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        delivery_info={
            "routing_key": queue,
            "priority": envelope.priority,
            "redelivered": redelivered,
        },
        headers=headers,
        redelivered=redelivered,
    )
