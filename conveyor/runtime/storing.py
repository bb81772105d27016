"""How the worker writes results: every outcome is recorded once, or said in the log.

* A backend unreachable (``OperationalError``) is waited for: the store is retried with
  capped backoff while the worker holds the delivery (its lease renewed by the heartbeat),
  so a result already computed does not make its task run again. The wait ends when the
  store succeeds, when the worker stops waiting (shutdown), or after ``hold_max`` seconds
  (:class:`StoreGaveUp`); the caller then gives the message back. The bound is there because
  a backend that calls a permanent refusal transient would otherwise hold a slot for ever.
* Anything else the backend raises (a value the result serializer cannot encode, an id or
  a field the store refuses) is not retried: a minimal FAILURE record naming that error is
  stored instead (no value, no traceback), and when not even that can be stored under the
  task id (the backend refuses the id itself), the failure is logged and the message is
  settled without a result.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from conveyor.core.capabilities import Capability
from conveyor.core.errors import OperationalError
from conveyor.core.types import ResultRecord, State
from conveyor.runtime.execution import describe, failure

if TYPE_CHECKING:
    from conveyor.runtime.app import App
    from conveyor.runtime.task import Request

__all__ = ["ResultWriter", "StoreGaveUp", "minimal_record", "routes_by_reply_to", "show"]

log = logging.getLogger("conveyor.worker")

#: Longest wait between two attempts to store a result while its backend is unreachable.
STORE_BACKOFF_MAX = 5.0
#: Longest time a computed result waits for an unreachable backend, its delivery held.
STORE_HOLD_MAX = 300.0


class StoreGaveUp(OperationalError):
    """The result backend stayed unreachable for ``hold_max`` seconds: give the message back
    (it runs again later; ``worker_max_deliveries`` bounds how often)."""


def show(value: Any, limit: int = 120) -> str:
    """An outside value (an id, a task name) for a log line: a printable string as it is,
    anything else (line breaks, surrogates, other types) as its ``repr``; clipped."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


