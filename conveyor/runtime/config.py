"""Celery-style configuration: ``app.conf`` with Celery's setting names where they exist.

Precedence for the broker and result backend URLs: the ``App(broker=..., backend=...)``
arguments, then the environment (``CONVEYOR_BROKER_URL``, ``CONVEYOR_RESULT_BACKEND``), then
``app.conf`` (``update`` / ``config_from_object``), then the embedded SQLite default (said so
loudly in the worker banner, never silently for production).

Unknown setting names warn with a did-you-mean instead of being silently ignored (Celery
ignores them, which hides typos such as ``result_expire``).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from conveyor.core.options import closest

__all__ = ["DEFAULTS", "Settings", "UnknownSettingWarning"]


class UnknownSettingWarning(UserWarning):
    """A configuration key conveyor does not know (probably a typo)."""


#: Every setting with its default. Celery's names and meanings unless noted.
DEFAULTS: Mapping[str, Any] = {
    # where things go
    "broker_url": None,
    "result_backend": None,
    "broker_transport_options": {},
    # a worker started while the broker is down waits for it (Celery 5.3+'s names);
    # max_retries None: for ever
    "broker_connection_retry_on_startup": True,
    "broker_connection_max_retries": 100,
    "result_backend_transport_options": {},
    # serialization
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ("json",),
    "result_accept_content": None,  # None: same as accept_content
    "task_compression": None,
    "result_compression": None,
    # conveyor: the compression methods a worker or result reader decompresses (aliases or
    # MIME types). Default: every built-in one (zlib, bzip2, lzma, zstd, brotli; an
    # uninstalled one still fails per message). None or (): no compressed payload at all.
    "accept_compression": ("zlib", "bzip2", "lzma", "zstd", "brotli"),
    # results
    "result_expires": 86400.0,  # seconds; None keeps results until forgotten
    # conveyor: workers delete expired rows of backends without native expiry (SQL) this
    # often, in seconds; None or 0: never (then call backend.purge_expired() yourself)
    "result_expiry_sweep_interval": 3600.0,
    "result_extended": False,
    "task_ignore_result": False,
    "task_track_started": False,
    # routing
    "task_default_queue": "celery",
    # publishing: retried on a lost connection or a timeout (Celery's names and defaults)
    "task_publish_retry": True,
    "task_publish_retry_policy": {
        "max_retries": 3,
        "interval_start": 0.0,
        "interval_step": 0.2,
        "interval_max": 0.2,
    },
    "task_routes": None,
    "task_default_priority": None,
    # time
    "timezone": "UTC",
    "enable_utc": True,
    # execution
    "task_acks_late": True,  # conveyor: at-least-once by default (Celery: False)
    "task_acks_on_failure_or_timeout": True,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_default_retry_delay": 180.0,
    "task_max_retries": 3,
    "task_default_rate_limit": None,
    # worker
    "worker_concurrency": None,  # None: number of CPUs
    "worker_pool": "prefork",
    "worker_prefetch_multiplier": 4,
    "worker_max_deliveries": 5,  # conveyor: poison-message limit, then dead-letter
    "worker_lease_seconds": 60.0,  # conveyor: lease renewed by the heartbeat thread
    # conveyor: bytes; a larger body, or one that decompresses to more, is dead-lettered
    # (decompression stops at this size, it does not inflate first and measure after)
    "worker_max_message_size": 16 * 1024 * 1024,
    "worker_shutdown_timeout": 60.0,  # conveyor: warm-shutdown wait for running tasks
    # security (conveyor)
    "security_key": None,  # HMAC-SHA256 signing key; None disables signing
}


class Settings(MutableMapping[str, Any]):
    """A mapping of settings with attribute access (``app.conf.broker_url``).

    Not thread-safe for writes: configure the app before starting workers or threads.
    """

    __slots__ = ("_changes", "_defaults")

    def __init__(self, defaults: Mapping[str, Any] = DEFAULTS) -> None:
        object.__setattr__(self, "_defaults", dict(defaults))
        object.__setattr__(self, "_changes", {})

    # ---- mapping protocol
    def __getitem__(self, key: str) -> Any:
        if key in self._changes:
            return self._changes[key]
        return self._defaults[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._check(key)
        self._changes[key] = value

    def __delitem__(self, key: str) -> None:
        del self._changes[key]

    def __iter__(self) -> Iterator[str]:
        return iter({**self._defaults, **self._changes})

    def __len__(self) -> int:
        return len({**self._defaults, **self._changes})

    # ---- attribute access
    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __repr__(self) -> str:
        # Secrets never show: security_key, passwords in URLs and in transport options.
        from conveyor.core.urls import mask_options

        return f"<Settings changed={mask_options(self._changes)!r}>"

    # ---- Celery API
    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Set several settings at once (``app.conf.update(result_expires=3600)``)."""
        items = dict(other.items() if isinstance(other, Mapping) else other)
        items.update(kwargs)
        for key, value in items.items():
            self[key] = value

    def changes(self) -> dict[str, Any]:
        """Settings that differ from the defaults."""
        return dict(self._changes)

    def from_object(self, obj: Any, *, namespace: str | None = None) -> None:
        """Load settings from a module, module path or object.

        Lower-case attributes named like settings are read. With ``namespace="CONVEYOR"``,
        upper-case ``CONVEYOR_BROKER_URL``-style attributes are read instead (as Celery's
        ``namespace="CELERY"`` does for Django settings).
        """
        if isinstance(obj, str):
            obj = importlib.import_module(obj)
        for attr in dir(obj):
            if attr.startswith("_"):
                continue
            if namespace:
                prefix = f"{namespace.upper()}_"
                if not attr.startswith(prefix):
                    continue
                key = attr[len(prefix) :].lower()
            elif attr.islower():
                key = attr
            else:
                continue
            value = getattr(obj, attr)
            if callable(value) or isinstance(value, type(importlib)):
                continue
            self[key] = value

    def _check(self, key: str) -> None:
        if key in self._defaults:
            return
        hint = closest(key, self._defaults)
        did = f" Did you mean {hint!r}?" if hint else ""
        warnings.warn(
            f"unknown setting {key!r}; it has no effect.{did}",
            UnknownSettingWarning,
            stacklevel=4,
        )
