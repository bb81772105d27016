"""Value types that cross the contract: what a broker moves and what a result backend keeps.

All are frozen dataclasses with slots: cheap to build on the hot path, safe to share between
threads, and printable without leaking message bodies.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "EXCEPTION_STATES",
    "PROPAGATE_STATES",
    "READY_STATES",
    "Delivery",
    "Envelope",
    "GroupRecord",
    "ResultRecord",
    "State",
]

_EMPTY: Mapping[str, Any] = {}


class State(str, enum.Enum):
    """Task states, spelled exactly as Celery spells them on the wire."""

    PENDING = "PENDING"
    RECEIVED = "RECEIVED"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    RETRY = "RETRY"
    REVOKED = "REVOKED"
    REJECTED = "REJECTED"
    IGNORED = "IGNORED"

    def __str__(self) -> str:
        return self.value

    @property
    def ready(self) -> bool:
        """True for the final states: SUCCESS, FAILURE, REVOKED."""
        return self in READY_STATES


READY_STATES = frozenset({State.SUCCESS, State.FAILURE, State.REVOKED})
#: States whose ``result`` is an exception document ``{exc_type, exc_message, exc_module}``.
EXCEPTION_STATES = frozenset({State.RETRY, State.FAILURE, State.REVOKED})
#: States that ``AsyncResult.get(propagate=True)`` raises for.
PROPAGATE_STATES = frozenset({State.FAILURE, State.REVOKED})


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message as a broker moves it: opaque bytes plus metadata.

    Brokers never look inside ``body``. Celery protocol v2 headers (``task``, ``id``, ``eta``,
    ...) travel in ``headers``; see :mod:`conveyor.core.celery`.

    Attributes:
        id: the message id (for Celery messages, the task id). Unique per logical message; a
            redelivered copy keeps it.
        body: the serialized (and maybe compressed) payload.
        content_type: MIME type of the serializer, e.g. ``application/json``.
        content_encoding: ``utf-8`` for text serializers, ``binary`` otherwise.
        headers: string-keyed application headers. Values must be JSON-representable
            (str, int, float, bool, None, lists and string-keyed maps of those).
        priority: 0 (lowest, the default) to 9 (highest). Brokers with the ``priority``
            capability deliver higher priorities first; within one priority, FIFO.
        correlation_id: links replies to requests (Celery: the task id).
        reply_to: where a reply should go (Celery: the client's reply queue).
    """

    id: str
    body: bytes
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    headers: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    correlation_id: str | None = None
    reply_to: str | None = None

    def __repr__(self) -> str:  # never dump bodies into logs
        return (
            f"Envelope(id={self.id!r}, content_type={self.content_type!r}, "
            f"body=<{len(self.body)} bytes>, priority={self.priority})"
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message handed to one consumer, held under a lease until ``ack`` or ``reject``.

    Attributes:
        envelope: the message.
        queue: the queue it was received from.
        receipt: broker-private handle identifying this delivery; treat as opaque.
        redelivered: True when this message was delivered before and not acked (the previous
            consumer died, rejected with requeue, or its lease expired).
        delivery_count: how many times the message has been delivered, this one included,
            where the broker counts; None where it cannot know.
    """

    envelope: Envelope
    queue: str
    receipt: Any = field(repr=False)
    redelivered: bool = False
    delivery_count: int | None = None


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """The state and outcome of one task, as a result backend keeps it.

    ``result`` holds plain data: the task's return value for SUCCESS, the exception document
    ``{"exc_type", "exc_message", "exc_module"}`` for RETRY/FAILURE/REVOKED (Celery's format),
    ``{"pid", "hostname"}`` for STARTED. Backends serialize it with their result serializer.

    Attributes:
        task_id: the task id.
        state: the task's state.
        result: see above.
        traceback: the formatted traceback text for exception states.
        date_done: aware UTC datetime for ready states, else None.
        children: Celery result tuples of subtasks the task sent (``[]`` from a worker).
        group_id: the group the task belongs to, if any.
        parent_id: the task that sent this one, if any.
        extended: Celery's ``result_extended`` fields when present (``name``, ``args``,
            ``kwargs``, ``worker``, ``retries``, ``queue``).
    """

    task_id: str
    state: State
    result: Any = None
    traceback: str | None = None
    date_done: datetime | None = None
    children: list[Any] | None = None
    group_id: str | None = None
    parent_id: str | None = None
    extended: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @property
    def ready(self) -> bool:
        return self.state in READY_STATES


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """The membership of a group of tasks (Celery's "taskset" / GroupResult).

    Attributes:
        group_id: the group id.
        task_ids: member task ids, in group order.
        date_done: when the group was saved (aware UTC).
    """

    group_id: str
    task_ids: tuple[str, ...]
    date_done: datetime | None = None
