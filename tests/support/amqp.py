"""Fixtures and helpers for the tests that need RabbitMQ (AMQP broker, rpc:// backend).

Server: ``CONVEYOR_TEST_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672//``). A server
that does not answer is :func:`~conveyor.testing.support.service_unavailable`: a skip locally,
a failure under ``CI=true`` / ``CONVEYOR_REQUIRE_SERVICES=1``.

Tests share the vhost with other runs and xdist workers, so every test uses unique queue
names; :class:`QueueJanitor` deletes the queues (with their delay levels and dead-letter
queues) a test declared, so runs do not pile up durable queues on the server.

The restart test stops the machine's RabbitMQ. :func:`server_lock` is a machine-wide
reader/writer lock (``flock`` on ``CONVEYOR_TEST_AMQP_LOCK``, default
``/tmp/conveyor-rabbitmq-tests.lock``): every test using the server holds it shared (the
``amqp_url`` fixture does), the restart test holds it exclusively, so no other AMQP test, in
this run or a parallel one, sees the outage.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conveyor.core.errors import ConveyorError
from conveyor.testing.support import requirement_missing, service_unavailable
from conveyor.transports.amqp import AMQPBroker, parse_amqp_url
from support.processes import terminating as _terminating

__all__ = [
    "AMQP_URL",
    "UNREACHABLE_AMQP_URL",
    "QueueJanitor",
    "amqp_error",
    "amqp_url",
    "janitor",
    "make_amqp_broker",
    "rabbitmqctl",
    "require_amqp",
    "server_lock",
    "terminating",
]

AMQP_URL = os.environ.get("CONVEYOR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: Same credentials, a port nothing listens on.
UNREACHABLE_AMQP_URL = "amqp://guest:guest@127.0.0.1:1//"
LOCK_PATH = os.environ.get("CONVEYOR_TEST_AMQP_LOCK", "/tmp/conveyor-rabbitmq-tests.lock")


@contextlib.contextmanager
def server_lock(*, exclusive: bool = False) -> Iterator[None]:
    """Hold the machine-wide RabbitMQ test lock (shared, or exclusive for restarts)."""
    with open(LOCK_PATH, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@functools.cache
def amqp_error() -> str | None:
    """None when RabbitMQ answers at :data:`AMQP_URL`, else why not."""
    import pika

    endpoint = parse_amqp_url(AMQP_URL)[0][0]
    params = pika.ConnectionParameters(
        host=endpoint.host,
        port=endpoint.port,
        virtual_host=endpoint.vhost,
        credentials=pika.PlainCredentials(endpoint.username, endpoint.password),
        socket_timeout=3,
        stack_timeout=5,
        connection_attempts=1,
    )
    try:
        pika.BlockingConnection(params).close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def require_amqp() -> str:
    """The server URL, or skip/fail the test when RabbitMQ is not reachable."""
    error = amqp_error()
    if error is not None:
        service_unavailable("RabbitMQ", AMQP_URL, error)
    return AMQP_URL


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """The server URL, held under the shared :func:`server_lock` for the test."""
    with server_lock():
        yield require_amqp()


def rabbitmqctl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``rabbitmqctl`` (skips the test when it is not installed or not permitted)."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        requirement_missing("rabbitmqctl is not installed")
    done = subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0 and "permission" in (done.stderr or "").lower():
        requirement_missing(f"rabbitmqctl is not permitted here: {done.stderr.strip()}")
    return done


class QueueJanitor:
    """Remembers brokers and queue names; :meth:`clean` deletes every queue they declared."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.brokers: list[AMQPBroker] = []
        self.queues: set[str] = set()

    def track(self, broker: AMQPBroker) -> AMQPBroker:
        self.brokers.append(broker)
        return broker

    def clean(self) -> None:
        names = set(self.queues)
        for broker in self.brokers:
            names |= broker.known_queues()
            with contextlib.suppress(ConveyorError):
                broker.close()
        names = {n for n in names if ".conveyor.delay." not in n}
        if not names:
            return
        deleter = AMQPBroker.from_url(self.url)
        try:
            for name in sorted(names):
                with contextlib.suppress(ConveyorError):
                    deleter.delete_queue(name)
        finally:
            deleter.close()


@pytest.fixture
def janitor(amqp_url: str) -> Iterator[QueueJanitor]:
    keeper = QueueJanitor(amqp_url)
    yield keeper
    keeper.clean()


@pytest.fixture
def make_amqp_broker(janitor: QueueJanitor) -> Callable[..., AMQPBroker]:
    """``make(url=None, **options)``: a new broker on the test server, cleaned up after."""

    def make(url: str | None = None, **options: Any) -> AMQPBroker:
        return janitor.track(AMQPBroker.from_url(url or janitor.url, **options))

    return make


def terminating(
    proc: subprocess.Popen[bytes], grace: float = 10.0
) -> contextlib.AbstractContextManager[None]:
    """:func:`support.processes.terminating`, with a RabbitMQ-sized grace period."""
    return _terminating(proc, grace)
