"""Tasks: ``@app.task`` functions with ``delay()``, ``apply_async()`` and ``retry()``."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.runtime.exceptions import MaxRetriesExceededError, Retry

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from conveyor.runtime.app import App
    from conveyor.runtime.result import AsyncResult
    from conveyor.runtime.sending import SendOptions

__all__ = ["Request", "Task"]


@dataclass
class Request:
    """What a running task knows about its own invocation (``self.request`` when bound).

    Attributes mirror Celery's ``Task.request``.
    """

    id: str
    task: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    hostname: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    is_eager: bool = False
    timelimit: tuple[float | None, float | None] = (None, None)
    redelivered: bool = False


class Task:
    """A registered task. Calling it runs the function here; ``delay`` sends it.

    Created by :meth:`conveyor.App.task`; the options mirror Celery's task options.
    """

    def __init__(
        self,
        app: App,
        fn: Callable[..., Any],
        *,
        name: str,
        bind: bool = False,
        queue: str | None = None,
        max_retries: int | None = None,
        default_retry_delay: float | None = None,
        autoretry_for: Sequence[type[BaseException]] = (),
        retry_backoff: bool | float = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        retry_kwargs: Mapping[str, Any] | None = None,
        acks_late: bool | None = None,
        ignore_result: bool | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        rate_limit: str | float | None = None,
        priority: int | None = None,
        serializer: str | None = None,
        track_started: bool | None = None,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.bind = bind
        self.queue = queue
        # Options left None follow app.conf when read (Celery reads task_time_limit and the
        # other task_* defaults at run time, so app.conf.update() after @app.task counts).
        self._options: dict[str, Any] = {
            "max_retries": max_retries,
            "default_retry_delay": default_retry_delay,
            "acks_late": acks_late,
            "ignore_result": ignore_result,
            "time_limit": time_limit,
            "soft_time_limit": soft_time_limit,
            "rate_limit": rate_limit,
            "track_started": track_started,
        }
        self.autoretry_for = tuple(autoretry_for)
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = float(retry_backoff_max)
        self.retry_jitter = retry_jitter
        self.retry_kwargs = dict(retry_kwargs or {})
        self.priority = priority
        self.serializer = serializer
        self._local = threading.local()
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__module__ = getattr(fn, "__module__", __name__)
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"

    # ---- options: given on the task, else app.conf at the moment they are read
    def _option(self, key: str, setting: str) -> Any:
        value = self._options[key]
        return self.app.conf[setting] if value is None else value

    @property
    def max_retries(self) -> int | None:
        value: int | None = self._option("max_retries", "task_max_retries")
        return value

    @max_retries.setter
    def max_retries(self, value: int | None) -> None:
        self._options["max_retries"] = value

    @property
    def default_retry_delay(self) -> float:
        return float(self._option("default_retry_delay", "task_default_retry_delay"))

    @default_retry_delay.setter
    def default_retry_delay(self, value: float | None) -> None:
        self._options["default_retry_delay"] = value

    @property
    def acks_late(self) -> bool:
        return bool(self._option("acks_late", "task_acks_late"))

    @acks_late.setter
    def acks_late(self, value: bool | None) -> None:
        self._options["acks_late"] = value

    @property
    def ignore_result(self) -> bool:
        return bool(self._option("ignore_result", "task_ignore_result"))

    @ignore_result.setter
    def ignore_result(self, value: bool | None) -> None:
        self._options["ignore_result"] = value

    @property
    def time_limit(self) -> float | None:
        value: float | None = self._option("time_limit", "task_time_limit")
        return value

    @time_limit.setter
    def time_limit(self, value: float | None) -> None:
        self._options["time_limit"] = value

    @property
    def soft_time_limit(self) -> float | None:
        value: float | None = self._option("soft_time_limit", "task_soft_time_limit")
        return value

    @soft_time_limit.setter
    def soft_time_limit(self, value: float | None) -> None:
        self._options["soft_time_limit"] = value

    @property
    def rate_limit(self) -> str | float | None:
        value: str | float | None = self._option("rate_limit", "task_default_rate_limit")
        return value

    @rate_limit.setter
    def rate_limit(self, value: str | float | None) -> None:
        self._options["rate_limit"] = value

    @property
    def track_started(self) -> bool:
        return bool(self._option("track_started", "task_track_started"))

    @track_started.setter
    def track_started(self, value: bool | None) -> None:
        self._options["track_started"] = value

    # ---- running
    @property
    def request(self) -> Request:
        """The current invocation (only meaningful inside a running task)."""
        req: Request | None = getattr(self._local, "request", None)
        if req is None:
            return Request(id="", task=self.name, is_eager=True)
        return req

    def _push_request(self, request: Request | None) -> None:
        self._local.request = request

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self(*args, **kwargs)

    # ---- sending
    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Send the task with these arguments; shortcut for ``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Unpack[SendOptions],
    ) -> AsyncResult:
        """Send the task. Options as Celery's (:class:`~conveyor.runtime.sending.SendOptions`):
        ``countdown``, ``eta``, ``expires``, ``queue``, ``priority``, ``serializer``,
        ``compression``, ``headers``, ``task_id``, ``ignore_result``, ``time_limit``,
        ``soft_time_limit``, ..."""
        options.setdefault("queue", self.queue)
        if self.priority is not None:
            options.setdefault("priority", self.priority)
        if self.serializer is not None:
            options.setdefault("serializer", self.serializer)
        options.setdefault("ignore_result", self.ignore_result)
        # Only limits given on the task travel in the message (as Celery's); the
        # task_time_limit settings are the worker's to apply when the task runs.
        if self._options["time_limit"] is not None:
            options.setdefault("time_limit", self._options["time_limit"])
        if self._options["soft_time_limit"] is not None:
            options.setdefault("soft_time_limit", self._options["soft_time_limit"])
        return self.app.send_task(self.name, args, kwargs, **options)

    def s(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A Celery-shaped signature map (for ``link`` and canvas interop)."""
        return {
            "task": self.name,
            "args": list(args),
            "kwargs": kwargs,
            "options": {},
            "subtask_type": None,
            "immutable": False,
        }

    # ---- retrying
    def retry_delay(self, retries: int) -> float:
        """Seconds before attempt ``retries + 1``: fixed, or exponential with ``retry_backoff``
        (capped by ``retry_backoff_max``, with full jitter when ``retry_jitter``)."""
        if not self.retry_backoff:
            return self.default_retry_delay
        factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        delay = min(self.retry_backoff_max, factor * (2**retries))
        if self.retry_jitter:
            delay = random.uniform(0, delay)
        return float(delay)

    def retry(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
    ) -> Retry:
        """End this attempt and schedule another one (same task id, ``retries + 1``).

        Raises:
            Retry: always when ``throw`` (the worker catches it).
            MaxRetriesExceededError: or ``exc`` itself, when retries are exhausted.
        """
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}"
            )
        when: float | datetime
        if eta is not None:
            when = eta
        elif countdown is not None:
            when = float(countdown)
        else:
            when = self.retry_delay(request.retries)
        signal = Retry(
            exc=exc,
            when=when,
            retry_args=None if args is None else tuple(args),
            retry_kwargs=None if kwargs is None else dict(kwargs),
        )
        if throw:
            raise signal
        return signal
