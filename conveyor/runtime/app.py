"""``App``: tasks, configuration, and the broker and result backend they use.

Feels like Celery::

    app = App("tasks", broker="redis://localhost:6379/0", backend="redis://localhost:6379/1")

    @app.task
    def add(x, y):
        return x + y

    add.delay(4, 4).get(timeout=10)

The app talks to its broker and result backend only through the core protocols
(:mod:`conveyor.core.protocols`); any registered implementation works.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, overload

from conveyor.core.base import check_id
from conveyor.core.capabilities import Capability
from conveyor.core.celery import TaskMessage, build_envelope
from conveyor.core.errors import ConfigurationError, OperationalError
from conveyor.core.protocols import Broker, ResultBackend
from conveyor.core.registry import Registry, default_registry
from conveyor.core.signing import signer_from_config
from conveyor.core.types import Envelope
from conveyor.core.urls import mask_url
from conveyor.runtime.config import Settings
from conveyor.runtime.result import AsyncResult
from conveyor.runtime.sending import SEND_OPTIONS, SendOptions
from conveyor.runtime.storing import routes_by_reply_to
from conveyor.runtime.task import Task

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["App", "default_broker_url", "default_result_backend_url"]

log = logging.getLogger("conveyor.app")

_ENV_BROKER = "CONVEYOR_BROKER_URL"
_ENV_BACKEND = "CONVEYOR_RESULT_BACKEND"
_ENV_HOME = "CONVEYOR_HOME"
#: ``send_many`` hands the broker at most this many messages per ``publish_many`` call.
_SEND_CHUNK = 1000


def _home() -> Path:
    return Path(os.environ.get(_ENV_HOME) or Path.cwd() / ".conveyor").resolve()


def default_broker_url() -> str:
    """The embedded default broker: SQLite in ``./.conveyor`` (or ``$CONVEYOR_HOME``)."""
    return f"sqla+sqlite:///{_home() / 'broker.db'}"


def default_result_backend_url() -> str:
    """The embedded default result store: SQLite next to the default broker."""
    return f"db+sqlite:///{_home() / 'results.db'}"


class _RoutesReplies(Protocol):
    """What the app calls on a backend declaring ``routes_by_reply_to`` (rpc://)."""

    def declare_reply_queue(self) -> None: ...


class App:
    """A task application.

    Args:
        main: the app's name; tasks defined in ``__main__`` are named ``<main>.<function>``.
        broker: broker URL (overrides ``CONVEYOR_BROKER_URL`` and ``conf.broker_url``).
        backend: result backend URL (overrides ``CONVEYOR_RESULT_BACKEND`` and
            ``conf.result_backend``).
        include: modules the worker imports at start (where tasks are defined).
        config_source: an object or module path loaded with ``config_from_object``.
        registry: scheme registry to resolve URLs (default: the global one).
        **settings: any setting, as ``conf.update(**settings)``.

    Thread-safety: sending tasks and reading results is safe from any number of threads;
    configure the app before sharing it.
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | None = None,
        backend: str | None = None,
        include: Sequence[str] = (),
        config_source: Any = None,
        registry: Registry | None = None,
        **settings: Any,
    ) -> None:
        self.main = main
        self.conf = Settings()
        if config_source is not None:
            self.config_from_object(config_source)
        if settings:
            self.conf.update(settings)
        self._broker_arg = broker
        self._backend_arg = backend
        self.include = list(include)
        self.registry = registry
        self.tasks: dict[str, Task] = {}
        self._lock = threading.Lock()
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._declared: set[str] = set()
        self._forked_leftovers: tuple[Any, Any] = (None, None)
        self._reply_declared = False
        self._routes_replies: tuple[str, bool] | None = None
        self.oid = str(uuid.uuid4())
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"

    def __repr__(self) -> str:
        return f"<App {self.main or '__main__'}: {mask_url(self.broker_url)}>"

    # ---- configuration
    def config_from_object(self, obj: Any, *, namespace: str | None = None) -> None:
        """Load settings from a module (or its import path) or object, as Celery does."""
        self.conf.from_object(obj, namespace=namespace)

    @property
    def broker_url(self) -> str:
        """The broker URL in effect (argument > environment > conf > embedded default)."""
        url = self._broker_arg or os.environ.get(_ENV_BROKER) or self.conf.broker_url
        if url is None:
            return default_broker_url()
        if not str(url).strip():
            raise ConfigurationError(
                "the broker URL is empty; set a URL or leave it unset for the embedded default"
            )
        return str(url)

    @property
    def result_backend_url(self) -> str:
        """The result backend URL in effect (argument > environment > conf > default)."""
        url = self._backend_arg or os.environ.get(_ENV_BACKEND) or self.conf.result_backend
        if url is None:
            return default_result_backend_url()
        if not str(url).strip():
            raise ConfigurationError(
                "the result backend URL is empty; set a URL or leave it unset for the default"
            )
        return str(url)

    @property
    def uses_embedded_default(self) -> bool:
        return self.broker_url == default_broker_url()

    # ---- connections (lazy, long-lived, one per app)
    @property
    def broker(self) -> Broker:
        """The app's broker, built on first use and kept for the app's lifetime."""
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = self._connect(
                        "broker", self.broker_url, self.conf.broker_transport_options
                    )
        return self._broker

    @property
    def backend(self) -> ResultBackend:
        """The app's result backend, built on first use and kept for the app's lifetime."""
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = self._connect(
                        "result_backend",
                        self.result_backend_url,
                        self.conf.result_backend_transport_options,
                    )
        return self._backend

    def _connect(self, kind: Literal["broker", "result_backend"], url: str, given: Any) -> Any:
        """Build the broker or backend for ``url`` with the options the runtime implies."""
        if url in (default_broker_url(), default_result_backend_url()):
            _home().mkdir(parents=True, exist_ok=True)
        options = dict(given or {})
        cls = (self.registry or default_registry).lookup(kind, url)
        if kind == "broker" and Capability.LEASE_EXTENSION in getattr(cls, "capabilities", ()):
            # The worker's heartbeat renews leases of this length.
            options.setdefault("lease_seconds", float(self.conf.worker_lease_seconds))
        if kind == "result_backend" and routes_by_reply_to(cls):
            # rpc://: results travel over the broker to this app's reply queue.
            options.setdefault("broker_url", self.broker_url)
            options.setdefault("reply_to", self.oid)
            options.setdefault("default_ttl", self.conf.result_expires)
        if kind == "result_backend" and Capability.COMPRESSED_RESULTS in cls.capabilities:
            # The reader honours the same methods as the worker (compressed results).
            options.setdefault("accept_compression", self.conf.accept_compression)
        return cls.from_url(url, **options)

    def _reply_queue_needed(self) -> bool:
        """Whether results come back as replies (rpc://), so the reply queue must exist before
        the first task is sent (else an early reply is dropped)."""
        if self._reply_declared:
            return False
        url = self.result_backend_url
        cached = self._routes_replies
        if cached is None or cached[0] != url:  # a registry lookup per send cost ~10% of it
            cls = (self.registry or default_registry).lookup("result_backend", url)
            cached = self._routes_replies = (url, routes_by_reply_to(cls))
        return cached[1]

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them.

        Closing would send goodbyes on sockets the parent still uses; the objects are kept
        referenced so no finalizer closes them either. The child builds its own on first use.
        """
        self._forked_leftovers = (self._broker, self._backend)
        self._broker = None
        self._backend = None
        self._lock = threading.Lock()
        self._declared = set()
        self._reply_declared = False

    def close(self) -> None:
        """Close the broker and result backend connections. Idempotent."""
        with self._lock:
            broker, self._broker = self._broker, None
            backend, self._backend = self._backend, None
            self._declared.clear()
            self._reply_declared = False
        for conn in (broker, backend):
            if conn is not None:
                conn.close()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tasks
    @overload
    def task(self, fn: Callable[..., Any], /) -> Task: ...

    @overload
    def task(self, fn: None = None, /, **options: Any) -> Callable[[Callable[..., Any]], Task]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, /, **options: Any
    ) -> Task | Callable[[Callable[..., Any]], Task]:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., ...)``."""

        def register(func: Callable[..., Any]) -> Task:
            name = options.pop("name", None) or self.gen_task_name(func)
            task = Task(self, func, name=name, **options)
            self.tasks[name] = task
            return task

        if fn is not None:
            return register(fn)
        return register

    def gen_task_name(self, fn: Callable[..., Any]) -> str:
        """Celery's naming: ``module.function``; ``__main__`` becomes the app's main name."""
        module = getattr(fn, "__module__", None) or "__main__"
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{fn.__qualname__}"

    def import_modules(self) -> None:
        """Import the modules named in ``include`` (so their tasks register)."""
        for name in self.include:
            importlib.import_module(name)

    # ---- sending
    def route(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The queue for task ``name`` per ``task_routes`` (dicts with globs, callables, or a
        list of those), else ``task_default_queue``."""
        routes = self.conf.task_routes
        if routes:
            for router in routes if isinstance(routes, (list, tuple)) else [routes]:
                found = self._apply_router(router, name, args, kwargs)
                if found:
                    return found
        return str(self.conf.task_default_queue)

    @staticmethod
    def _apply_router(
        router: Any, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> str | None:
        if callable(router):
            out = router(name, args, kwargs, {})
        elif isinstance(router, Mapping):
            out = router.get(name)
            if out is None:
                for pattern, value in router.items():
                    if fnmatch.fnmatchcase(name, pattern):
                        out = value
                        break
        else:
            raise ConfigurationError(f"task_routes entry {router!r} is not a dict or callable")
        if isinstance(out, str):
            return out
        if isinstance(out, Mapping):
            queue = out.get("queue")
            return str(queue) if queue else None
        return None

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Unpack[SendOptions],
    ) -> AsyncResult:
        """Send task ``name`` (it need not be defined here) and return its ``AsyncResult``.

        ``options``: :class:`~conveyor.runtime.sending.SendOptions`. ``countdown``/``eta`` are
        held by the broker (``delayed_delivery``), never by a worker.

        Raises:
            UnsupportedFeature: a delay or priority the broker does not declare.
            ConfigurationError: unknown options.
        """
        unknown = options.keys() - SEND_OPTIONS
        if unknown:
            raise ConfigurationError(f"unknown apply_async option(s): {', '.join(sorted(unknown))}")
        envelope, target, delay, wants_result = self._prepare(name, args, kwargs, options)
        self._publish([envelope], target, delay, wants_result)
        return AsyncResult(envelope.id, app=self)

    def send_many(
        self,
        name: str,
        args_list: Iterable[Sequence[Any]],
        kwargs: Mapping[str, Any] | None = None,
        **options: Unpack[SendOptions],
    ) -> list[AsyncResult]:
        """Send task ``name`` once per item of ``args_list``, in as few broker round trips as
        the broker allows (its ``publish_many``: one Lua call per 1,000 messages on Redis, one
        wait for all confirms on RabbitMQ, one insert per batch on SQL and MongoDB).

        Every message gets its own task id; ``kwargs`` and the options (those of
        :meth:`send_task`, except ``task_id``) apply to all. Messages are published in
        order; on an error, a prefix of them may have been published.

        Returns:
            One :class:`AsyncResult` per message, in order.
        """
        if "task_id" in options:
            raise ConfigurationError("send_many gives every message its own task id")
        unknown = options.keys() - SEND_OPTIONS
        if unknown:
            raise TypeError(f"send_many() got unexpected keyword argument(s): {sorted(unknown)}")
        results: list[AsyncResult] = []
        batch: list[Envelope] = []
        target = ""
        delay: float | None = None
        wants_result = False
        for args in args_list:
            envelope, queue, when, wants = self._prepare(name, args, kwargs, options)
            # A batch goes to one queue with one delay: the first message's (an ``eta``
            # gives each message a delay microseconds shorter than the one before).
            if batch and (queue != target or (when is None) != (delay is None)):
                self._publish(batch, target, delay, wants_result)
                batch = []
            if not batch:
                target, delay = queue, when
            wants_result = wants_result or wants
            batch.append(envelope)
            results.append(AsyncResult(envelope.id, app=self))
            if len(batch) >= _SEND_CHUNK:
                self._publish(batch, target, delay, wants_result)
                batch = []
        if batch:
            self._publish(batch, target, delay, wants_result)
        return results

    def _publish(
        self, envelopes: list[Envelope], target: str, delay: float | None, wants_result: bool
    ) -> None:
        if wants_result and self._reply_queue_needed():
            cast(_RoutesReplies, self.backend).declare_reply_queue()
            self._reply_declared = True
        broker = self.broker

        def send() -> None:
            if target not in self._declared:
                broker.declare_queue(target)
                self._declared.add(target)
            if len(envelopes) == 1:
                broker.publish(envelopes[0], queue=target, delay=delay or None)
            else:
                broker.publish_many(envelopes, queue=target, delay=delay or None)

        self._with_publish_retry(send)

    def _with_publish_retry(self, send: Callable[[], None]) -> None:
        """Run ``send``; on a lost connection or a timeout, retry as Celery's
        ``task_publish_retry`` / ``task_publish_retry_policy`` say (default: 3 retries,
        0 s then 0.2 s apart), then raise. A retried publish may have reached the broker
        the first time too (at-least-once: the worker may see it twice); refused
        credentials and bad input are never retried."""
        try:
            send()  # the common case: no settings read on the publish path
            return
        except OperationalError as exc:
            error = exc
        conf = self.conf
        policy = dict(conf.task_publish_retry_policy or {})
        retries = int(policy.get("max_retries", 3)) if conf.task_publish_retry else 0
        wait = float(policy.get("interval_start", 0.0))
        step = float(policy.get("interval_step", 0.2))
        cap = float(policy.get("interval_max", 0.2))
        attempt = 0
        while True:
            if attempt >= retries:
                raise error
            attempt += 1
            log.warning(
                "publish failed (%s); retry %d of %d in %.2fs", error, attempt, retries, wait
            )
            if wait > 0:
                time.sleep(wait)
            wait = min(wait + step, cap)
            try:
                send()
                return
            except OperationalError as exc:
                error = exc

    @staticmethod
    def _seconds(what: str, value: object) -> float:
        """A number of seconds from a caller: finite, or a ConfigurationError naming it."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"{what} must be a number of seconds: {value!r}")
        seconds = float(value)
        if seconds != seconds or seconds in (float("inf"), float("-inf")):
            raise ConfigurationError(f"{what} must be a finite number of seconds: {value!r}")
        return seconds

    @staticmethod
    def _after(now: datetime, what: str, seconds: float) -> datetime:
        """``now + seconds``, or a ConfigurationError when no clock can hold that instant."""
        try:
            return now + timedelta(seconds=seconds)
        except OverflowError:
            raise ConfigurationError(
                f"{what} of {seconds!r} seconds is past the latest time a clock can hold"
            ) from None

    def _prepare(
        self,
        name: str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: SendOptions,
    ) -> tuple[Envelope, str, float | None, bool]:
        """Build (and sign) the envelope of one task message: ``(envelope, queue, delay,
        wants_result)``."""
        eta, priority = options.get("eta"), options.get("priority")
        countdown, expires = options.get("countdown"), options.get("expires")
        time_limit, soft_time_limit = options.get("time_limit"), options.get("soft_time_limit")
        task_id, group_id = options.get("task_id"), options.get("group_id")
        ignore_result, reply_to = options.get("ignore_result"), options.get("reply_to")
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        now = datetime.now(timezone.utc)
        delay: float | None = None
        if countdown is not None:
            delay = max(0.0, self._seconds("countdown", countdown))
            eta = self._after(now, "countdown", delay)
        elif eta is not None:
            eta = self._aware(eta)
            delay = max(0.0, (eta - now).total_seconds())
        expires_at: datetime | None
        if expires is None:
            expires_at = None
        elif isinstance(expires, datetime):
            expires_at = self._aware(expires)
        else:
            expires_at = self._after(now, "expires", self._seconds("expires", expires))
        if priority is None:
            priority = self.conf.task_default_priority
        for what, limit in (("time_limit", time_limit), ("soft_time_limit", soft_time_limit)):
            if limit is not None and (
                isinstance(limit, bool)
                or not isinstance(limit, (int, float))
                or not 0 < limit < float("inf")
            ):
                raise ConfigurationError(f"{what} must be a positive number of seconds: {limit!r}")
        wants_result = not (
            self.conf.task_ignore_result if ignore_result is None else ignore_result
        )
        if task_id is None:
            task_id = str(uuid.uuid4())  # always storable: no check on the hot path
        else:
            task_id = self._check_id(task_id, "task id", wants_result)
        if group_id is not None:
            group_id = self._check_id(group_id, "group id", wants_result)
        message = TaskMessage(
            task=name,
            id=task_id,
            args=args,
            kwargs=kwargs,
            eta=eta,
            expires=expires_at,
            retries=options.get("retries", 0),
            timelimit=(time_limit, soft_time_limit),
            root_id=options.get("root_id") or task_id,
            parent_id=options.get("parent_id"),
            group=group_id,
            group_index=options.get("group_index"),
            origin=self.origin,
            ignore_result=not wants_result,
            reply_to=reply_to or self.oid,
            priority=int(priority or 0),
            headers=dict(options.get("headers") or {}),
        )
        envelope = build_envelope(
            message,
            serializer=options.get("serializer") or self.conf.task_serializer,
            compression=options.get("compression") or self.conf.task_compression,
        )
        signer = signer_from_config(self.conf.security_key)
        if signer is not None:  # security_key set: sign body and headers (core/signing.py)
            envelope = signer.sign(envelope)
        target = options.get("queue") or self.route(name, args, kwargs)
        return envelope, target, delay or None, wants_result

    def _check_id(self, value: Any, what: str, wants_result: bool) -> str:
        """``value`` if it can be a task or group id, else ``ConfigurationError`` now, at
        publish, rather than a refusal at the worker. Every id: a non-empty ``str`` of valid
        Unicode without NUL, at most :data:`~conveyor.core.base.MAX_ID_BYTES` bytes. When
        the message wants a result, also what the result backend can hold (its
        ``validate_task_id``: no I/O); a backend is not built for messages without one."""
        checked = check_id(value, what)
        if wants_result:
            validate = getattr(self.backend, "validate_task_id", None)
            if validate is not None:
                try:
                    validate(checked)
                except ConfigurationError as exc:
                    if what == "task id":
                        raise
                    # the backend's rules for task ids hold for group ids; say which it was
                    raise ConfigurationError(
                        f"{what} refused by the result backend: {exc}"
                    ) from None
        return checked

    def AsyncResult(self, task_id: str) -> AsyncResult:  # noqa: N802 - Celery's name
        """A handle on an existing task id."""
        return AsyncResult(task_id, app=self)

    def _aware(self, when: datetime) -> datetime:
        if when.tzinfo is not None:
            return when
        if self.conf.enable_utc or self.conf.timezone in (None, "UTC"):
            return when.replace(tzinfo=timezone.utc)
        from zoneinfo import ZoneInfo

        return when.replace(tzinfo=ZoneInfo(str(self.conf.timezone)))

    # ---- worker
    def Worker(self, **options: Any) -> Any:  # noqa: N802 - Celery's name
        """Build a :class:`conveyor.runtime.worker.Worker` for this app."""
        from conveyor.runtime.worker import Worker

        return Worker(self, **options)

    def worker_main(self, argv: Iterable[str] | None = None) -> None:
        """Run the worker command for this app (``app.worker_main(['worker', '-l', 'info'])``;
        see :func:`conveyor.runtime.command.worker_main`)."""
        from conveyor.runtime.command import worker_main

        worker_main(self, argv)
