"""Replies compressed the Celery 5.7 way reach an ``rpc://`` reader only when
``accept_compression`` names their method (the app passes its setting); a refused reply is
logged and dropped, the others are read (issue 13, item 7). Replies are published with the
AMQP broker, as a Celery 5.7 worker would."""

from __future__ import annotations

import bz2
import contextlib
import json
import logging
import zlib
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from support.amqp import amqp_url  # noqa: F401 - fixture

from conveyor import App
from conveyor.backends.rpc import RPCResultBackend
from conveyor.core.celery import COMPRESSED_RESULT_MARKER
from conveyor.core.errors import ConveyorError
from conveyor.testing.support import eventually, unique_name
from conveyor.transports.amqp import AMQPBroker, parse_amqp_url


class Publisher:
    """A plain pika channel: publishes replies as a Celery 5.7 worker would."""

    def __init__(self, url: str) -> None:
        self.url = url
        endpoint = parse_amqp_url(url)[0][0]
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters(
                host=endpoint.host,
                port=endpoint.port,
                virtual_host=endpoint.vhost,
                credentials=pika.PlainCredentials(endpoint.username, endpoint.password),
            )
        )
        self.channel = self.connection.channel()

    def reply(self, queue: str, task_id: str, mime: bytes, pack: Any) -> None:
        fields = {"status": "SUCCESS", "result": 7, "traceback": None, "task_id": task_id}
        meta = json.dumps({**fields, "children": []}).encode()
        self.channel.basic_publish(
            "",
            queue,
            COMPRESSED_RESULT_MARKER + mime + b"\x00" + pack(meta),
            pika.BasicProperties(
                content_type="application/json",
                content_encoding="utf-8",
                correlation_id=task_id,
                delivery_mode=1,
            ),
        )

    def delete(self, queue: str) -> None:
        deleter = AMQPBroker.from_url(self.url)
        try:
            with contextlib.suppress(ConveyorError):
                deleter.delete_queue(queue, dead_letters=False)
        finally:
            deleter.close()


@pytest.fixture
def publisher(amqp_url: str) -> Iterator[Publisher]:  # noqa: F811
    made = Publisher(amqp_url)
    yield made
    made.connection.close()


def test_a_reply_compressed_with_a_method_not_accepted_is_dropped_and_others_are_read(
    amqp_url: str,  # noqa: F811
    publisher: Publisher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="conveyor.backends.rpc")
    reply_to = unique_name("rpc-cr")
    backend = RPCResultBackend.from_url(
        "rpc://", broker_url=amqp_url, reply_to=reply_to, accept_compression=("zlib",)
    )
    try:
        backend.declare_reply_queue()
        refused, accepted = unique_name("bz"), unique_name("gz")
        publisher.reply(reply_to, refused, b"application/x-bz2", bz2.compress)
        publisher.reply(reply_to, accepted, b"application/x-gzip", zlib.compress)
        record = eventually(lambda: backend.fetch(accepted), 10)
        assert record.result == 7
        assert backend.fetch(refused) is None
        assert any("accept_compression" in r.getMessage() for r in caplog.records)
    finally:
        backend.close()
        publisher.delete(reply_to)


def test_the_apps_accept_compression_reaches_its_rpc_result_backend(
    amqp_url: str,  # noqa: F811
    publisher: Publisher,
) -> None:
    app = App("cr", broker=amqp_url, backend="rpc://", accept_compression=["zlib"])
    try:
        backend = app.backend
        backend.declare_reply_queue()
        refused, accepted = unique_name("bz"), unique_name("gz")
        publisher.reply(app.oid, refused, b"application/x-bz2", bz2.compress)
        publisher.reply(app.oid, accepted, b"application/x-gzip", zlib.compress)
        assert eventually(lambda: backend.fetch(accepted), 10).result == 7
        assert backend.fetch(refused) is None
    finally:
        app.close()
        publisher.delete(app.oid)
