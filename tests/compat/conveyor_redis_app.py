"""The conveyor side of the Redis interop tests: the same task names as ``celery_redis_app``.

``make_app()`` builds a conveyor :class:`~conveyor.runtime.App` on the same Redis database
(broker and results), with the tasks Celery's app defines, raising the same exception types.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery_redis_app import CompatError

from conveyor.runtime import App

URL = os.environ.get("CONVEYOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def make_app(**settings: Any) -> App:
    app = App("conveyor_redis_app", broker=URL, backend=URL, **settings)
    client = redis.Redis.from_url(URL)

    @app.task(name="compat.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="compat.echo")
    def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs, "worker": "conveyor"}

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
        client.rpush(key, tag)
        return tag

    return app
