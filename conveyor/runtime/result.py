"""``AsyncResult``: the handle a caller keeps for a sent task."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from conveyor.core.base import wait_for
from conveyor.core.errors import OperationTimeout
from conveyor.core.types import EXCEPTION_STATES, PROPAGATE_STATES, ResultRecord, State

if TYPE_CHECKING:
    from conveyor.runtime.app import App

__all__ = ["AsyncResult", "GetTimeout"]


class GetTimeout(OperationTimeout):
    """``AsyncResult.get()`` timed out before the task finished (Celery: ``TimeoutError``)."""


class AsyncResult:
    """The state and outcome of one task, read from the app's result backend.

    Every property reads the backend afresh (no caching of non-final states); a ready record
    is cached, since a final state never changes.
    """

    __slots__ = ("_cache", "app", "id")

    def __init__(self, task_id: str, *, app: App) -> None:
        self.id = task_id
        self.app = app
        self._cache: ResultRecord | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def task_id(self) -> str:
        return self.id

    def _record(self) -> ResultRecord | None:
        if self._cache is not None:
            return self._cache
        record: ResultRecord | None = self.app.backend.fetch(self.id)
        if record is not None and record.ready:
            self._cache = record
        return record

    @property
    def state(self) -> str:
        """The task's state name; ``PENDING`` when nothing is stored (yet, or any more)."""
        record = self._record()
        return State.PENDING.value if record is None else State(record.state).value

    status = state

    def ready(self) -> bool:
        """True once the task reached SUCCESS, FAILURE or REVOKED."""
        record = self._record()
        return record is not None and record.ready

    def successful(self) -> bool:
        return self.state == State.SUCCESS.value

    def failed(self) -> bool:
        return self.state == State.FAILURE.value

    @property
    def result(self) -> Any:
        """The return value, or the exception instance for failed/retried/revoked tasks."""
        record = self._record()
        if record is None:
            return None
        return self._value(record)

    info = result

    @property
    def traceback(self) -> str | None:
        record = self._record()
        return None if record is None else record.traceback

    @property
    def date_done(self) -> Any:
        record = self._record()
        return None if record is None else record.date_done

    def forget(self) -> None:
        """Delete the stored result."""
        self._cache = None
        self.app.backend.forget(self.id)

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.005,
    ) -> Any:
        """Wait for the task to finish and return its value.

        Uses the backend's push ``wait`` when it has one, else polls with backoff starting
        at ``interval`` seconds, growing by half each time (capped at 1 s).

        Args:
            timeout: seconds to wait; ``None`` waits forever.
            propagate: re-raise the task's exception for FAILURE and REVOKED.
            interval: first polling interval, seconds.

        Raises:
            GetTimeout: the task did not finish in time.
            Exception: the task's own exception type where it can be rebuilt safely, else
                :class:`~conveyor.core.errors.TaskError` (with the remote traceback).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        record = self._cache
        while record is None or not record.ready:
            remaining = 3600.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise GetTimeout(f"task {self.id} not ready after {timeout}s")
            record = wait_for(self.app.backend, self.id, remaining, interval=interval)
        self._cache = record
        value = self._value(record)
        if propagate and record.state in PROPAGATE_STATES:
            assert isinstance(value, BaseException)
            raise value
        return value

    def wait(self, timeout: float | None = None, propagate: bool = True) -> Any:
        return self.get(timeout=timeout, propagate=propagate)

    def _value(self, record: ResultRecord) -> Any:
        if record.state in EXCEPTION_STATES and isinstance(record.result, dict):
            from conveyor.core.celery import exception_from_meta

            exc = exception_from_meta(record.result)
            if record.traceback and hasattr(exc, "add_note"):
                exc.add_note(f"Remote traceback:\n{record.traceback}")
            return exc
        return record.result
