"""``rpc://`` on RabbitMQ: the wire format Celery's rpc backend reads and writes.

What a worker sends (exchange ``""``, routing key = reply_to, correlation id = task id,
delivery mode 1, priority 0, no headers, the meta with ``task_id``), the reply queue
declared exactly like Celery's (kombu re-declares it without 406), messages in Celery's own
shape read back, the routing rules (empty ``reply_to`` sends nothing), and a conveyor worker
answering a conveyor client through the runtime.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import kombu
import pika
import pytest
from support.amqp import QueueJanitor, amqp_url, janitor, rabbitmqctl  # noqa: F401

from conveyor.backends.rpc import RPCResultBackend
from conveyor.core.errors import ConfigurationError, EncodeError, InvalidURL
from conveyor.core.registry import result_backend_from_url
from conveyor.core.types import ResultRecord, State
from conveyor.runtime import App
from conveyor.testing.support import eventually, unique_name
from conveyor.transports.amqp import parse_amqp_url

DONE = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.fixture
def raw(amqp_url: str) -> Iterator[Any]:  # noqa: F811
    endpoint = parse_amqp_url(amqp_url)[0][0]
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            host=endpoint.host,
            port=endpoint.port,
            virtual_host=endpoint.vhost,
            credentials=pika.PlainCredentials(endpoint.username, endpoint.password),
        )
    )
    yield connection.channel()
    connection.close()


@pytest.fixture
def make_backend(amqp_url: str, janitor: QueueJanitor) -> Iterator[Any]:  # noqa: F811
    made: list[RPCResultBackend] = []

    def make(**options: Any) -> RPCResultBackend:
        backend = RPCResultBackend.from_url("rpc://", broker_url=amqp_url, **options)
        made.append(backend)
        janitor.queues.add(backend.reply_to)
        return backend

    yield make
    for backend in made:
        backend.close()


def test_a_result_is_sent_exactly_as_celerys_rpc_backend_sends_it(
    make_backend: Any,
    raw: Any,
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    reply_to = unique_name("replies")
    janitor.queues.add(reply_to)
    raw.queue_declare(reply_to, durable=True, auto_delete=True)
    task_id = str(uuid.uuid4())
    record = ResultRecord(
        task_id,
        State.SUCCESS,
        15,
        date_done=DONE,
        children=[],
        extended={"reply_to": reply_to, "correlation_id": task_id},
    )
    make_backend().store(record, ttl=600.0)
    method, props, body = raw.basic_get(reply_to, auto_ack=True)
    assert (method.exchange, method.routing_key) == ("", reply_to)
    assert props.correlation_id == task_id
    assert props.delivery_mode == 1
    assert props.priority == 0
    assert props.headers is None
    assert props.content_type == "application/json"
    assert props.expiration == "600000"
    assert json.loads(body) == {
        "status": "SUCCESS",
        "result": 15,
        "traceback": None,
        "children": [],
        "date_done": DONE.isoformat(),
        "task_id": task_id,
    }


def test_a_result_over_max_message_size_is_an_encode_error_and_nothing_is_sent(
    make_backend: Any,
) -> None:
    backend = make_backend(max_message_size=1024)
    big = ResultRecord("t-" + uuid.uuid4().hex, State.SUCCESS, "x" * 2048, date_done=DONE)
    with pytest.raises(EncodeError, match="max_message_size"):
        backend.store(big)
    assert backend.fetch(big.task_id) is None
    small = ResultRecord(big.task_id, State.SUCCESS, "x" * 10, date_done=DONE)
    backend.store(small)
    fetched = backend.fetch(big.task_id)
    assert fetched is not None
    assert fetched.result == "x" * 10


def test_an_empty_reply_to_sends_nothing(make_backend: Any, raw: Any) -> None:
    backend = make_backend()
    backend.declare_reply_queue()
    record = ResultRecord("t-" + uuid.uuid4().hex, State.SUCCESS, 1, extended={"reply_to": ""})
    backend.store(record)
    assert backend.fetch(record.task_id) is None
    method, _props, _body = raw.basic_get(backend.reply_to, auto_ack=True)
    assert method is None


def test_the_reply_queue_is_declared_like_celerys(make_backend: Any, amqp_url: str) -> None:  # noqa: F811
    backend = make_backend(default_ttl=600.0)
    backend.declare_reply_queue()
    listed = rabbitmqctl("list_queues", "name", "durable", "auto_delete", "arguments")
    row = next(r.split("\t") for r in listed.stdout.splitlines() if r.startswith(backend.reply_to))
    assert row[1:3] == ["true", "true"]
    assert "x-expires" in row[3]
    assert "600000" in row[3]
    # What Celery's client declares for its oid (celery/backends/rpc.py `binding`).
    with kombu.Connection(amqp_url.replace("amqp://", "pyamqp://", 1)) as connection:
        kombu.Queue(
            backend.reply_to,
            kombu.Exchange(None),
            backend.reply_to,
            durable=True,
            auto_delete=True,
            expires=600.0,
        )(connection.default_channel).declare()


def test_results_in_celerys_shape_are_read_and_keyed_by_correlation_id(
    make_backend: Any, raw: Any
) -> None:
    backend = make_backend()
    backend.declare_reply_queue()
    by_correlation, by_body = str(uuid.uuid4()), str(uuid.uuid4())
    started = {"status": "STARTED", "result": {"pid": 1, "hostname": "celery@h"}}
    success = {"status": "SUCCESS", "result": [1, "two"], "traceback": None, "children": []}
    for meta, correlation in (
        ({**started, "task_id": by_correlation, "date_done": None}, by_correlation),
        ({**success, "task_id": by_correlation, "date_done": DONE.isoformat()}, by_correlation),
        ({**success, "task_id": by_body, "date_done": None}, None),
    ):
        raw.basic_publish(
            "",
            backend.reply_to,
            json.dumps(meta).encode(),
            pika.BasicProperties(
                content_type="application/json",
                content_encoding="utf-8",
                correlation_id=correlation,
                delivery_mode=1,
                priority=0,
            ),
        )
    got = backend.wait(by_correlation, 10.0)
    assert got is not None
    assert (got.state, got.result) == (State.SUCCESS, [1, "two"])
    assert backend.fetch(by_body).state == State.SUCCESS


def test_a_later_state_never_replaces_a_received_success(make_backend: Any) -> None:
    backend = make_backend()
    task_id = str(uuid.uuid4())
    backend.store(ResultRecord(task_id, State.SUCCESS, "first", date_done=DONE))
    backend.store(ResultRecord(task_id, State.FAILURE, {"exc_type": "X"}, date_done=DONE))
    assert backend.fetch(task_id).result == "first"


def test_rpc_needs_an_amqp_broker_url(amqp_url: str) -> None:  # noqa: F811
    with pytest.raises(ConfigurationError, match="broker_url"):
        RPCResultBackend.from_url("rpc://")
    with pytest.raises(ConfigurationError):
        RPCResultBackend.from_url("rpc://", broker_url="redis://localhost:6379/0")
    with pytest.raises(InvalidURL):
        RPCResultBackend.from_url("redis://localhost", broker_url=amqp_url)
    backend = result_backend_from_url("rpc://", broker_url=amqp_url)
    assert isinstance(backend, RPCResultBackend)
    assert "guest" not in repr(backend)
    backend.close()


def test_a_conveyor_worker_answers_a_conveyor_client_over_rpc(
    amqp_url: str,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    queue = unique_name("rpc-tasks")
    janitor.queues.add(queue)

    def make_app() -> App:
        app = App("rpc-test", broker=amqp_url, backend="rpc://", result_expires=600.0)
        app.conf.result_backend_transport_options = {"broker_url": amqp_url, "reply_to": app.oid}

        @app.task(name="rpc.add")
        def add(x: int, y: int) -> int:
            return x + y

        @app.task(name="rpc.fail")
        def fail() -> None:
            raise KeyError("missing ✗")

        return app

    client, server = make_app(), make_app()
    janitor.queues.add(client.oid)
    worker = server.Worker(queues=[queue], pool="threads", concurrency=2)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        assert worker.wait_started(15.0)
        client.backend.declare_reply_queue()  # see docs/stores/amqp.md: runtime change
        results = [client.send_task("rpc.add", (i, i), queue=queue) for i in range(20)]
        assert [r.get(timeout=20.0) for r in results] == [2 * i for i in range(20)]
        failing = client.send_task("rpc.fail", queue=queue)
        with pytest.raises(KeyError):
            failing.get(timeout=20.0)
        assert failing.state == State.FAILURE.value
        eventually(lambda: worker.stats["succeeded"] == 20, 5.0)
    finally:
        worker.stop()
        thread.join(15.0)
        client.close()
        server.close()
