"""The options of sending a task, defined once: :class:`SendOptions`.

:meth:`App.send_task <conveyor.runtime.app.App.send_task>`, :meth:`App.send_many
<conveyor.runtime.app.App.send_many>` and :meth:`Task.apply_async
<conveyor.runtime.task.Task.apply_async>` take them as ``**options: Unpack[SendOptions]``, so
the keyword list exists here only and mypy checks every call.

Thread-safety: plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypedDict

__all__ = ["SEND_OPTIONS", "SendOptions"]


class SendOptions(TypedDict, total=False):
    """Keyword options of sending one task message (all optional; Celery's names)."""

    #: Seconds from now before the task may run (held by the broker: ``delayed_delivery``).
    countdown: float | None
    #: When the task may run (naive: the app's timezone); ``countdown`` wins over it.
    eta: datetime | None
    #: Seconds from now, or a time, after which the task is revoked instead of run.
    expires: float | datetime | None
    #: Queue to publish to (default: the routes, then ``task_default_queue``).
    queue: str | None
    #: Message priority (default ``task_default_priority``).
    priority: int | None
    #: Body serializer (default ``task_serializer``).
    serializer: str | None
    #: Body compression (default ``task_compression``).
    compression: str | None
    #: Extra message headers.
    headers: Mapping[str, Any] | None
    #: The task id (default: a new UUID4).
    task_id: str | None
    #: Store no result (default ``task_ignore_result``).
    ignore_result: bool | None
    #: Hard time limit, in seconds, for this message.
    time_limit: float | None
    #: Soft time limit, in seconds, for this message.
    soft_time_limit: float | None
    #: Retries already made (a retry's message carries its predecessor's count + 1).
    retries: int
    #: Id of the task that sent this one.
    parent_id: str | None
    #: Id of the first task of the workflow (default: this task's id).
    root_id: str | None
    #: Id of the group the task belongs to.
    group_id: str | None
    #: Position in its group.
    group_index: int | None
    #: Where an ``rpc://`` result goes (default: this app's reply queue).
    reply_to: str | None


#: The option names :class:`SendOptions` declares.
SEND_OPTIONS: frozenset[str] = SendOptions.__optional_keys__ | SendOptions.__required_keys__
