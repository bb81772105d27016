"""Both sides of the AMQP interop tests: a real Celery 5.7 app and a conveyor app.

A real ``celery worker`` runs this module (``-A celery_amqp_app``, with this folder on
``PYTHONPATH``, so the module has the same name in the worker and in the tests and the
custom exception type resolves on both sides). The tests also use :func:`make_celery_app`
as a Celery *client* and :func:`make_conveyor_app` for conveyor's client and worker. Task
names are explicit (``amqpcompat.*``) and identical on both sides.

Both sides use ``amqp://`` (``CONVEYOR_TEST_AMQP_URL``) as broker and ``rpc://`` for
results. ``CONVEYOR_TEST_CELERY_MAX_PRIORITY`` makes the worker's app declare its queues
with ``x-max-priority`` (Celery's ``task_queue_max_priority``), as conveyor does with
``max_priority``: both sides must declare the same arguments.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from conveyor import App

URL = os.environ.get("CONVEYOR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
MAX_PRIORITY = int(os.environ.get("CONVEYOR_TEST_CELERY_MAX_PRIORITY") or 0) or None


class AMQPCompatError(Exception):
    """A custom exception type both sides know (its module is loaded on both)."""


def add(x: int, y: int) -> int:
    return x + y


def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


def boom(message: str, custom: bool = False) -> None:
    if custom:
        raise AMQPCompatError(message, 42)
    raise ValueError(message)


def now() -> float:
    return time.time()


def stamp(tag: str) -> dict[str, Any]:
    """When this ran; tasks of one solo worker run one after the other."""
    time.sleep(0.02)
    return {"tag": tag, "at": time.time()}


TASKS = {
    "amqpcompat.add": add,
    "amqpcompat.echo": echo,
    "amqpcompat.boom": boom,
    "amqpcompat.now": now,
    "amqpcompat.stamp": stamp,
}


def make_celery_app(max_priority: int | None = None) -> Celery:
    celery = Celery("celery_amqp_app", broker=URL, backend="rpc://", set_as_current=False)
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # One message at a time, acked after it ran: priority order is then the order in
        # which RabbitMQ hands messages out.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=600,
        task_queue_max_priority=max_priority,
    )
    for name, fn in TASKS.items():
        celery.task(name=name)(fn)
    return celery


def make_conveyor_app(max_priority: int | None = None) -> App:
    """A conveyor app on the same broker, with ``rpc://`` results to its own ``oid``."""
    transport = {"max_priority": max_priority} if max_priority else {}
    conveyor = App(
        "conveyor_amqp_compat",
        broker=URL,
        backend="rpc://",
        broker_transport_options=transport,
        result_expires=600.0,
    )
    # The reply queue must be the oid the app puts in reply_to (the runtime change that
    # would make this automatic is described in docs/stores/amqp.md).
    conveyor.conf.result_backend_transport_options = {"broker_url": URL, "reply_to": conveyor.oid}
    for name, fn in TASKS.items():
        conveyor.task(name=name)(fn)
    return conveyor


app = make_celery_app(MAX_PRIORITY)
