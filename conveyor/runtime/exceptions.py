"""Exceptions of the task runtime. Names follow Celery's so tracebacks read the same."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from conveyor.core.errors import ConveyorError

__all__ = [
    "MaxRetriesExceededError",
    "NotRegistered",
    "Reject",
    "Retry",
    "SoftTimeLimitExceeded",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "WorkerLostError",
]


class Retry(ConveyorError):
    """Raised by ``task.retry()`` to end this attempt; the worker schedules the next one.

    Attributes:
        exc: the exception that caused the retry, if any.
        when: seconds until the next attempt, or an aware datetime.
        retry_args: positional arguments for the next attempt (None: the same).
        retry_kwargs: keyword arguments for the next attempt (None: the same).
    """

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | None = None,
        when: float | datetime | None = None,
        *,
        retry_args: tuple[Any, ...] | None = None,
        retry_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.exc = exc
        self.when = when
        self.message = message
        self.retry_args = retry_args
        self.retry_kwargs = retry_kwargs
        super().__init__(message or (f"Retry in {when}s" if when is not None else "Retry"))


class MaxRetriesExceededError(ConveyorError):
    """A task asked to retry more than ``max_retries`` times."""


class NotRegistered(ConveyorError, KeyError):
    """No task of this name is registered in the worker's app."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "NotRegistered"


class TaskRevokedError(ConveyorError):
    """The task was revoked (for example, its ``expires`` time had passed)."""


class WorkerLostError(ConveyorError):
    """The process running the task died (killed, OOM) before it finished."""


class SoftTimeLimitExceeded(ConveyorError):
    """Raised inside a task when its soft time limit passes; the task may clean up.

    Raised without arguments, as Celery's (billiard's): the stored result reads
    ``SoftTimeLimitExceeded()``.
    """

    def __str__(self) -> str:
        return f"SoftTimeLimitExceeded{self.args!r}"


class TimeLimitExceeded(ConveyorError):
    """The task ran past its hard time limit: its process was killed (prefork), or this was
    raised in it (threads, solo: a thread cannot be killed).

    Carries the limit in seconds as its one argument, as Celery's: the stored result reads
    ``TimeLimitExceeded(30.0,)``.
    """

    def __str__(self) -> str:
        return f"TimeLimitExceeded{self.args!r}"


class Reject(ConveyorError):
    """Raised by a task to reject its message (``requeue=False`` dead-letters it)."""

    def __init__(self, reason: str = "", requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason)
