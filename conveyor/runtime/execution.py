"""Running one task: decode, call, and describe the outcome as plain data.

This module is what a pool process executes, so it touches neither the broker nor the
result backend: it turns a message into an :class:`Outcome`, and the worker (in the parent
process or thread) stores the result, publishes retries and settles the delivery.
"""

from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from conveyor.core.errors import SerializationError
from conveyor.core.types import Envelope, State
from conveyor.runtime.exceptions import (
    NotRegistered,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
)
from conveyor.runtime.task import Request

if TYPE_CHECKING:
    from conveyor.runtime.app import App

__all__ = ["Outcome", "execute"]


@dataclass
class Outcome:
    """What happened when a task ran.

    Attributes:
        state: SUCCESS, FAILURE, RETRY or REJECTED (``Reject`` raised).
        value: the return value (SUCCESS) or the exception document (other states).
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


class _SoftLimit:
    """Raise ``SoftTimeLimitExceeded`` in the main thread after ``seconds`` (SIGALRM).

    Only effective in the main thread of a process (the prefork pool's children, or the solo
    pool); elsewhere it does nothing and the worker logs that soft limits need those pools.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.active = False

    def __enter__(self) -> None:
        import threading

        if not self.seconds or threading.current_thread() is not threading.main_thread():
            return

        def _raise(signum: int, frame: Any) -> None:
            raise SoftTimeLimitExceeded(f"soft time limit ({self.seconds}s) exceeded")

        signal.signal(signal.SIGALRM, _raise)
        signal.setitimer(signal.ITIMER_REAL, float(self.seconds))
        self.active = True

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)


def execute(
    app: App,
    envelope: Envelope,
    request: Request,
    *,
    accept: Collection[str],
    soft_time_limit: float | None = None,
) -> Outcome:
    """Decode ``envelope`` and run its task; never raises for task or payload errors."""
    from conveyor.core.celery import parse_envelope

    try:
        message = parse_envelope(envelope, accept=accept)
    except SerializationError as exc:
        return Outcome(
            State.FAILURE.value,
            _exc_meta(exc),
            _format_tb(exc),
            reason=f"undecodable message: {exc}",
            dead_letter=True,
        )
    task = app.tasks.get(message.task)
    if task is None:
        err = NotRegistered(message.task)
        return Outcome(
            State.FAILURE.value,
            _exc_meta(err),
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
    limit = soft_time_limit if soft_time_limit is not None else message.timelimit[1]
    task._push_request(request)
    started = time.perf_counter()
    try:
        with _SoftLimit(limit if limit is not None else task.soft_time_limit):
            value = task(*message.args, **message.kwargs)
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
        return Outcome(
            State.FAILURE.value,
            _exc_meta(exc),
            _format_tb(exc),
            reason=f"{type(exc).__name__}: {exc}",
            runtime=runtime,
        )
    finally:
        task._push_request(None)
    return Outcome(State.SUCCESS.value, value, runtime=time.perf_counter() - started)


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