class ResultWriter:
    """Builds and stores the worker's result records.

    Args:
        app: the worker's app (its ``backend`` and ``conf``).
        hostname: the worker's node name (``result_extended``).
        abandon: set when the worker stops waiting for unreachable servers.
        stats: the worker's counters (``minimal_results``, ``unstorable_results``).

    Attributes:
        hold_max: seconds a result waits for an unreachable backend.
        abandon_at: ``time.monotonic()`` after which it waits no more (a warm shutdown's
            deadline; the solo pool's only thread may be the one waiting).
    """

    def __init__(
        self,
        app: App,
        hostname: str,
        abandon: threading.Event,
        stats: collections.Counter[str],
    ) -> None:
        self.app = app
        self.hostname = hostname
        self.abandon = abandon
        self.stats = stats
        self.hold_max = STORE_HOLD_MAX
        self.abandon_at = float("inf")
        ttl = app.conf.result_expires
        self.ttl = 0.0 if ttl is None else float(ttl)

    def exception(self, request: Request, state: State, exc: BaseException) -> ResultRecord:
        """The record of ``state`` with ``exc``'s exception document."""
        return self.record(request, state, failure(exc, "").value)

    def record(
        self, request: Request, state: State, value: Any, tb: str | None = None
    ) -> ResultRecord:
        extended: dict[str, Any] = {}
        if self.app.conf.result_extended:
            extended = {
                "name": request.task,
                "args": list(request.args),
                "kwargs": request.kwargs,
                "worker": self.hostname,
                "retries": request.retries,
                "queue": request.delivery_info.get("routing_key"),
            }
        if routes_by_reply_to(self.app.backend):
            # rpc://: the result is a message to the sender's reply queue
            # (docs/celery-compat.md#rpc-replies); the backend takes these two keys out
            # of the stored meta.
            extended["reply_to"] = request.reply_to or ""
            extended["correlation_id"] = request.correlation_id or request.id
        return ResultRecord(
            task_id=request.id,
            state=state,
            result=value,
            traceback=tb,
            date_done=datetime.now(timezone.utc)
            if state in (State.SUCCESS, State.FAILURE, State.REVOKED)
            else None,
            children=[],
            group_id=request.group,
            parent_id=request.parent_id,
            extended=extended,
        )

    def store(self, record: ResultRecord) -> bool:
        """Store ``record``, else a minimal FAILURE naming why, else log it. True when a
        record was stored.

        Raises:
            OperationalError: the backend stayed unreachable until the worker stopped
                waiting: the caller gives the message back.
        """
        try:
            self._store_retrying(record)
            return True
        except OperationalError:
            raise
        except Exception as exc:
            error = exc
        log.error(
            "cannot store the %s result of task %s (%s); storing a minimal FAILURE instead",
            record.state.value,
            show(record.task_id),
            describe(error),
        )
        self.stats["minimal_results"] += 1
        try:
            self._store_retrying(minimal_record(record, error))
            return True
        except OperationalError:
            raise
        except Exception as exc:
            log.error(
                "no result can be stored under task id %s (%s): the message is settled without one",
                show(record.task_id),
                describe(exc),
            )
            self.stats["unstorable_results"] += 1
            return False

    def _store_retrying(self, record: ResultRecord) -> None:
        """Store; while the backend is unreachable, retry with capped backoff.

        Raises:
            OperationalError: still unreachable when the worker stopped waiting.
            StoreGaveUp: still unreachable after ``hold_max`` seconds.
            Exception: anything not transient the backend raised.
        """
        delay, attempt = 0.1, 0
        give_up = time.monotonic() + self.hold_max
        while True:
            try:
                self.app.backend.store(record, ttl=self.ttl)
            except OperationalError as exc:
                attempt += 1
                if self.abandon.is_set() or time.monotonic() >= self.abandon_at:
                    raise
                if time.monotonic() >= give_up:
                    raise StoreGaveUp(
                        f"storing the result of {show(record.task_id)} still fails after "
                        f"{self.hold_max:.0f}s ({describe(exc)})"
                    ) from exc
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "storing the result of %s failed (%s); retry %d in %.1fs, the message "
                        "stays held",
                        show(record.task_id),
                        describe(exc),
                        attempt,
                        delay,
                    )
                self.abandon.wait(delay)
                delay = min(delay * 2, STORE_BACKOFF_MAX)
                continue
            if attempt:
                log.warning(
                    "stored the result of %s after %d retries", show(record.task_id), attempt
                )
            return


def minimal_record(record: ResultRecord, error: BaseException) -> ResultRecord:
    """A FAILURE (or the same non-success state) naming ``error``: no value, traceback or
    extended fields beyond what routing needs (rpc://), ids kept only when plain."""
    message = describe(error, limit=1000).partition(": ")[2]
    original = record.result.get("exc_type") if isinstance(record.result, Mapping) else None
    if record.state != State.SUCCESS and isinstance(original, str):
        message += f" (storing the task's {record.state.value}: {original[:100]})"
    cls = type(error)
    meta = {"exc_type": cls.__qualname__, "exc_message": [message], "exc_module": cls.__module__}
    routing = ("reply_to", "correlation_id")
    extended = {k: record.extended[k] for k in routing if k in record.extended}
    return ResultRecord(
        task_id=record.task_id,
        state=State.FAILURE if record.state == State.SUCCESS else record.state,
        result=meta,
        traceback=None,
        date_done=datetime.now(timezone.utc) if record.date_done is not None else None,
        children=[],
        group_id=_plain_id(record.group_id),
        parent_id=_plain_id(record.parent_id),
        extended=extended,
    )


def _plain_id(value: str | None) -> str | None:
    """``value`` when it is a short printable string any store can hold, else None."""
    if not isinstance(value, str) or len(value) > 255 or not value.isprintable():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def routes_by_reply_to(backend: Any) -> bool:
    """Whether a result backend (class or instance) declares
    :attr:`~conveyor.core.capabilities.Capability.ROUTES_BY_REPLY_TO` (rpc://)."""
    return Capability.ROUTES_BY_REPLY_TO in getattr(backend, "capabilities", ())
