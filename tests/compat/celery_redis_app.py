"""The Celery 5.7 side of the Redis interop tests: a real Celery app and its tasks.

A real ``celery worker`` runs this module (``-A celery_redis_app``, with this folder on
``PYTHONPATH``) and the tests use its ``app`` as a Celery *client*. The conveyor side
(``conveyor_redis_app``) defines the same task names, so either worker runs either client's
tasks. ``CONVEYOR_TEST_REDIS_URL`` selects the server (default db 9 of the local Redis).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

URL = os.environ.get("CONVEYOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

app = Celery("celery_redis_app", broker=URL, backend=URL, set_as_current=False)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # One message at a time, acked after it ran: the priority test publishes while a
    # blocker runs, and the worker must not have prefetched anything else meanwhile.
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)


class CompatError(Exception):
    """A custom exception type both sides know (its module is loaded on both)."""


_redis = redis.Redis.from_url(URL)


@app.task(name="compat.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="compat.echo")
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs, "worker": "celery"}


@app.task(name="compat.boom")
def boom(message: str, custom: bool = False) -> None:
    if custom:
        raise CompatError(message)
    raise ValueError(message)


@app.task(name="compat.now")
def now() -> float:
    return time.time()


@app.task(name="compat.record")
def record(key: str, tag: str, sleep: float = 0.0) -> str:
    time.sleep(sleep)
    _redis.rpush(key, tag)
    return tag
